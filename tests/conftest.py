from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The TinyStories sample lives beside the repository (../shared), never inside it.
SAMPLE = REPO.parent / "shared" / "data" / "tinystories-sample.txt"

# One thread for the whole session, module-scoped fixtures included: tiny test tensors gain nothing from
# two, and on a busy machine OpenMP's spinning threads make each small op many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sample_path() -> Path:
    assert SAMPLE.is_file(), f"the TinyStories sample is expected at {SAMPLE}"
    return SAMPLE


@pytest.fixture(autouse=True)
def _deterministic_torch():
    # back to one thread for every test, whatever the previous one set
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A private prepared-data cache, so tests never touch ~/.cache/picollm."""
    return tmp_path / "cache"
