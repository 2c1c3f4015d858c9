from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from picollm.data import sources
from picollm.data.sources import iter_stories, source_identity
from picollm.errors import UserError

STORIES = ["A fox met a crow.\nThey talked.", "Zoë ate a crêpe 🥞 on Tuesday.", "The end, said the owl."]


def _tinystories(path: Path, stories: list[str], newline: str = "\n") -> Path:
    text = "".join(s.replace("\n", newline) + newline + "<|endoftext|>" + newline for s in stories)
    path.write_bytes(text.encode())
    return path


def test_tinystories_txt(tmp_path: Path) -> None:
    path = _tinystories(tmp_path / "a.txt", STORIES)
    stream = iter_stories(str(path))
    assert list(stream) == STORIES
    assert (stream.stories, stream.dropped_empty, stream.replacements) == (3, 0, 0)


def test_tinystories_crlf_empty_and_unterminated(tmp_path: Path) -> None:
    raw = ("<|endoftext|>\r\n" + "one\r\ntwo\r\n<|endoftext|>\r\n  \r\n<|endoftext|>\r\n"
           "<|endoftext|>\r\n" + "three, cut off")
    path = tmp_path / "crlf.txt"
    path.write_bytes(raw.encode())
    stream = iter_stories(str(path))
    assert list(stream) == ["one\r\ntwo", "three, cut off"]  # CRLF inside a story is kept
    assert stream.dropped_empty == 2  # the blank story and the one between two separators


def test_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "plain.txt"
    text = "\n\nFirst story,\nsecond line.\n\n \t\n\nSecond story.\r\n\r\nThird.\n\n\n"
    path.write_text(text, encoding="utf-8")
    stream = iter_stories(str(path))
    assert list(stream) == ["First story,\nsecond line.", "Second story.", "Third."]
    assert stream.dropped_empty == 0


@pytest.mark.parametrize("kind", ["tinystories", "text"])
def test_block_boundaries_do_not_change_stories(kind: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    stories = [f"story {i} " + "word " * (i % 7) + "\nmore " * (i % 3) for i in range(40)]
    path = tmp_path / "s.txt"
    if kind == "tinystories":
        _tinystories(path, stories)
    else:
        path.write_text("\n\n\n".join(stories), encoding="utf-8")
    expected = [s.strip() for s in stories]
    for block in (1, 3, 7, 64):
        monkeypatch.setattr(sources, "_BLOCK_BYTES", block)
        stream = iter_stories(str(path))
        assert list(stream) == expected, block
        assert stream.dropped_empty == 0


def test_jsonl_json_and_errors(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"story": s, "id": i}) for i, s in enumerate(STORIES)) + "\n\n"
                     + json.dumps({"story": "   "}) + "\n", encoding="utf-8")
    stream = iter_stories(str(jsonl), text_field="story")
    assert list(stream) == STORIES
    assert stream.dropped_empty == 1
    message = r"a\.jsonl:1: no field 'text' \(fields: story, id\); pass --data.text_field"
    with pytest.raises(UserError, match=message):
        list(iter_stories(str(jsonl)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_stories(str(bad)))

    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps([{"text": s} for s in STORIES]), encoding="utf-8")
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(STORIES), encoding="utf-8")
    column = tmp_path / "column.json"
    column.write_text(json.dumps({"text": STORIES, "meta": 1}), encoding="utf-8")
    lines = tmp_path / "lines.json"  # JSON lines under a .json name
    lines.write_text("\n".join(json.dumps({"text": s}) for s in STORIES), encoding="utf-8")
    for path in (objects, strings, column, lines):
        assert list(iter_stories(str(path))) == STORIES, path.name
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"text": 3}]), encoding="utf-8")
    with pytest.raises(UserError, match="holds int, not text"):
        list(iter_stories(str(wrong)))


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": STORIES + [None, ""], "n": list(range(5))}), path, row_group_size=2)
    stream = iter_stories(str(path))
    assert list(stream) == STORIES
    assert stream.dropped_empty == 2
    with pytest.raises(UserError, match="no column 'body' .*columns: text, n"):
        iter_stories(str(path), text_field="body").__next__()
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable parquet file"):
        list(iter_stories(str(tmp_path / "fake.parquet")))


