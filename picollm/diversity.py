"""Diversity of generated text: distinct-n (Li et al., 2016) and within-text repetition.

Units: "word" n-grams split each text on whitespace (`str.split()`: punctuation stays attached to
its word, case is kept); "token" n-grams use a tokenizer's ids. N-grams never cross from one text
into another.

- distinct-n = (number of different n-grams) / (number of n-grams), pooled over all texts: an
  n-gram that two continuations share counts once in the numerator. 1.0 = no n-gram occurs twice
  anywhere; texts shorter than n contribute nothing. With no n-gram at all (every text shorter than n
  words) the value is undefined: None, shown as n/a, never 0.0 (which would read as "no variety at all").
- repetition-n = (n-gram occurrences that repeat an n-gram seen earlier in the same text) /
  (n-grams), pooled over all texts; equivalently 1 - sum_i distinct_i / sum_i total_i with the
  counts taken per text. It measures degenerate loops inside one continuation ("the dog ran. the dog
  ran. ..."), not similarity between continuations. 0.0 = no text repeats itself; None = no n-gram.
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


def _ratio(part: int, total: int) -> float | None:
    return part / total if total else None  # no n-gram: undefined, not 0


def distinct_n(texts: Sequence[str], n: int, unit: str = "word", tokenizer: Any = None) -> float | None:
    """Distinct n-grams / total n-grams, pooled over `texts` (None when there is no n-gram)."""
    _check_n(n)
    return _ratio(*_distinct(_units(texts, unit, tokenizer), n))


def repetition_rate(texts: Sequence[str], n: int = 4, unit: str = "word", tokenizer: Any = None) -> float | None:
    """Share of n-gram occurrences that repeat an earlier n-gram of the same text, pooled over `texts`
    (None when there is no n-gram)."""
    _check_n(n)
    return _ratio(*_repeated(_units(texts, unit, tokenizer), n))


def diversity_report(texts: Sequence[str], tokenizer: Any = None, max_n: int = 5,
                     repetition_n: int = 4) -> dict[str, float | int | None]:
    """distinct-1..max_n on words (`word_distinct_N`) and, with a tokenizer, on tokens
    (`token_distinct_N`), word repetition (`repetition_4`), and the counts behind them
    (`texts`, `words`, `tokens`, `mean_words`). A rate with no n-gram to count is None."""
    words = _units(texts, "word")
    report: dict[str, float | int | None] = {}
    for n in range(1, max_n + 1):
        report[f"word_distinct_{n}"] = _ratio(*_distinct(words, n))
    if tokenizer is not None:
        tokens = _units(texts, "token", tokenizer)
        for n in range(1, max_n + 1):
            report[f"token_distinct_{n}"] = _ratio(*_distinct(tokens, n))
        report["tokens"] = sum(len(t) for t in tokens)
    report[f"repetition_{repetition_n}"] = _ratio(*_repeated(words, repetition_n))
    report["texts"] = len(words)
    report["words"] = sum(len(w) for w in words)
    report["mean_words"] = report["words"] / len(words) if words else 0.0
    return report
