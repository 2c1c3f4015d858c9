"""Reference models computed exactly from the training split: a unigram and a smoothed bigram.

They answer "did this run learn anything beyond token frequencies and the previous token?". Both are
scored on exactly the targets `picollm.evaluation.evaluate_tokens` scores on a full split: every token
of the packed stream but the first (N - 1 targets for N tokens). A window of the evaluation always reads
at least the token just before its target, so the bigram's context (the previous token) is always one
the models see too, across window and story boundaries alike (a story's leading eot is a target, and it
is the context of the story's first token). Bits per byte divide the total NLL in bits by the split's
bytes (`num_bytes`: UTF-8 bytes of the stories + 1 per story), as the evaluation does on a full split.

- unigram: p(b) = (count(b) + 1) / (N + V) over the training tokens. With a BPE vocabulary learned on
  the training split almost every token occurs; the add-one only keeps a token never seen in training
  (possible with the GPT-2 vocabulary) from scoring infinity, and changes the loss by far less than
  0.001 nats on the quick data.
- bigram, add-k: p(b | a) = (count(a, b) + k) / (count(a) + k V), count(a) = how often a is followed by
  anything, k chosen on the validation split from a log grid (1e-4 .. 1, 3 points per decade).
- bigram, interpolated: p(b | a) = lam count(a, b) / count(a) + (1 - lam) p_unigram(b) (the unigram
  alone where count(a) = 0), lam in [0, 0.999] chosen on the validation split (a convex problem:
  golden-section search).

"The bigram baseline" is the better of the two on validation NLL. Choosing the smoothing on the
validation split makes its validation loss slightly optimistic; the test split is untouched.

Counts are sparse: each pair (a, b) is the integer a * V + b, counted with `np.unique` a chunk of the
stream at a time and merged, so the GPT-2 vocabulary (V^2 = 2.5e9 possible pairs) on the full dataset
needs memory for the pairs that occur only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from picollm.data.prepared import BASELINES_FILE
from picollm.fileio import write_json_atomic

FORMAT = 1
CHUNK = 1 << 24  # tokens per counting chunk
ADD_K_GRID = tuple(float(f"{10 ** (e / 3):.2g}") for e in range(-12, 1))  # 1e-4 .. 1, 3 per decade


@dataclass
class BigramCounts:
    """Sparse pair counts of a token stream: sorted keys a * V + b, their counts, and per-token counts."""

    vocab_size: int
    keys: np.ndarray  # int64, sorted, unique
    counts: np.ndarray  # int64, same length
    unigram: np.ndarray  # int64 [V]: occurrences of each token as a target (positions 1..N-1)
    context: np.ndarray  # int64 [V]: occurrences of each token as a context (positions 0..N-2)
    targets: int  # N - 1

    def pair_counts(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """count(a, b) for arrays of contexts and targets (0 for pairs never seen)."""
        query = a.astype(np.int64) * self.vocab_size + b.astype(np.int64)
        where = np.searchsorted(self.keys, query)
        where = np.minimum(where, max(len(self.keys) - 1, 0))
        found = (self.keys[where] == query) if len(self.keys) else np.zeros(len(query), dtype=bool)
        return np.where(found, self.counts[where] if len(self.keys) else 0, 0)


def count_bigrams(tokens: np.ndarray, vocab_size: int, chunk: int = CHUNK) -> BigramCounts:
    """Sparse bigram counts of a packed stream (pairs (tokens[t-1], tokens[t]) for t = 1..N-1)."""
    tokens = np.asarray(tokens)
    n = len(tokens)
    keys_parts: list[np.ndarray] = []
    count_parts: list[np.ndarray] = []
    unigram = np.zeros(vocab_size, dtype=np.int64)
    context = np.zeros(vocab_size, dtype=np.int64)
    for start in range(1, n, chunk):
        stop = min(n, start + chunk)
        b = np.asarray(tokens[start:stop], dtype=np.int64)
        a = np.asarray(tokens[start - 1:stop - 1], dtype=np.int64)
        unigram += np.bincount(b, minlength=vocab_size)
        context += np.bincount(a, minlength=vocab_size)
        k, c = np.unique(a * vocab_size + b, return_counts=True)
        keys_parts.append(k)
        count_parts.append(c.astype(np.int64))
        if len(keys_parts) >= 8:  # merge now and then, so memory follows the distinct pairs
            merged_keys, merged_counts = _merge(keys_parts, count_parts)
            keys_parts, count_parts = [merged_keys], [merged_counts]
    keys, counts = _merge(keys_parts, count_parts) if keys_parts else \
        (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    return BigramCounts(vocab_size, keys, counts, unigram, context, max(0, n - 1))


def _merge(keys_parts: list[np.ndarray], count_parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate(keys_parts)
    counts = np.concatenate(count_parts)
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64)


@dataclass
class Scored:
    """What a baseline needs per target of a split: the pair count, the context count, the unigram p."""

    pair: np.ndarray  # count(a, b)
    context: np.ndarray  # count(a)
    unigram: np.ndarray  # p_unigram(b)

    def add_k(self, k: float, vocab_size: int) -> np.ndarray:
        return -np.log((self.pair + k) / (self.context + k * vocab_size))

    def interpolated(self, lam: float) -> np.ndarray:
        ml = np.divide(self.pair, self.context, out=np.zeros(len(self.pair)), where=self.context > 0)
        weight = np.where(self.context > 0, lam, 0.0)
        return -np.log(weight * ml + (1.0 - weight) * self.unigram)


def unigram_probs(counts: BigramCounts) -> np.ndarray:
    return (counts.unigram + 1.0) / (counts.targets + counts.vocab_size)


def score_targets(counts: BigramCounts, tokens: np.ndarray) -> Scored:
    tokens = np.asarray(tokens, dtype=np.int64)
    a, b = tokens[:-1], tokens[1:]
    return Scored(counts.pair_counts(a, b).astype(np.float64), counts.context[a].astype(np.float64),
                  unigram_probs(counts)[b])


def _golden_min(f: Any, lo: float, hi: float, tol: float = 1e-4) -> float:
    """The minimum of a convex function on [lo, hi] by golden-section search."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def _split_result(nll: np.ndarray, num_bytes: int | None) -> dict[str, Any]:
    total = float(nll.sum())
    mean = total / max(1, len(nll))
    return {"nll": mean, "ppl": math.exp(mean) if mean < 709 else float("inf"),
            "bpb": None if not num_bytes else total / math.log(2) / num_bytes, "tokens": int(len(nll))}


