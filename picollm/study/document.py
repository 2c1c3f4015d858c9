"""The report's document model (sections of paragraphs, tables and images), built once and rendered to
Markdown and HTML by `picollm.study.render`, and the number formatting every table uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picollm.study.runlog import Stat, finite


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    kind: str = ""  # "findings" colours its verdict column; "samples" wraps long text


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class Section:
    anchor: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    blocks: list[Table | Image | str] = field(default_factory=list)  # str = a paragraph among blocks


@dataclass
class Document:
    title: str
    intro: list[str]
    sections: list[Section]


# ---------------------------------------------------------------------------------------------
# numbers


def fmt_value(x: float | None, kind: str) -> str:
    if x is None or not finite(x):
        return "—"
    if kind == "int":
        return f"{x:,.0f}"
    if kind == "count":
        if abs(x) >= 1e6:
            return f"{x / 1e6:.2f}M"
        if abs(x) >= 1e4:
            return f"{x / 1e3:.0f}K"
        return f"{x:,.0f}"
    if kind == "s":
        return f"{x:.1f}" if abs(x) < 100 else f"{x:,.0f}"
    if kind == "ppl":
        return f"{x:.2f}" if abs(x) < 100 else f"{x:,.1f}"
    if kind == "lr":
        return f"{x:.2g}"
    if kind == "signed":
        return f"{x:+.3f}"
    return f"{x:.3f}"


def fmt_stat(stat: Stat, kind: str = "3") -> str:
    if not stat:
        return "—"
    text = fmt_value(stat.mean, kind)
    if stat.std is not None:
        text += f" ± {fmt_value(stat.std, '3' if kind == 'signed' else kind)}"
    return text




def fmt_rate(stat: Stat) -> str:
    """A distinct-n or repetition rate: n/a where no continuation had n words to count (undefined, not 0)."""
    return fmt_stat(stat) if stat else "n/a"


def show_value(v: Any, key: str = "") -> str:
    """A config value as the budget table prints it."""
    if v is None:
        return "all" if key == "data.num_stories" else "—"
    if isinstance(v, list):
        return "/".join(show_value(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)
