"""The original study's claims, each checked against this study's numbers.

A claim is a list of checks, each comparing two numbers in an expected direction ("a < b"); the rule that
makes a check agree, disagree or stay within noise is `picollm.study.verdicts` (the seeds' standard error
with a t factor, or the study's fixed tolerance with one seed). On top of it:

- a check that uses a run that did not train (its validation NLL has not closed half the gap from the
  unigram to the bigram baseline) is "inconclusive (RUN did not train)": it says nothing about the claim;
- a check whose runs are all worse than the bigram baseline says so in its evidence;
- every check on a final loss is recomputed with the full-split validation NLL at 25% and 50% of the
  runs' tokens; the claim's verdicts at 25%, 50% and the end form its trend ("disagrees → within noise →
  agrees"), and a claim whose verdict changes along the way is "not settled at this budget".

A claim agrees when all its checks agree, disagrees when any check disagrees, is inconclusive when a check
is and none disagrees, and is within noise otherwise; a claim whose groups or runs are missing is "not
checked".
"""

from __future__ import annotations

from typing import Any

from picollm.study.results import Entry, GroupResult, Stat, StudyResults, stat_diff
from picollm.study.spec import TREND_POINTS, tags_match
from picollm.study.verdicts import (
    AGREES,
    DISAGREES,
    INCONCLUSIVE,
    NOISE,
    NOT_SETTLED,
    UNCHECKED,
    Check,
    Finding,
    combine,
    compare,
    format_measurement,
)

__all__ = ["AGREES", "DISAGREES", "INCONCLUSIVE", "NOISE", "NOT_SETTLED", "UNCHECKED", "Check", "Finding",
           "check_claims", "observations"]
SIZES = ("pico", "tiny", "small", "base")


