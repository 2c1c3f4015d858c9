"""Where stories come from: a Hugging Face dataset (`hf:NAME`) or local files.

`iter_stories(source, ...)` returns a `StoryStream`: an iterator over story texts that also counts
what it dropped (empty or whitespace-only stories) and how many invalid UTF-8 sequences it replaced
(`encoding_errors="replace"`). Every source yields the same thing: each story's text with surrounding
whitespace removed (`str.strip()`); the text inside is kept byte for byte (CRLF stays CRLF).

Local formats, detected by extension unless `format` says otherwise:

- `.txt`: TinyStories (`tinystories`: stories separated by lines reading `<|endoftext|>`, as in
  `TinyStories-train.txt`) when the file has such a line, else plain text (`text`: one story per
  block of lines separated by blank lines).
- `.jsonl` / `.ndjson` (`jsonl`): one JSON object per line, the story under `text_field`.
- `.json` (`json`): a list of objects (story under `text_field`) or of strings, or an object whose
  `text_field` is a string or a list of strings.
- `.parquet` (`parquet`): the column `text_field`.
- a folder: every such file below it (sorted by path; hidden files and other extensions skipped),
  each read by its extension, or all of them by `format`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from picollm.data.hf import load_hf_dataset, one_line
from picollm.errors import UserError

FORMATS = ("tinystories", "text", "jsonl", "json", "parquet")
# ".txt" is "tinystories" or "text", decided by the file's content.
EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
EOT_LINE = "<|endoftext|>"
_BLOCK_BYTES = 8 << 20
_TINYSTORIES_SEP = re.compile(r"^<\|endoftext\|>[ \t\r]*(?:\n|\Z)", re.MULTILINE)
_TINYSTORIES_SEP_BYTES = re.compile(rb"^<\|endoftext\|>[ \t\r]*$", re.MULTILINE)
_BLANK_LINES = re.compile(r"(?:^[ \t\r\f\v]*\n)+", re.MULTILINE)
_SURROGATE = re.compile("[\ud800-\udfff]")


class StoryStream(Iterator[str]):
    """Story texts from one source, with counts of what was dropped or repaired.

    Counters (final once the stream is exhausted): `stories` (yielded), `dropped_empty` (empty or
    whitespace-only stories skipped), `replacements` (U+FFFD characters put in for invalid UTF-8,
    or for unpaired surrogates that JSON escapes can spell;
    always 0 with `encoding_errors="strict"`, which raises instead). `files` lists the local files read.
    """

    def __init__(self, source: str, text_field: str = "text", format: str | None = None,
                 encoding_errors: str = "strict", hf_split: str = "train") -> None:
        if encoding_errors not in ("strict", "replace"):
            raise UserError(f"encoding_errors must be 'strict' or 'replace', got {encoding_errors!r}")
        check_format(format)
        self.source = source
        self.text_field = text_field
        self.format = format
        self.encoding_errors = encoding_errors
        self.hf_split = hf_split
        self.stories = 0
        self.dropped_empty = 0
        self.replacements = 0
        self.files: list[Path] = []
        if source.startswith("hf:"):
            raw = self._hf_stories(source[3:])
        else:
            files = local_files(source, format)
            self.files = [p for p, _ in files]
            raw = self._local_stories(files)
        self._it = self._clean(raw)

    def __iter__(self) -> StoryStream:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def _clean(self, raw: Iterator[str | None]) -> Iterator[str]:
        for text in raw:
            text = text.strip() if text is not None else ""
            if text:
                self.stories += 1
                yield text
            else:
                self.dropped_empty += 1

    # ---- local files

    def _local_stories(self, files: list[tuple[Path, str]]) -> Iterator[str | None]:
        for path, fmt in files:
            if fmt == "txt":
                fmt = "tinystories" if _has_eot_lines(path) else "text"
            if fmt == "tinystories":
                yield from self._tinystories(path)
            elif fmt == "text":
                yield from self._plain_text(path)
            elif fmt == "jsonl":
                yield from self._jsonl(path)
            elif fmt == "json":
                yield from self._json(path)
            else:
                yield from self._parquet(path)

    def _decode(self, data: bytes, path: Path, offset: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.encoding_errors == "strict":
                raise UserError(
                    f"{path}: invalid UTF-8 at byte offset {offset + exc.start} ({exc.reason}); fix the file "
                    "or pass --data.encoding_errors replace to replace bad bytes with U+FFFD") from None
        text = data.decode("utf-8", errors="replace")
        self.replacements += text.count("\ufffd") - data.count("\ufffd".encode())
        return text

    def _text_blocks(self, path: Path) -> Iterator[str]:
        """Decoded text of `path` in blocks that end at line ends (a UTF-8 character never spans two)."""
        for offset, data in _line_blocks(path):
            if offset == 0 and data.startswith(b"\xef\xbb\xbf"):
                yield self._decode(data[3:], path, 3)
            else:
                yield self._decode(data, path, offset)

    def _tinystories(self, path: Path) -> Iterator[str]:
        pending: list[str] = []
        first = True
        for block in self._text_blocks(path):
            # A separator is a whole line, so it never spans two blocks.
            parts = _TINYSTORIES_SEP.split(block)
            pending.append(parts[0])
            if len(parts) > 1:
                head = "".join(pending)
                if not first or head.strip():  # a separator opening the file follows no story
                    yield head
                first = False
                yield from parts[1:-1]
                pending = [parts[-1]]
        last = "".join(pending)
        if last.strip():
            yield last

    def _plain_text(self, path: Path) -> Iterator[str]:
        # Blank lines separate stories, so a story here is never blank: empty parts are only runs of
        # blank lines cut by a block boundary, and are not counted as dropped stories.
        pending: list[str] = []
        for block in self._text_blocks(path):
            parts = _BLANK_LINES.split(block)
            pending.append(parts[0])
            if len(parts) > 1:
                head = "".join(pending)
                if head.strip():
                    yield head
                for part in parts[1:-1]:
                    if part.strip():
                        yield part
                pending = [parts[-1]]
        last = "".join(pending)
        if last.strip():
            yield last

    def _jsonl(self, path: Path) -> Iterator[str | None]:
        lineno = 0
        for block in self._text_blocks(path):
            lines = block.split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            for line in lines:
                lineno += 1
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno}); "
                                    "a .jsonl file needs one JSON object per line") from None
                except RecursionError:
                    raise UserError(f"{path}:{lineno}: JSON nested too deeply to hold a story") from None
                yield self._field(record, f"{path}:{lineno}")

    def _json(self, path: Path) -> Iterator[str | None]:
        data = path.read_bytes()
        start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        text = self._decode(data[start:], path, start)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # several JSON values: JSON lines under a .json name
                yield from self._jsonl(path)
                return
            raise UserError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} "
                            f"column {exc.colno})") from None
        except RecursionError:
            raise UserError(f"{path}: JSON nested too deeply to hold stories") from None
        if isinstance(doc, list):
            for i, item in enumerate(doc):
                where = f"{path}: item {i}"
                yield self._check_text(item, where) if isinstance(item, str) else self._field(item, where)
        elif isinstance(doc, dict) and isinstance(doc.get(self.text_field), list):
            for i, item in enumerate(doc[self.text_field]):
                yield self._check_text(item, f"{path}: {self.text_field}[{i}]")
        elif isinstance(doc, dict):
            yield self._field(doc, str(path))
        else:
            raise UserError(f"{path}: expected a JSON list of objects with a '{self.text_field}' field, "
                            f"got {type(doc).__name__}")

    def _parquet(self, path: Path) -> Iterator[str | None]:
        import pyarrow.parquet as pq  # a dependency of datasets, needed for parquet files only

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:
            raise UserError(f"{path} is not a readable parquet file ({one_line(exc)})") from None
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise UserError(f"{path} has no column '{self.text_field}' (columns: {', '.join(names)}); "
                            "pass --data.text_field NAME")
        for batch in pf.iter_batches(batch_size=4096, columns=[self.text_field]):
            for i, value in enumerate(batch.column(0).to_pylist()):
                if isinstance(value, bytes):
                    value = self._decode(value, path, 0)
                yield self._check_text(value, f"{path}: row {i}")

    def _field(self, record: Any, where: str) -> str | None:
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object with a '{self.text_field}' field, "
                            f"got {type(record).__name__}")
        if self.text_field not in record:
            fields = ", ".join(list(record)[:10]) or "none"
            raise UserError(f"{where}: no field '{self.text_field}' (fields: {fields}); "
                            "pass --data.text_field NAME")
        return self._check_text(record[self.text_field], where)

    def _check_text(self, value: Any, where: str) -> str | None:
        if isinstance(value, str) and _SURROGATE.search(value):
            return self._unpaired_surrogates(value, where)
        if value is None or isinstance(value, str):
            return value
        raise UserError(f"{where}: field '{self.text_field}' holds {type(value).__name__}, not text; "
                        "pass --data.text_field NAME for the text field")

    def _unpaired_surrogates(self, value: str, where: str) -> str:
        """A JSON `\\ud800` escape without its pair decodes to a lone surrogate: not valid Unicode (it
        has no UTF-8 form), so it is an encoding error like invalid UTF-8 bytes."""
        if self.encoding_errors == "strict":
            match = _SURROGATE.search(value)
            assert match is not None
            raise UserError(f"{where}: the text holds an unpaired surrogate \\u{ord(match.group()):04x} at "
                            f"character {match.start()}, which is not valid Unicode; fix the file or pass "
                            "--data.encoding_errors replace to replace it with U+FFFD")
        fixed, count = _SURROGATE.subn("\ufffd", value)
        self.replacements += count
        return fixed

    # ---- Hugging Face datasets

    def _hf_stories(self, name: str) -> Iterator[str | None]:
        ds = load_hf_dataset(name, self.hf_split)
        if self.text_field not in ds.column_names:
            raise UserError(f"hf:{name} (split {self.hf_split}) has no column '{self.text_field}' "
                            f"(columns: {', '.join(ds.column_names)}); pass --data.text_field NAME")
        return self._hf_rows(ds.select_columns([self.text_field]), f"hf:{name}")

    def _hf_rows(self, ds: Any, where: str) -> Iterator[str | None]:
        row = 0
        for batch in ds.iter(batch_size=4096):
            for value in batch[self.text_field]:
                yield self._check_text(value, f"{where}: row {row}")
                row += 1


def iter_stories(source: str, text_field: str = "text", format: str | None = None,
                 encoding_errors: str = "strict", hf_split: str = "train") -> StoryStream:
    """The non-empty stories of `source` ("hf:NAME" or a local file/folder), stripped, in order.

    Bad input (missing path, unknown format, invalid UTF-8 under "strict", a missing text field,
    no network for an uncached hf: dataset) raises `UserError` naming the file and the fix.
    """
    return StoryStream(source, text_field=text_field, format=format, encoding_errors=encoding_errors,
                       hf_split=hf_split)


def check_format(format: str | None) -> None:
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown data format {format!r}; use one of {', '.join(FORMATS)} "
                        "(or leave it out to detect it from the file extension)")


def local_files(source: str, format: str | None = None) -> list[tuple[Path, str]]:
    """The files of a local source with the format each is read as ("txt" = decided by content)."""
    check_format(format)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data path {source} does not exist; pass an existing file or folder with "
                        "--data.data PATH (or hf:NAME for a Hugging Face dataset)")
    if path.is_file():
        return [(path, format or _format_of(path, strict=True))]
    if not path.is_dir():
        raise UserError(f"data path {source} is neither a file nor a folder")
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            file = Path(root) / name
            fmt = format or _format_of(file, strict=False)
            if fmt:
                files.append((file, fmt))
    files.sort(key=lambda item: item[0].relative_to(path).parts)
    if not files:
        raise UserError(f"data folder {source} holds no .txt, .jsonl, .ndjson, .json or .parquet files")
    return files


def _format_of(path: Path, strict: bool) -> str:
    fmt = EXTENSIONS.get(path.suffix.lower(), "")
    if not fmt and strict:
        raise UserError(f"cannot tell the format of {path} from its extension; pass --data.format "
                        f"{'|'.join(FORMATS)}")
    return fmt


def _line_blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) of `path` in blocks of about 8 MiB, each ending at a newline but the last."""
    offset = 0
    rest = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(_BLOCK_BYTES)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            yield offset, data[:cut]
            offset += cut
            rest = data[cut:]
    if rest:
        yield offset, rest


def _has_eot_lines(path: Path) -> bool:
    return any(_TINYSTORIES_SEP_BYTES.search(block) for _, block in _line_blocks(path))


def source_identity(source: str, format: str | None, hf_split: str) -> dict[str, Any]:
    """What identifies a source's content for the prepared-data cache key, without reading it."""
    if source.startswith("hf:"):
        name = source[3:]
        ident: dict[str, Any] = {"hf": name, "hf_split": hf_split}
        local = Path(name).expanduser()
        if local.exists():
            ident["files"] = _file_stats(local, sorted(p for p in local.rglob("*") if p.is_file())
                                         if local.is_dir() else [local])
        return ident
    files = local_files(source, format)
    root = Path(source).expanduser()
    return {"path": str(root.resolve()), "files": _file_stats(root, [p for p, _ in files])}


def _file_stats(root: Path, files: list[Path]) -> list[list[Any]]:
    stats = []
    for path in files:
        st = path.stat()
        rel = str(path.relative_to(root)) if path != root else path.name
        stats.append([rel, st.st_size, st.st_mtime_ns])
    return stats
