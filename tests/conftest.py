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
    torch.manual_seed(0)
    yield


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A private prepared-data cache, so tests never touch ~/.cache/picollm."""
    return tmp_path / "cache"