class Checker:
    """The claims checked at the end of the runs (`point` None) or with the full-split validation NLL at
    `point` (0.25, 0.5) of their tokens: then every final loss is replaced by that one."""

    def __init__(self, results: StudyResults, point: float | None = None) -> None:
        self.results = results
        self.point = point
        spec = results.record.get("findings") or {}
        self.loss_tol = float(spec.get("loss_tolerance", 0.01))
        self.distinct_tol = float(spec.get("distinct_tolerance", 0.01))
        self.little = float(spec.get("little", 0.05))
        self.conv_tol = float(spec.get("convergence_tolerance", 0.1))
        self.smooth_tol = float(spec.get("smoothness_tolerance", 0.1))
        self._loss_used = False

    def loss(self, entry: Entry, metric: str) -> Stat:
        """A final loss of `entry` (val_nll, test_nll), or during training the validation NLL at the point."""
        self._loss_used = True
        if self.point is None:
            return entry.get(metric)
        return entry.get(f"val_nll@{self.point:g}")

    # -- one comparison -----------------------------------------------------------------------
    def less(self, a_name: str, a: Stat, b_name: str, b: Stat, what: str, unit: str = "nats",
             relative: float | None = None, uses: tuple[Entry, ...] = ()) -> Check | None:
        """Expect a < b. `relative`: the tolerance is that fraction of the larger mean (else by unit).
        `uses`: the entries whose runs the numbers come from (did they train? beat the bigram?)."""
        if not a or not b:
            return None
        if relative is not None:
            tolerance = relative * max(abs(a.mean), abs(b.mean))  # type: ignore[arg-type]
        else:
            tolerance = self.loss_tol if unit == "nats" else self.distinct_tol
        key = f"{what}: {a_name} vs {b_name}"
        text = (f"{what}: {a_name} {format_measurement(a.mean, unit)} "
                f"vs {b_name} {format_measurement(b.mean, unit)}")
        note = _below_bigram(uses)
        untrained = [e.label for e in uses if e.untrained]
        if untrained:
            return Check(key, text, INCONCLUSIVE, untrained=sorted(set(untrained)), note=note)
        verdict, n = compare(a, b, tolerance)
        if n.se is not None:  # seeds: the threshold, as a student recomputes it
            text += (f", threshold max({format_measurement(tolerance, unit)}, "
                     f"{n.k:.2f} × SE {format_measurement(n.se, unit)}) = {format_measurement(n.threshold, unit)}")
        return Check(key, text, verdict, note=note)

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
                pair = (large, small)
                checks.append(self.less(large.label, self.loss(large, "test_nll"), small.label,
                                        self.loss(small, "test_nll"), f"test NLL{suffix}", uses=pair))
                checks.append(self.less(large.label, large.get("tokens_to_ref"), small.label,
                                        small.get("tokens_to_ref"), f"tokens to reference{suffix}", "tokens",
                                        relative=self.conv_tol, uses=pair))
        return self.finding(claim, checks)

    def finding(self, claim: str, checks: list[Check | None], note: str = "") -> Finding:
        done = [c for c in checks if c is not None]
        loss_based, self._loss_used = self._loss_used, False
        return Finding(claim, combine([c.verdict for c in done]), done,
                       note if done else (note or "the runs it needs are missing"), loss_based=loss_based)

    def kgram_pair(self, group: str, **where: Any) -> tuple[Entry | None, Entry | None]:
        return self.one(group, family="kgram", input="onehot", **where), \
            self.one(group, family="kgram", input="scaled", **where)

    def onehot_beats_scaled(self) -> Finding:
        checks: list[Check | None] = []
        for size in SIZES:
            one, sc = self.kgram_pair("size", size=size)
            if one and sc:
                checks.append(self.less(one.label, self.loss(one, "test_nll"), sc.label, self.loss(sc, "test_nll"),
                                        "test NLL", uses=(one, sc)))
        return self.finding("One-hot inputs give lower test perplexity than scaled embeddings.", checks)

    def gap(self, a: Entry, b: Entry, metric: str) -> Stat:
        """b - a per seed (positive: a is better)."""
        return stat_diff(self.loss(b, metric), self.loss(a, metric))

    def onehot_gap_shrinks(self) -> Finding:
        gaps: list[tuple[str, Stat, tuple[Entry, Entry]]] = []
        for size in SIZES:
            one, sc = self.kgram_pair("size", size=size)
            if one and sc and self.loss(one, "test_nll") and self.loss(sc, "test_nll"):
                gaps.append((size, self.gap(one, sc, "test_nll"), (one, sc)))
        checks = [self.less(f"gap at {s2}", g2, f"gap at {s1}", g1, "scaled − one-hot test NLL", uses=u1 + u2)
                  for (s1, g1, u1), (s2, g2, u2) in zip(gaps, gaps[1:])]
        return self.finding("The one-hot advantage shrinks as the model grows.", checks)

    def raising_k(self) -> Finding:
        checks: list[Check | None] = []
        for inp in ("onehot", "scaled"):
            es = sorted(self.entries("kgram", input=inp), key=lambda e: int(e.tags.get("k", 0)))
            for lo, hi in zip(es, es[1:]):
                checks.append(self.less(hi.label, self.loss(hi, "val_nll"), lo.label, self.loss(lo, "val_nll"),
                                        f"validation NLL ({inp})", uses=(hi, lo)))
        return self.finding("Raising K (1 → 3 → 5) lowers validation loss.", checks)

    def scaled_smoother(self) -> Finding:
        checks: list[Check | None] = []
        for k in sorted({int(e.tags.get("k", 0)) for e in self.entries("kgram")}):
            one, sc = self.kgram_pair("kgram", k=k)
            if one and sc:
                checks.append(self.less(sc.label, sc.get("roughness"), one.label, one.get("roughness"),
                                        "roughness", "ratio", relative=self.smooth_tol, uses=(sc, one)))
        return self.finding("Scaled-embedding curves are smoother than one-hot curves.", checks,
                            note="roughness = std of successive validation-loss differences over the second "
                                 "half of the run")

    def k5_onehot_best(self) -> Finding:
        best = self.one("kgram", k=5, input="onehot")
        checks: list[Check | None] = []
        if best:
            for e in self.entries("kgram"):
                if e is not best:
                    checks.append(self.less(best.label, self.loss(best, "val_nll"), e.label, self.loss(e, "val_nll"),
                                            "validation NLL", uses=(best, e)))
        return self.finding("K = 5 with one-hot inputs is the best k-gram pico.", checks)

    def gap_grows_with_k(self) -> Finding:
        gaps: list[tuple[int, Stat, tuple[Entry, Entry]]] = []
        for k in sorted({int(e.tags.get("k", 0)) for e in self.entries("kgram")}):
            one, sc = self.kgram_pair("kgram", k=k)
            if one and sc and self.loss(one, "val_nll") and self.loss(sc, "val_nll"):
                gaps.append((k, self.gap(one, sc, "val_nll"), (one, sc)))
        checks = [self.less(f"gap at K={k1}", g1, f"gap at K={k2}", g2, "scaled − one-hot validation NLL",
                            uses=u1 + u2) for (k1, g1, u1), (k2, g2, u2) in zip(gaps, gaps[1:])]
        return self.finding("The one-hot vs scaled gap grows with K.", checks)

    def norm_pos_little(self) -> Finding:
        claim = "Normalisation and position encoding change validation loss little."
        es = [e for e in self.entries("transformer") if self.loss(e, "val_nll")]
        if len(es) < 2:
            return self.finding(claim, [])
        lo = min(es, key=lambda e: self.loss(e, "val_nll").mean)  # type: ignore[arg-type, return-value]
        hi = max(es, key=lambda e: self.loss(e, "val_nll").mean)  # type: ignore[arg-type, return-value]
        a, b = self.loss(hi, "val_nll"), self.loss(lo, "val_nll")
        spread = a.mean - b.mean  # type: ignore[operator]
        # the spread is "little" unless it exceeds `little` by more than the noise allows
        excess = Stat([x - self.little for x in a.values]) if a.n == b.n else Stat([a.mean - self.little])
        verdict, _ = compare(b, excess, 0.0)  # lo < hi - little: the spread is larger than little
        verdict = DISAGREES if verdict == AGREES else AGREES
        text = f"validation NLL spread {spread:.3f} nats ({lo.label} {b.mean:.3f} to {hi.label} {a.mean:.3f}); " \
               f"'little' = at most {self.little:g} nats"
        untrained = sorted(e.label for e in es if e.untrained)
        if untrained:
            return self.finding(claim, [Check("validation NLL spread", text, INCONCLUSIVE, untrained=untrained)])
        return self.finding(claim, [Check("validation NLL spread", text, verdict, note=_below_bigram(tuple(es)))])

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

        def pair(a: str, b: str) -> Check | None:
            uses = tuple(self.entries("transformer", pos=a) + self.entries("transformer", pos=b))
            return self.less(a, _mean_only(d[a]), b, _mean_only(d[b]), "diversity score (mean over norms)", "ratio",
                             uses=uses)

        if "absolute" in d:
            for other in ("rope", "nope"):
                if other in d:
                    checks.append(pair(other, "absolute"))
        if "nope" in d and "rope" in d:
            checks.append(pair("nope", "rope"))
        return self.finding("Absolute positions give the highest diversity and NoPE the lowest.", checks,
                            note="diversity score = mean word distinct-1..5 under "
                                 f"{self.results.diversity_strategy}")

    def pre_absolute_best(self) -> Finding:
        best = self.one("transformer", norm="pre", pos="absolute")
        checks: list[Check | None] = []
        if best:
            for e in self.entries("transformer"):
                if e is not best:
                    checks.append(self.less(best.label, self.loss(best, "test_nll"), e.label,
                                            self.loss(e, "test_nll"), "test NLL", uses=(best, e)))
        return self.finding("Pre-norm with absolute positions gives the lowest perplexity.", checks)

    def pico_order(self) -> Finding:
        lstm, kgram, tf = (self.one("best", family=f) for f in ("lstm", "kgram", "transformer"))
        checks: list[Check | None] = []

        def pair(a: Entry, b: Entry) -> Check | None:
            return self.less(a.label, self.loss(a, "test_nll"), b.label, self.loss(b, "test_nll"), "test NLL",
                             uses=(a, b))

        if lstm and tf:
            checks.append(pair(lstm, tf))
        if tf and kgram:
            checks.append(pair(tf, kgram))
        if lstm and kgram and not tf:
            checks.append(pair(lstm, kgram))
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
                                            "diversity score", "ratio", uses=(e, kgram)))
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
                                            e.get(f"{greedy}:repetition_4"), f"{e.label} repetition-4", "ratio",
                                            uses=(e,)))
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
                                            f"{e.label} diversity score", "ratio", uses=(e,)))
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


