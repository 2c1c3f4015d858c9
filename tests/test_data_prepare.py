from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from picollm.baselines import baselines_for, cached_baselines
from picollm.cli import main
from picollm.config import DataConfig
from picollm.data import build as build_mod
from picollm.data import prepare as prepare_mod
from picollm.data.loader import seeded_permutation
from picollm.data.prepare import PreparedData, assign_splits, cache_path, prepare, split_sizes
from picollm.data.prepared import BASELINES_FILE
from picollm.data.sources import iter_stories
from picollm.errors import UserError

SPLITS = ("train", "val", "test")


def _corpus(path: Path, n: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["a", "bird", "flew", "over", "the", "hill", "and", "sang", "Ana", "found", "shiny", "stone",
             "grün", "été", "🌟", "quietly", "home"]
    stories = []
    for _ in range(n):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 25))) + "."
                 for _ in range(rng.randint(1, 3))]
        stories.append("\n".join(lines))
    stories[5] = "   "  # whitespace-only: dropped and counted
    path.write_text("".join(s + "\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return _corpus(tmp_path / "stories.txt")


def _cfg(corpus: Path, cache_dir: Path, **kw) -> DataConfig:
    split = kw.pop("split", (0.8, 0.1, 0.1))
    return DataConfig(data=str(corpus), cache_dir=str(cache_dir), split=split, **kw)


def _reference_permutation(n: int, *seeds: int) -> list[int]:
    """seeded_permutation in plain Python integers (SplitMix64), independent of numpy."""
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    key = 0x5DEECE66D
    for s in seeds:
        key = mix(key ^ (s & mask))
    return sorted(range(n), key=lambda i: (mix(i ^ key), i))


def test_split_sizes_and_pinned_permutation() -> None:
    assert split_sizes(2317, (0.98, 0.01, 0.01)) == (2271, 23, 23)
    assert split_sizes(10, (0.98, 0.01, 0.01)) == (8, 1, 1)
    assert split_sizes(10, (1.0, 0.0, 0.0)) == (10, 0, 0)
    with pytest.raises(UserError, match="too few"):
        split_sizes(2, (0.98, 0.01, 0.01))
    # Pinned: the sample and split must be the same on any machine and numpy version.
    assert seeded_permutation(10, 0, 0).tolist() == [9, 0, 4, 5, 3, 6, 8, 1, 2, 7]
    for args in [(1000, 3, 0), (57, -5, 2)]:
        assert seeded_permutation(*args).tolist() == _reference_permutation(*args)
    assert seeded_permutation(10, 1, 0).tolist() != seeded_permutation(10, 0, 0).tolist()
    assign = assign_splits(1000, 100, (0.8, 0.1, 0.1), seed=3)
    assert [(assign == s).sum() for s in (-1, 0, 1, 2)] == [900, 80, 10, 10]
    assert np.array_equal(assign, assign_splits(1000, 100, (0.8, 0.1, 0.1), seed=3))


def test_prepare_gpt2_layout(corpus: Path, cache_dir: Path) -> None:
    data = prepare(_cfg(corpus, cache_dir), progress=False)
    meta = data.meta
    stories = list(iter_stories(str(corpus)))
    assert meta["source_stories"] == len(stories) == 119
    assert meta["dropped_empty"] == 1
    assert meta["dtype"] == "uint16" and data.tokenizer.name == "gpt2"
    manifest = json.loads((data.directory / "manifest.json").read_text())
    seen: set[int] = set()
    for split in SPLITS:
        indices = manifest["splits"][split]["indices"]
        assert not seen & set(indices)  # no story in two splits
        seen |= set(indices)
        texts = [stories[i] for i in indices]
        tokens, offsets = data.tokens(split), data.story_offsets(split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert len(offsets) == data.num_stories(split) == len(texts)
        assert data.num_tokens(split) == len(tokens)
        # stream layout: [eot] + encode(story) per story, in split order
        expected = [t for text in texts for t in [data.tokenizer.eot_id, *data.tokenizer.encode(text)]]
        assert tokens.tolist() == expected
        assert (tokens[offsets] == data.tokenizer.eot_id).all()
        assert np.count_nonzero(tokens == data.tokenizer.eot_id) == len(texts)
        ends = [*offsets[1:], len(tokens)]
        assert [data.tokenizer.decode(tokens[a + 1: b]) for a, b in zip(offsets, ends, strict=True)] == texts
        # bytes: UTF-8 bytes of the stories + 1 per story, whatever the tokenizer
        assert data.num_bytes(split) == sum(len(t.encode()) + 1 for t in texts)
        assert meta["splits"][split]["story_tokens"] + meta["splits"][split]["eot_tokens"] == len(tokens)
    assert seen == set(range(len(stories)))
    assert [data.num_stories(s) for s in SPLITS] == [95, 12, 12]


def test_split_determinism_and_sample(corpus: Path, tmp_path: Path) -> None:
    a = prepare(_cfg(corpus, tmp_path / "c1", num_stories=50, seed=7), progress=False)
    b = prepare(_cfg(corpus, tmp_path / "c2", num_stories=50, seed=7, num_proc=1), progress=False)
    c = prepare(_cfg(corpus, tmp_path / "c1", num_stories=50, seed=8), progress=False)
    ma, mb, mc = (json.loads((d.directory / "manifest.json").read_text()) for d in (a, b, c))
    assert ma["splits"] == mb["splits"]
    assert ma["splits"] != mc["splits"]
    assert sum(ma["splits"][s]["stories"] for s in SPLITS) == 50
    for split in SPLITS:
        assert np.array_equal(a.tokens(split), b.tokens(split))
    assert a.directory != c.directory


def test_workers_match_in_process(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_mod, "CHUNK_BYTES", 500)  # many chunks, so two workers both get work
    one = prepare(_cfg(corpus, tmp_path / "one", num_proc=1), progress=False)
    two = prepare(_cfg(corpus, tmp_path / "two", num_proc=2), progress=False)
    assert (one.meta["num_proc"], two.meta["num_proc"]) == (1, 2)
    for split in SPLITS:
        assert np.array_equal(one.tokens(split), two.tokens(split))
        assert np.array_equal(one.story_offsets(split), two.story_offsets(split))


def test_cache_reuse_and_corrupt_rebuild(corpus: Path, cache_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(corpus, cache_dir)
    first = prepare(cfg, progress=False)
    assert not first.cached
    meta_mtime = (first.directory / "meta.json").stat().st_mtime_ns
    builds = []
    real_build = prepare_mod.build_prepared
    monkeypatch.setattr(prepare_mod, "build_prepared", lambda *a: builds.append(1) or real_build(*a))

    again = prepare(_cfg(corpus, cache_dir, num_proc=1), progress=False)  # num_proc is not in the key
    assert again.cached and builds == [] and again.directory == first.directory
    assert (first.directory / "meta.json").stat().st_mtime_ns == meta_mtime

    train_bin = first.directory / "train.bin"
    size = train_bin.stat().st_size
    with open(train_bin, "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(UserError, match="truncated"):
        PreparedData.open(first.directory)
    rebuilt = prepare(cfg, progress=False)
    assert not rebuilt.cached and builds == [1]
    assert train_bin.stat().st_size == size

    # killed mid-write: a directory without meta.json, plus a leftover temporary build
    (rebuilt.directory / "meta.json").unlink()
    leftover = rebuilt.directory.parent / f".{rebuilt.directory.name}.abc.tmp"
    leftover.mkdir()
    assert not prepare(cfg, progress=False).cached and builds == [1, 1]
    assert not leftover.exists()

    # a changed source is a different key
    os.utime(corpus, ns=(10**9, 10**9))
    assert cache_path(cfg) != first.directory
    assert not prepare(cfg, progress=False).cached


def test_bpe_trains_on_train_split_only(corpus: Path, cache_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_train = build_mod.train_bpe

    def spy(texts, vocab_size):
        texts = list(texts)
        seen.extend(texts)
        return real_train(texts, vocab_size)

    monkeypatch.setattr(build_mod, "train_bpe", spy)
    data = prepare(_cfg(corpus, cache_dir, tokenizer="bpe:300"), progress=False)
    stories = list(iter_stories(str(corpus)))
    manifest = json.loads((data.directory / "manifest.json").read_text())
    train = {stories[i] for i in manifest["splits"]["train"]["indices"]}
    assert sorted(seen) == sorted(train)
    assert data.tokenizer.name == "bpe:300" and (data.directory / "tokenizer.json").is_file()
    assert int(data.tokens("train").max()) < data.tokenizer.vocab_size <= 300
    assert data.meta["bpe"]["train_stories"] == len(train)
    # decoded streams give the stories back
    tokens, offsets = data.tokens("val"), data.story_offsets("val")
    first_val = stories[manifest["splits"]["val"]["indices"][0]]
    assert data.tokenizer.decode(tokens[offsets[0] + 1: offsets[1]]) == first_val

    seen.clear()
    small = prepare(_cfg(corpus, cache_dir, tokenizer="bpe:300", bpe_train_bytes=2000), progress=False)
    assert 0 < sum(len(t.encode()) for t in seen) <= 2000 and set(seen) <= train
    assert small.meta["bpe"]["train_bytes"] <= 2000


def test_sample_gpt2(sample_path: Path, cache_dir: Path) -> None:
    data = prepare(DataConfig(data=str(sample_path), cache_dir=str(cache_dir)), progress=False)
    total = data.meta["total"]
    assert total["stories"] == 2317
    assert [data.num_stories(s) for s in SPLITS] == [2271, 23, 23]
    assert 495_000 < total["story_tokens"] < 515_000
    assert total["eot_tokens"] == 2317
    assert 4.0 < total["bytes_per_token"] < 4.2


# ---- command line


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["prepare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_and_table(corpus: Path, cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--data", str(corpus), "--split", "0.8,0.1,0.1", "--cache-dir", str(cache_dir)]
    code, out, err = _run(capsys, *args, "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    assert info["total"]["stories"] == 119 and info["dropped_empty"] == 1 and not info["cached"]
    assert set(info["splits"]) == set(SPLITS) and info["tokens_per_second"] > 0
    code, out, _ = _run(capsys, *args)
    assert code == 0
    assert "(cached)" in out and "bytes/token" in out and "tokens/s" in out and "119" in out


def test_cli_bad_inputs(tmp_path: Path, corpus: Path, cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n<|endoftext|>\n\n")
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"fine\n<|endoftext|>\nnot \xc3\x28 fine\n")
    cache = ["--cache-dir", str(cache_dir)]
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--data", str(empty)], "holds no stories"),
        (["--data", str(blank)], "holds no stories"),
        (["--data", str(corpus), "--tokenizer", "gpt5"], "unknown tokenizer 'gpt5'; use gpt2, bpe:N"),
        (["--data", str(corpus), "--split", "0.5,0.1,0.1"], "must sum to 1"),
        (["--data", str(corpus), "--split", "0.9,0.1"], "three comma-separated ratios"),
        (["--data", str(corpus), "--split", "a,b,c"], "three comma-separated ratios"),
        (["--data", str(corpus), "--num-stories", "5000"], "more stories than"),
        (["--data", str(corpus), "--format", "csv"], "unknown data format"),
        (["--data", str(bad_utf8)], f"{bad_utf8}: invalid UTF-8 at byte offset 23"),
    ]
    for argv, message in cases:
        code, out, err = _run(capsys, *argv, *cache)
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith("picollm prepare: error: ") and message in err, (argv, err)
        assert out == ""

    code, out, err = _run(capsys, "--data", str(bad_utf8), "--encoding-errors", "replace", "--split", "1,0,0",
                          "--json", *cache)
    assert code == 0, err
    assert json.loads(out)["replacements"] == 1
    code, out, err = _run(capsys, "--data", str(bad_utf8), "--encoding-errors", "replace", "--split", "1,0,0",
                          *cache)
    assert "1 invalid UTF-8 sequences replaced" in out


# --- checksums, the verification stamp, format 1 ----------------------------------------------------


def _hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files whose content PreparedData.open reads to hash it, from now on."""
    from picollm.data import prepared as prepared_mod

    calls: list[str] = []
    real = prepared_mod.file_record
    monkeypatch.setattr(prepared_mod, "file_record", lambda path: calls.append(Path(path).name) or real(path))
    return calls


def test_damage_that_keeps_every_size_is_caught_and_rebuilt(corpus: Path, cache_dir: Path, capsys) -> None:
    cfg = _cfg(corpus, cache_dir)
    data = prepare(cfg, progress=False)
    good = (data.directory / "train.bin").read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0x7F  # an id out of the vocabulary, say: same size, other content
    (data.directory / "train.bin").write_bytes(bytes(damaged))
    with pytest.raises(UserError, match=r"train.bin does not match the sha256 recorded in meta.json: the file is "
                                        r"damaged; prepare the data again"):
        PreparedData.open(data.directory)
    capsys.readouterr()
    rebuilt = prepare(cfg, progress=False)
    assert "cached data is unusable" in capsys.readouterr().err and not rebuilt.cached
    assert (rebuilt.directory / "train.bin").read_bytes() == good


def test_content_is_hashed_once_then_trusted_until_a_file_changes(corpus: Path, cache_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = prepare(_cfg(corpus, cache_dir), progress=False)
    directory = data.directory
    files = set(json.loads((directory / "meta.json").read_text())["files"])
    assert {"train.bin", "val.offsets.npy", "manifest.json", "tokenizer_config.json"} <= files
    calls = _hash_calls(monkeypatch)
    PreparedData.open(directory)
    PreparedData.open(directory)
    assert calls == []  # the build's own stamp vouches for every file
    # written since (same size, same content even): read again, then trusted again
    (directory / "val.bin").write_bytes((directory / "val.bin").read_bytes())
    PreparedData.open(directory)
    assert calls == ["val.bin"]
    PreparedData.open(directory)
    assert calls == ["val.bin"]
    # replaced by another file with the same size and modification time: another inode, read again
    test_bin = directory / "test.bin"
    stat = test_bin.stat()
    replacement = directory / "replacement"
    replacement.write_bytes(test_bin.read_bytes())
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, test_bin)
    PreparedData.open(directory)
    assert calls == ["val.bin", "test.bin"]
    # a file as new as the stamp could have changed after it in the same clock tick: read again
    stamp_mtime = (directory / ".verified.json").stat().st_mtime_ns
    os.utime(directory / "train.bin", ns=(stamp_mtime, stamp_mtime))
    PreparedData.open(directory)
    assert calls[-1] == "train.bin"
    # a stamp that vouches for other content does not help
    stamp = json.loads((directory / ".verified.json").read_text())
    stamp["manifest.json"]["sha256"] = "0" * 64
    (directory / ".verified.json").write_text(json.dumps(stamp))
    PreparedData.open(directory)
    assert calls[-1] == "manifest.json"


def test_a_read_only_cache_is_read_without_writing(corpus: Path, tmp_path: Path, read_only) -> None:
    built = prepare(_cfg(corpus, tmp_path / "built"), progress=False)
    (built.directory / ".verified.json").unlink()

    def copy_cache(directory: Path) -> None:
        shutil.copytree(tmp_path / "built", directory, dirs_exist_ok=True)

    cfg = _cfg(corpus, read_only(tmp_path / "shared", copy_cache))
    data = prepare(cfg, progress=False)
    assert data.cached and data.tokens("train").tolist() == built.tokens("train").tolist()
    assert not (data.directory / ".verified.json").exists()  # verified, and nothing written
    # the baselines (lr auto's threshold, the study's reference lines) are computed, not cached there
    assert cached_baselines(data) == baselines_for(built)
    assert not (data.directory / BASELINES_FILE).exists()
    other = _cfg(corpus, tmp_path / "shared", seed=5)  # not in the read-only cache: it cannot be built there
    with pytest.raises(UserError, match=r"the prepared-data cache .*shared/prepared cannot be written: "
                                        r".*shared/prepared is (on a read-only filesystem|not writable by this "
                                        r"user); pass another --data.cache_dir"):
        prepare(other, progress=False)


def test_a_format_1_cache_is_refused_and_prepare_rebuilds_it_in_place(corpus: Path, cache_dir: Path, capsys) -> None:
    cfg = _cfg(corpus, cache_dir)
    data = prepare(cfg, progress=False)
    # format 1, as picollm wrote it before the checksums: the same layout, no "files", no stamp
    meta = json.loads((data.directory / "meta.json").read_text())
    del meta["files"]
    meta["picollm_data_format"] = 1
    (data.directory / "meta.json").write_text(json.dumps(meta))
    (data.directory / ".verified.json").unlink()
    with pytest.raises(UserError, match="holds prepared-data format 1, this picollm reads 2; prepare the data again"):
        PreparedData.open(data.directory)
    capsys.readouterr()
    rebuilt = prepare(cfg, progress=False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "format 1" in err and "rebuilding it" in err, err
    assert rebuilt.directory == data.directory and not rebuilt.cached
    assert json.loads((rebuilt.directory / "meta.json").read_text())["picollm_data_format"] == 2