def test_folder_and_format_override(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    _tinystories(folder / "b.txt", STORIES[:1])
    (folder / "a.jsonl").write_text(json.dumps({"text": STORIES[1]}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": [STORIES[2]]}), folder / "sub" / "c.parquet")
    (folder / "sub" / "d.json").write_text(json.dumps(["from json"]), encoding="utf-8")
    (folder / "e.txt").write_text("plain one\n\nplain two\n", encoding="utf-8")
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.txt").write_text("hidden")
    stream = iter_stories(str(folder))
    assert list(stream) == [STORIES[1], STORIES[0], "plain one", "plain two", STORIES[2], "from json"]
    assert [p.name for p in stream.files] == ["a.jsonl", "b.txt", "e.txt", "c.parquet", "d.json"]

    odd = tmp_path / "stories.dat"
    odd.write_text("x\n\ny\n", encoding="utf-8")
    with pytest.raises(UserError, match="--data.format"):
        iter_stories(str(odd))
    assert list(iter_stories(str(odd), format="text")) == ["x", "y"]
    # a .txt read as tinystories although it has no separator lines: one story
    assert list(iter_stories(str(folder / "e.txt"), format="tinystories")) == ["plain one\n\nplain two"]
    with pytest.raises(UserError, match="unknown data format 'csv'"):
        iter_stories(str(odd), format="csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no .txt"):
        iter_stories(str(empty))


def test_missing_path() -> None:
    with pytest.raises(UserError, match="does not exist.*--data.data PATH"):
        iter_stories("/no/such/file.txt")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    good = b"Good story.\n<|endoftext|>\n"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"Bad \xff\xfe bytes and a real \xef\xbf\xbd.\n<|endoftext|>\n")
    offset = 3 + len(good) + 4
    message = rf"bad\.txt: invalid UTF-8 at byte offset {offset} .*--data.encoding_errors replace"
    with pytest.raises(UserError, match=message):
        list(iter_stories(str(path)))
    stream = iter_stories(str(path), encoding_errors="replace")
    assert list(stream) == ["Good story.", "Bad \ufffd\ufffd bytes and a real \ufffd."]
    assert stream.replacements == 2  # the genuine U+FFFD in the file is not counted
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl: invalid UTF-8 at byte offset 28"):
        list(iter_stories(str(jsonl)))


def test_source_identity_changes_with_the_file(tmp_path: Path) -> None:
    path = _tinystories(tmp_path / "a.txt", STORIES)
    first = source_identity(str(path), None, "train")
    assert first == source_identity(str(path), None, "train")
    path.write_text("changed", encoding="utf-8")
    os.utime(path, ns=(1, 1))
    assert source_identity(str(path), None, "train") != first
    assert source_identity("hf:roneneldan/TinyStories", None, "train") == {
        "hf": "roneneldan/TinyStories", "hf_split": "train"}


def test_hf_local_dataset_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    ds = datasets.Dataset.from_dict({"body": STORIES + [" "], "n": [1, 2, 3, 4]})
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    stream = iter_stories(f"hf:{tmp_path / 'pq'}", text_field="body")  # load_dataset on a local folder
    assert list(stream) == STORIES
    assert stream.dropped_empty == 1
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "saved"))
    assert list(iter_stories(f"hf:{tmp_path / 'saved'}", text_field="body", hf_split="validation")) == STORIES
    with pytest.raises(UserError, match="no split 'train'.*--data.hf_split"):
        iter_stories(f"hf:{tmp_path / 'saved'}", text_field="body")
    with pytest.raises(UserError, match="no column 'text'.*body, n"):
        iter_stories(f"hf:{tmp_path / 'pq'}")


def test_hf_without_network_is_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "picollm", "prepare", "--data", "hf:roneneldan/TinyStories",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no network access" in lines[0] and "--data PATH" in lines[0]
