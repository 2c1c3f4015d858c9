"""The original study's claims, each checked against this study's numbers.

A claim is a list of checks, each comparing two numbers in an expected direction ("a < b"). A check
*agrees* when the difference has the expected sign and exceeds the noise, *disagrees* when it has the
opposite sign and exceeds the noise, and is *within noise* otherwise. The noise is the seeds' spread when
both sides have two or more seeds (the std of the per-seed differences, or sqrt(std_a^2 + std_b^2) when
the seeds do not pair up), else the study's tolerance (`findings:` in the study YAML: 0.01 nats for
losses, 0.01 for distinct-n and repetition rates, 10% for tokens-to-reference and roughness).

A claim agrees when all its checks agree, disagrees when any check disagrees, and is within noise
otherwise; a claim whose groups or runs are missing is "not checked".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from picollm.study.results import Entry, GroupResult, Stat, StudyResults, stat_diff
from picollm.study.spec import tags_match

AGREES, DISAGREES, NOISE, UNCHECKED = "agrees", "disagrees", "within noise", "not checked"
SIZES = ("pico", "tiny", "small", "base")


@dataclass
class Check:
    text: str  # what was compared, with the numbers
    verdict: str


@dataclass
class Finding:
    claim: str
    verdict: str
    checks: list[Check] = field(default_factory=list)
    note: str = ""

    @property
    def evidence(self) -> str:
        parts = [f"{c.text} ({c.verdict})" for c in self.checks]
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


def _combine(checks: list[Check]) -> str:
    if not checks:
        return UNCHECKED
    verdicts = [c.verdict for c in checks]
    if DISAGREES in verdicts:
        return DISAGREES
    if all(v == AGREES for v in verdicts):
        return AGREES
    return NOISE


def _noise(a: Stat, b: Stat, tolerance: float) -> float:
    if a.n >= 2 and b.n >= 2:
        d = stat_diff(a, b)
        if d.n >= 2 and d.std is not None:
            return d.std
        return math.sqrt((a.std or 0.0) ** 2 + (b.std or 0.0) ** 2)
    return tolerance


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "—"
    if unit == "tokens":
        return f"{x:,.0f}"
    if unit == "nats":
        return f"{x:.3f}"
    return f"{x:.3f}"


class Checker:
    def __init__(self, results: StudyResults) -> None:
        self.results = results
        spec = results.record.get("findings") or {}
        self.loss_tol = float(spec.get("loss_tolerance", 0.01))
        self.distinct_tol = float(spec.get("distinct_tolerance", 0.01))
        self.little = float(spec.get("little", 0.05))
        self.conv_tol = float(spec.get("convergence_tolerance", 0.1))
        self.smooth_tol = float(spec.get("smoothness_tolerance", 0.1))

    # -- one comparison -----------------------------------------------------------------------
    def less(self, a_name: str, a: Stat, b_name: str, b: Stat, what: str, unit: str = "nats",
             relative: float | None = None) -> Check | None:
        """Expect a < b. `relative`: the tolerance is that fraction of the larger mean (else by unit)."""
        if not a or not b:
            return None
        diff = a.mean - b.mean  # type: ignore[operator]
        if relative is not None:
            tolerance = relative * max(abs(a.mean), abs(b.mean))  # type: ignore[arg-type]
        else:
            tolerance = self.loss_tol if unit == "nats" else self.distinct_tol
        noise = _noise(a, b, tolerance)
        verdict = AGREES if diff < -noise else DISAGREES if diff > noise else NOISE
        text = f"{what}: {a_name} {_fmt(a.mean, unit)} vs {b_name} {_fmt(b.mean, unit)}"
        return Check(text, verdict)

    # -- helpers --------------------------------------------------------------------------------
    def entries(self, group: str, **where: Any) -> list[Entry]:
        g = self.results.group(group)
        if g is None:
            return []
        return [e for e in g.entries if tags_match(e.tags, where)]

    def one(self, group: str, **where: Any) -> Entry | None:
        found = self.entries(group, **where)
        return found[0] if len(found) == 1 else None

    def by_size(self, group: str, **where: Any) -> list[Entry]:
        found = [e for e in self.entries(group, **where) if e.tags.get("size") in SIZES]
        return sorted(found, key=lambda e: SIZES.index(e.tags["size"]))

    def strategy(self, kind: str, top_p: float | None = None) -> str | None:
        """The study's name for a decoding strategy (greedy, or top-p with a given p)."""
        for name, kwargs in (self.results.eval_settings.get("strategies") or {}).items():
            if kwargs.get("strategy") != kind:
                continue
            if top_p is None or abs(float(kwargs.get("top_p", 0.9)) - top_p) < 1e-9:
                return name
        return None

    # -- claims -----------------------------------------------------------------------------------
    def larger_is_better(self, family: str, label: str) -> Finding:
        """Size group, consecutive sizes of `family` (per input for the k-gram): test NLL and tokens to
        reference both lower for the larger model."""
        claim = f"Larger {label} converge quicker and reach lower test perplexity."
        checks: list[Check | None] = []
        variants: list[dict[str, Any]] = [{}]
        if family == "kgram":
            variants = [{"input": "onehot"}, {"input": "scaled"}]
        for extra in variants:
            entries = self.by_size("size", family=family, **extra)
            suffix = f" ({extra['input']})" if "input" in extra else ""
            for small, large in zip(entries, entries[1:]):
                checks.append(self.less(large.label, large.get("test_nll"), small.label, small.get("test_nll"),
                                        f"test NLL{suffix}"))
                checks.append(self.less(large.label, large.get("tokens_to_ref"), small.label,
                                        small.get("tokens_to_ref"), f"tokens to reference{suffix}", "tokens",
                                        relative=self.conv_tol))
        return self.finding(claim, checks)

    def finding(self, claim: str, checks: list[Check | None], note: str = "") -> Finding:
        done = [c for c in checks if c is not None]
        return Finding(claim, _combine(done), done, note if done else (note or "the runs it needs are missing"))

    def onehot_beats_scaled(self) -> Finding:
        checks: list[Check | None] = []
        for size in SIZES:
            one, sc = self.one("size", family="kgram", size=size, input="onehot"), \
                self.one("size", family="kgram", size=size, input="scaled")
            if one and sc:
                checks.append(self.less(one.label, one.get("test_nll"), sc.label, sc.get("test_nll"), "test NLL"))
        return self.finding("One-hot inputs give lower test perplexity than scaled embeddings.", checks)

    def gap(self, a: Entry, b: Entry, metric: str) -> Stat:
        """b - a per seed (positive: a is better)."""
        return stat_diff(b.get(metric), a.get(metric))

    def onehot_gap_shrinks(self) -> Finding:
        gaps: list[tuple[str, Stat]] = []
        for size in SIZES:
            one, sc = self.one("size", family="kgram", size=size, input="onehot"), \
                self.one("size", family="kgram", size=size, input="scaled")
            if one and sc and one.get("test_nll") and sc.get("test_nll"):
                gaps.append((size, self.gap(one, sc, "test_nll")))
        checks = [self.less(f"gap at {s2}", g2, f"gap at {s1}", g1, "scaled − one-hot test NLL")
                  for (s1, g1), (s2, g2) in zip(gaps, gaps[1:])]
        return self.finding("The one-hot advantage shrinks as the model grows.", checks)

    def raising_k(self) -> Finding:
        checks: list[Check | None] = []
        for inp in ("onehot", "scaled"):
            es = sorted(self.entries("kgram", input=inp), key=lambda e: int(e.tags.get("k", 0)))
            for lo, hi in zip(es, es[1:]):
                checks.append(self.less(hi.label, hi.get("val_nll"), lo.label, lo.get("val_nll"),
                                        f"validation NLL ({inp})"))
        return self.finding("Raising K (1 → 3 → 5) lowers validation loss.", checks)

    def scaled_smoother(self) -> Finding:
        checks: list[Check | None] = []
        for k in sorted({int(e.tags.get("k", 0)) for e in self.entries("kgram")}):
            one, sc = self.one("kgram", k=k, input="onehot"), self.one("kgram", k=k, input="scaled")
            if one and sc:
                checks.append(self.less(sc.label, sc.get("roughness"), one.label, one.get("roughness"),
                                        "roughness", "ratio", relative=self.smooth_tol))
        return self.finding("Scaled-embedding curves are smoother than one-hot curves.", checks,
                            note="roughness = std of successive validation-loss differences over the second "
                                 "half of the run")

    def k5_onehot_best(self) -> Finding:
        best = self.one("kgram", k=5, input="onehot")
        checks: list[Check | None] = []
        if best:
            for e in self.entries("kgram"):
                if e is not best:
                    checks.append(self.less(best.label, best.get("val_nll"), e.label, e.get("val_nll"),
                                            "validation NLL"))
        return self.finding("K = 5 with one-hot inputs is the best k-gram pico.", checks)

    def gap_grows_with_k(self) -> Finding:
        gaps: list[tuple[int, Stat]] = []
        for k in sorted({int(e.tags.get("k", 0)) for e in self.entries("kgram")}):
            one, sc = self.one("kgram", k=k, input="onehot"), self.one("kgram", k=k, input="scaled")
            if one and sc and one.get("val_nll") and sc.get("val_nll"):
                gaps.append((k, self.gap(one, sc, "val_nll")))
        checks = [self.less(f"gap at K={k1}", g1, f"gap at K={k2}", g2, "scaled − one-hot validation NLL")
                  for (k1, g1), (k2, g2) in zip(gaps, gaps[1:])]
        return self.finding("The one-hot vs scaled gap grows with K.", checks)

    def norm_pos_little(self) -> Finding:
        es = [e for e in self.entries("transformer") if e.get("val_nll")]
        if len(es) < 2:
            return self.finding("Normalisation and position encoding change validation loss little.", [])
        lo = min(es, key=lambda e: e.get("val_nll").mean)  # type: ignore[arg-type, return-value]
        hi = max(es, key=lambda e: e.get("val_nll").mean)  # type: ignore[arg-type, return-value]
        spread = hi.get("val_nll").mean - lo.get("val_nll").mean  # type: ignore[operator]
        noise = _noise(hi.get("val_nll"), lo.get("val_nll"), 0.0)
        verdict = AGREES if spread <= self.little + noise else DISAGREES
        check = Check(f"validation NLL spread {spread:.3f} nats ({lo.label} {lo.get('val_nll').mean:.3f} to "
                      f"{hi.label} {hi.get('val_nll').mean:.3f}); 'little' = at most {self.little:g} nats",
                      verdict)
        return self.finding("Normalisation and position encoding change validation loss little.", [check])

    def _by_pos(self, metric: str) -> dict[str, Stat]:
        out: dict[str, Stat] = {}
        for pos in ("absolute", "rope", "nope"):
            values = [e.get(metric).mean for e in self.entries("transformer", pos=pos) if e.get(metric)]
            if values:
                out[pos] = Stat(values)  # the mean over norms (pre, post) per seed-mean
        return out

    def positions_diversity(self) -> Finding:
        d = self._by_pos("diversity")
        checks: list[Check | None] = []
        if "absolute" in d:
            for other in ("rope", "nope"):
                if other in d:
                    checks.append(self.less(other, _mean_only(d[other]), "absolute", _mean_only(d["absolute"]),
                                            "diversity score (mean over norms)", "ratio"))
        if "nope" in d and "rope" in d:
            checks.append(self.less("nope", _mean_only(d["nope"]), "rope", _mean_only(d["rope"]),
                                    "diversity score (mean over norms)", "ratio"))
        return self.finding("Absolute positions give the highest diversity and NoPE the lowest.", checks,
                            note="diversity score = mean word distinct-1..5 under "
                                 f"{self.results.diversity_strategy}")

    def pre_absolute_best(self) -> Finding:
        best = self.one("transformer", norm="pre", pos="absolute")
        checks: list[Check | None] = []
        if best:
            for e in self.entries("transformer"):
                if e is not best:
                    checks.append(self.less(best.label, best.get("test_nll"), e.label, e.get("test_nll"),
                                            "test NLL"))
        return self.finding("Pre-norm with absolute positions gives the lowest perplexity.", checks)

    def pico_order(self) -> Finding:
        lstm, kgram, tf = (self.one("best", family=f) for f in ("lstm", "kgram", "transformer"))
        checks: list[Check | None] = []
        if lstm and tf:
            checks.append(self.less(lstm.label, lstm.get("test_nll"), tf.label, tf.get("test_nll"), "test NLL"))
        if tf and kgram:
            checks.append(self.less(tf.label, tf.get("test_nll"), kgram.label, kgram.get("test_nll"), "test NLL"))
        if lstm and kgram and not tf:
            checks.append(self.less(lstm.label, lstm.get("test_nll"), kgram.label, kgram.get("test_nll"),
                                    "test NLL"))
        return self.finding("Among the pico models the LSTM has the lowest test perplexity, the k-gram MLP the "
                            "highest, the Transformer in between.", checks)

    def kgram_most_diverse(self) -> Finding:
        kgram = self.one("best", family="kgram")
        checks: list[Check | None] = []
        if kgram:
            for other in ("lstm", "transformer"):
                e = self.one("best", family=other)
                if e:
                    checks.append(self.less(e.label, e.get("diversity"), kgram.label, kgram.get("diversity"),
                                            "diversity score", "ratio"))
        return self.finding("Among the pico models the k-gram MLP writes the most diverse text.", checks,
                            note=f"diversity score = mean word distinct-1..5 under {self.results.diversity_strategy}")

    def greedy_repeats(self) -> Finding:
        greedy = self.strategy("greedy")
        others = [s for s in (self.strategy("top-p", 0.9), self.strategy("top-p", 1.0)) if s]
        checks: list[Check | None] = []
        if greedy:
            for e in self.entries("decoding"):
                for other in others:
                    checks.append(self.less(f"{other}", e.get(f"{other}:repetition_4"), "greedy",
                                            e.get(f"{greedy}:repetition_4"), f"{e.label} repetition-4", "ratio"))
        return self.finding("Greedy decoding repeats phrases most.", checks,
                            note="repetition-4 = share of word 4-grams that repeat an earlier 4-gram of the same text")

    def top_p1_most_diverse(self) -> Finding:
        top1 = self.strategy("top-p", 1.0)
        others = [s for s in (self.strategy("greedy"), self.strategy("top-p", 0.9)) if s]
        checks: list[Check | None] = []
        if top1:
            for e in self.entries("decoding"):
                for other in others:
                    checks.append(self.less(other, e.get(f"{other}:score"), top1, e.get(f"{top1}:score"),
                                            f"{e.label} diversity score", "ratio"))
        return self.finding("Top-p 1.0 is the most diverse strategy.", checks)

    def all(self) -> list[Finding]:
        return [
            self.larger_is_better("lstm", "LSTMs"),
            self.larger_is_better("kgram", "k-gram MLPs"),
            self.onehot_beats_scaled(),
            self.onehot_gap_shrinks(),
            self.raising_k(),
            self.scaled_smoother(),
            self.k5_onehot_best(),
            self.gap_grows_with_k(),
            self.larger_is_better("transformer", "Transformers"),
            self.norm_pos_little(),
            self.positions_diversity(),
            self.pre_absolute_best(),
            self.pico_order(),
            self.kgram_most_diverse(),
            self.greedy_repeats(),
            self.top_p1_most_diverse(),
        ]


def _mean_only(stat: Stat) -> Stat:
    """A mean over configurations (not seeds): compared with the tolerance, not its spread."""
    return Stat([stat.mean]) if stat else stat


def check_claims(results: StudyResults) -> list[Finding]:
    """Every claim of the original study, checked against `results`."""
    return Checker(results).all()


def observations(results: StudyResults) -> list[str]:
    """What the groups beyond the original study show (no claim to check): the equal-parameter group."""
    out = []
    group: GroupResult | None = results.group("equal")
    if group and group.entries:
        ranked = sorted((e for e in group.entries if e.get("test_nll")), key=lambda e: e.get("test_nll").mean)
        if ranked:
            parts = [f"{e.label} {e.get('test_nll').mean:.3f} ({_count(e.get('params').mean)} parameters, "
                     f"{_count(e.get('params_ne').mean)} non-embedding)" for e in ranked]
            out.append("At equal total parameter count, test NLL from best to worst: " + ", ".join(parts) + ".")
    return out


def _count(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.0f}K"
    return f"{x:.0f}"
