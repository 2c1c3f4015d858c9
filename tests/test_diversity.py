"""distinct-n and repetition on hand-made examples."""

from __future__ import annotations

import pytest

from picollm.diversity import distinct_n, diversity_report, repetition_rate
from picollm.errors import UserError


class CharTokenizer:
    """One token per character."""

    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_distinct_1_and_2_by_hand():
    texts = ["the cat sat", "the dog sat"]
    # unigrams: the cat sat the dog sat -> 6 total, {the, cat, sat, dog} = 4 distinct
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat)(cat sat)(the dog)(dog sat) -> 4 total, all distinct
    assert distinct_n(texts, 2) == pytest.approx(1.0)
    # trigrams: one per text, different
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    # no 4-grams at all: undefined, not 0 (0 would read as "no variety")
    assert distinct_n(texts, 4) is None


def test_distinct_pools_over_texts_and_never_crosses_them():
    # identical continuations: every n-gram of the second repeats the first
    assert distinct_n(["a b c", "a b c"], 2) == pytest.approx(2 / 4)
    # "x y" + "z": no bigram (y z) across the boundary
    assert distinct_n(["x y", "z"], 2) == pytest.approx(1.0)
    # whitespace split: punctuation stays on the word, case kept
    assert distinct_n(["Dog dog dog."], 1) == pytest.approx(1.0)
    assert distinct_n(["a  b\n\ta"], 1) == pytest.approx(2 / 3)


def test_distinct_tokens():
    tok = CharTokenizer()
    assert distinct_n(["aab"], 1, unit="token", tokenizer=tok) == pytest.approx(2 / 3)
    assert distinct_n(["abab"], 2, unit="token", tokenizer=tok) == pytest.approx(2 / 3)  # ab ba ab
    with pytest.raises(UserError, match="tokenizer"):
        distinct_n(["a"], 1, unit="token")


def test_repetition_rate_by_hand():
    loop = "the dog ran . the dog ran . the dog ran ."
    # 12 words -> 9 4-grams; distinct: (the dog ran .)(dog ran . the)(ran . the dog)(. the dog ran) = 4
    assert repetition_rate([loop]) == pytest.approx(5 / 9)
    assert repetition_rate(["a b c d e f"]) == 0.0
    # repeats across texts do not count, only within one
    assert repetition_rate(["a b c d", "a b c d"]) == 0.0
    # pooled: 5 repeats of 9 + 0 of 3
    assert repetition_rate([loop, "a b c d e f"]) == pytest.approx(5 / 12)
    assert repetition_rate(["a a a"], n=1) == pytest.approx(2 / 3)
    assert repetition_rate([]) is None and repetition_rate(["a b c"]) is None


def test_bad_arguments():
    with pytest.raises(UserError):
        distinct_n(["a"], 0)
    with pytest.raises(UserError):
        distinct_n("not a list", 1)
    with pytest.raises(UserError):
        distinct_n(["a"], 1, unit="char")


def test_report():
    report = diversity_report(["the cat sat", "the dog sat"], tokenizer=CharTokenizer())
    assert report["word_distinct_1"] == pytest.approx(4 / 6)
    assert report["word_distinct_5"] is None and report["word_distinct_3"] == pytest.approx(1.0)
    assert report["token_distinct_1"] == pytest.approx(len(set("the cat sat" + "the dog sat")) / 22)
    assert report["repetition_4"] is None  # no text has 4 words
    assert report["texts"] == 2 and report["words"] == 6 and report["tokens"] == 22
    assert "token_distinct_3" not in diversity_report(["a"])