def _below_bigram(uses: tuple[Entry, ...]) -> str:
    """"both below the bigram baseline" when every run compared is worse than the bigram on val NLL."""
    margins = [e.get("margin_bigram").mean for e in uses]
    if not uses or any(m is None for m in margins) or any(m <= 0 for m in margins):  # type: ignore[operator]
        return ""
    if len(uses) == 1:
        return f"{uses[0].label} is below the bigram baseline"
    return "both below the bigram baseline" if len(uses) == 2 else f"all {len(uses)} below the bigram baseline"


def check_claims(results: StudyResults) -> list[Finding]:
    """Every claim of the original study, checked against `results`, with its trend during training:
    the same checks on the full-split validation NLL at 25% and 50% of the tokens, then the end."""
    findings = Checker(results).all()
    during = [Checker(results, point).all() for point in TREND_POINTS]
    for i, finding in enumerate(findings):
        if not finding.loss_based or finding.verdict == UNCHECKED:
            continue
        earlier = [points[i] for points in during]
        if any(f.verdict == UNCHECKED for f in earlier):  # runs without full-split points (older logs)
            continue
        finding.trend = [f.verdict for f in earlier] + [finding.verdict]
        for check in finding.checks:
            verdicts = [next((c.verdict for c in f.checks if c.key == check.key), None) for f in earlier]
            if all(v is not None for v in verdicts):
                check.trend = [*verdicts, check.verdict]  # type: ignore[list-item]
    return findings


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
