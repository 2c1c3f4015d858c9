from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The TinyStories sample lives beside the repository (../shared), never inside it.
SAMPLE = REPO.parent / "shared" / "data" / "tinystories-sample.txt"


@pytest.fixture(scope="session")
def sample_path() -> Path:
    assert SAMPLE.is_file(), f"the TinyStories sample is expected at {SAMPLE}"
    return SAMPLE


@pytest.fixture(autouse=True)
def _deterministic_torch():
    # one thread: tiny test tensors gain nothing from two, and lose a lot when the cores are busy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A private prepared-data cache, so tests never touch ~/.cache/picollm."""
    return tmp_path / "cache"