def compute_baselines(train: np.ndarray, splits: dict[str, tuple[np.ndarray, int | None]],
                      vocab_size: int) -> dict[str, Any]:
    """The unigram, add-k bigram and interpolated bigram of `train`, scored on each split in `splits`
    ({name: (tokens, bytes)}; "val" is required: it chooses the smoothing)."""
    counts = count_bigrams(train, vocab_size)
    scored = {name: score_targets(counts, tokens) for name, (tokens, _) in splits.items() if len(tokens) >= 2}
    if "val" not in scored:
        raise ValueError("the validation split is needed to choose the bigram's smoothing")
    val = scored["val"]
    k = min(ADD_K_GRID, key=lambda kk: float(val.add_k(kk, vocab_size).mean()))
    lam = _golden_min(lambda x: float(val.interpolated(x).mean()), 0.0, 0.999)  # 1 would give 0 to unseen pairs
    models: dict[str, dict[str, Any]] = {
        "unigram": {"name": "unigram", "smoothing": "add-one"},
        "bigram_add_k": {"name": f"bigram (add-{k:g})", "smoothing": f"add-k, k = {k:g} chosen on val", "k": k},
        "bigram_interpolated": {"name": f"bigram (interpolated, λ = {lam:.3f})",
                                "smoothing": f"interpolated with the unigram, λ = {lam:.3f} chosen on val",
                                "lambda": lam},
    }
    for name, s in scored.items():
        num_bytes = splits[name][1]
        uni = -np.log(s.unigram)
        models["unigram"][name] = _split_result(uni, num_bytes)
        models["bigram_add_k"][name] = _split_result(s.add_k(k, vocab_size), num_bytes)
        models["bigram_interpolated"][name] = _split_result(s.interpolated(lam), num_bytes)
    best = min(("bigram_add_k", "bigram_interpolated"), key=lambda m: models[m]["val"]["nll"])
    return {"format": FORMAT, "vocab_size": vocab_size, "train_tokens": int(len(train)),
            "distinct_pairs": int(len(counts.keys)), "models": models, "bigram": best}


def baselines_for(prepared: Any) -> dict[str, Any]:
    """`compute_baselines` on a PreparedData (train counts; val and test scored)."""
    splits = {s: (prepared.tokens(s), prepared.num_bytes(s)) for s in ("val", "test")}
    record = compute_baselines(prepared.tokens("train"), splits, prepared.tokenizer.vocab_size)
    record["data"] = prepared.directory.name
    record["tokenizer"] = prepared.tokenizer.name
    return record


def did_not_train_threshold(record: dict[str, Any]) -> float:
    """Validation NLL above which a run has not closed half the gap from the unigram to the bigram."""
    uni = record["models"]["unigram"]["val"]["nll"]
    bi = record["models"][record["bigram"]]["val"]["nll"]
    return uni - 0.5 * (uni - bi)


def cached_baselines(prepared: Any) -> dict[str, Any]:
    """`baselines_for(prepared)`, kept beside the prepared data (computed once per prepared dataset; a
    cache that cannot be written, read-only or shared, is read as it is, and the baselines are computed
    again each time)."""
    path = prepared.directory / BASELINES_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and record.get("format") == FORMAT and record.get("models"):
            return record
    except (OSError, ValueError):
        pass  # missing or damaged: computed again below
    record = baselines_for(prepared)
    try:
        write_json_atomic(path, record)
    except OSError:  # not writable by this user (EACCES), a read-only filesystem (EROFS), a full disk: a cache only
        pass
    return record
