"""Diversity of generated text: distinct-n (Li et al., 2016) and within-text repetition.

Units: "word" n-grams split each text on whitespace (`str.split()`: punctuation stays attached to
its word, case is kept); "token" n-grams use a tokenizer's ids. N-grams never cross from one text
into another.

- distinct-n = (number of different n-grams) / (number of n-grams), pooled over all texts: an
  n-gram that two continuations share counts once in the numerator. 1.0 = no n-gram occurs twice
  anywhere; texts shorter than n contribute nothing; with no n-gram at all the value is 0.0.
- repetition-n = (n-gram occurrences that repeat an n-gram seen earlier in the same text) /
  (n-grams), pooled over all texts; equivalently 1 - sum_i distinct_i / sum_i total_i with the
  counts taken per text. It measures degenerate loops inside one continuation ("the dog ran. the dog
  ran. ..."), not similarity between continuations. 0.0 = no text repeats itself (and no n-gram).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from picollm.errors import UserError

Units = list[list[Any]]


def _units(texts: Sequence[str], unit: str, tokenizer: Any = None) -> Units:
    if isinstance(texts, str):
        raise UserError("pass a list of texts, not one string")
    if unit == "word":
        return [t.split() for t in texts]
    if unit == "token":
        if tokenizer is None:
            raise UserError("token-level diversity needs a tokenizer")
        return [list(tokenizer.encode(t)) for t in texts]
    raise UserError(f"unit must be 'word' or 'token', got {unit!r}")


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"n must be an integer >= 1, got {n!r}")


def _ngrams(seq: Sequence[Any], n: int) -> list[tuple[Any, ...]]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def _distinct(units: Units, n: int) -> tuple[int, int]:
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for seq in units:
        grams = _ngrams(seq, n)
        total += len(grams)
        seen.update(grams)
    return len(seen), total


def _repeated(units: Units, n: int) -> tuple[int, int]:
    repeated = total = 0
    for seq in units:
        grams = _ngrams(seq, n)
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated, total


def distinct_n(texts: Sequence[str], n: int, unit: str = "word", tokenizer: Any = None) -> float:
    """Distinct n-grams / total n-grams, pooled over `texts` (0.0 when there is no n-gram)."""
    _check_n(n)
    distinct, total = _distinct(_units(texts, unit, tokenizer), n)
    return distinct / total if total else 0.0


def repetition_rate(texts: Sequence[str], n: int = 4, unit: str = "word", tokenizer: Any = None) -> float:
    """Share of n-gram occurrences that repeat an earlier n-gram of the same text, pooled over `texts`."""
    _check_n(n)
    repeated, total = _repeated(_units(texts, unit, tokenizer), n)
    return repeated / total if total else 0.0


def diversity_report(texts: Sequence[str], tokenizer: Any = None, max_n: int = 5,
                     repetition_n: int = 4) -> dict[str, float | int]:
    """distinct-1..max_n on words (`word_distinct_N`) and, with a tokenizer, on tokens
    (`token_distinct_N`), word repetition (`repetition_4`), and the counts behind them
    (`texts`, `words`, `tokens`, `mean_words`)."""
    words = _units(texts, "word")
    report: dict[str, float | int] = {}
    for n in range(1, max_n + 1):
        d, t = _distinct(words, n)
        report[f"word_distinct_{n}"] = d / t if t else 0.0
    if tokenizer is not None:
        tokens = _units(texts, "token", tokenizer)
        for n in range(1, max_n + 1):
            d, t = _distinct(tokens, n)
            report[f"token_distinct_{n}"] = d / t if t else 0.0
        report["tokens"] = sum(len(t) for t in tokens)
    r, t = _repeated(words, repetition_n)
    report[f"repetition_{repetition_n}"] = r / t if t else 0.0
    report["texts"] = len(words)
    report["words"] = sum(len(w) for w in words)
    report["mean_words"] = report["words"] / len(words) if words else 0.0
    return report
