from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from helpers import run_config

from picollm.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
# The TinyStories sample lives beside the repository (../shared), never inside it.
SAMPLE = REPO.parent / "shared" / "data" / "tinystories-sample.txt"

# One thread for the whole session, session-scoped fixtures included: tiny test tensors gain nothing from
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


@pytest.fixture(scope="session")
def data_section(tmp_path_factory, sample_path) -> dict:
    """The training tests' data: 300 stories of the sample with a 512-token BPE, in a cache of the
    session (prepared by the first run that needs it)."""
    cache = tmp_path_factory.mktemp("cache")
    return {"data": str(sample_path), "num_stories": 300, "split": [0.8, 0.1, 0.1],
            "tokenizer": "bpe:512", "cache_dir": str(cache), "num_proc": 1}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, data_section) -> Path:
    """`helpers.run_config`, trained without interruption: every interrupted-and-resumed run must end with
    its weights, bit for bit. Read it, never write into it (copy it first)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(run_config(data_section, out), progress=False)
    return out


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache; yields a function that puts a snapshot of files in it."""
    hf_home = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"

    def add(repo_id: str, files: dict[str, bytes]) -> Path:
        repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, data in files.items():
            (snapshot / name).write_bytes(data)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return snapshot

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    importlib.reload(huggingface_hub.constants)
    try:
        yield add
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


@pytest.fixture
def read_only():
    """Yields `make(directory, fill)`: runs `fill(directory)` in a new directory, then makes it read-only
    for this process: a tmpfs mounted there and remounted read-only when running as root (whom
    permissions do not stop), its permission bits otherwise. Skips where neither is possible."""
    mounted: list[Path] = []
    locked: list[Path] = []

    def make(directory: Path, fill=lambda d: None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            fill(directory)
            for path in [directory, *directory.rglob("*")]:
                path.chmod(path.stat().st_mode & ~0o222)
                locked.append(path)
            return directory
        mount = shutil.which("mount")
        if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(directory)],
                                           capture_output=True).returncode != 0:
            pytest.skip("a read-only directory needs `mount -t tmpfs` as root, or a non-root user")
        mounted.append(directory)
        fill(directory)
        subprocess.run([mount, "-o", "remount,ro", str(directory)], check=True, capture_output=True)
        return directory

    try:
        yield make
    finally:
        for directory in mounted:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)
        for path in locked:
            path.chmod(path.stat().st_mode | 0o200)
