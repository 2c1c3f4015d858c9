"""The rule that turns two numbers into a verdict, and the words for verdicts along a run.

A comparison expects one number below another (a < b). Let d = mean(a) - mean(b).

- With one seed on either side, the noise threshold is the study's fixed tolerance (`findings:` in the
  study file): d < -tolerance agrees, d > tolerance disagrees, anything between is within noise.
- With two or more seeds on both sides, the threshold is max(tolerance, k x SE), where SE is the standard
  error of d and k the one-sided 95% point of Student's t with the degrees of freedom SE was estimated
  with. When the seeds pair up (seed i of a and seed i of b share their initialisation and data order,
  as in a study), SE = std(a_i - b_i) / sqrt(n) with n - 1 degrees of freedom; otherwise
  SE = sqrt(std_a^2 / n_a + std_b^2 / n_b) with Welch's degrees of freedom.

Why k from the t table and not a fixed 2: with 2 seeds the SE is estimated from a single difference of
differences (1 degree of freedom) and is often far too small by chance; t's 95% point (6.31 at 1 degree of
freedom, 2.92 at 2, 2.35 at 3, 1.64 with many) is exactly the factor that keeps the chance of calling a
difference that does not exist at 5% in each direction, whatever the number of seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from picollm.study.runlog import Stat, stat_diff

AGREES, DISAGREES, NOISE, UNCHECKED = "agrees", "disagrees", "within noise", "not checked"
INCONCLUSIVE = "inconclusive"
NOT_SETTLED = "not settled at this budget"

# one-sided 95% points of Student's t by degrees of freedom (any statistics table); beyond 30: 1.645
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
       11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.740, 18: 1.734, 19: 1.729,
       20: 1.725, 21: 1.721, 22: 1.717, 23: 1.714, 24: 1.711, 25: 1.708, 26: 1.706, 27: 1.703, 28: 1.701,
       29: 1.699, 30: 1.697}


def t95(df: float) -> float:
    df = max(1, int(math.floor(df)))
    return T95.get(df, 1.645)


@dataclass
class Noise:
    """The threshold a difference must pass, and what it was made of (for the evidence text)."""

    threshold: float
    se: float | None  # None: one seed, the fixed tolerance alone
    k: float | None
    df: float | None


def noise(a: Stat, b: Stat, tolerance: float) -> Noise:
    """max(tolerance, k x SE of mean(a) - mean(b)); the tolerance alone when a side has one seed."""
    if a.n < 2 or b.n < 2:
        return Noise(tolerance, None, None, None)
    paired = stat_diff(a, b)
    if paired.n >= 2:  # the same seeds on both sides: the per-seed differences
        se = (paired.std or 0.0) / math.sqrt(paired.n)
        df = float(paired.n - 1)
    else:
        va, vb = (a.std or 0.0) ** 2 / a.n, (b.std or 0.0) ** 2 / b.n
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1)) if va + vb > 0 else float(a.n + b.n - 2)
    k = t95(df)
    return Noise(max(tolerance, k * se), se, k, df)


def compare(a: Stat, b: Stat, tolerance: float) -> tuple[str, Noise]:
    """The verdict on "a < b": agrees, disagrees or within noise (see the module doc)."""
    n = noise(a, b, tolerance)
    diff = a.mean - b.mean  # type: ignore[operator]
    verdict = AGREES if diff < -n.threshold else DISAGREES if diff > n.threshold else NOISE
    return verdict, n


def combine(verdicts: list[str]) -> str:
    """A claim from its checks: disagrees if any check disagrees, agrees if all agree, inconclusive if a
    check is (a run did not train), else within noise; not checked without checks."""
    if not verdicts:
        return UNCHECKED
    if DISAGREES in verdicts:
        return DISAGREES
    if all(v == AGREES for v in verdicts):
        return AGREES
    if INCONCLUSIVE in verdicts:
        return INCONCLUSIVE
    return NOISE


def trend_text(verdicts: list[str]) -> str:
    """"disagrees → within noise → agrees": the verdicts at successive points of the runs."""
    return " → ".join(verdicts)


def settled(verdicts: list[str]) -> bool:
    """The same verdict at every point of the runs."""
    return len(set(verdicts)) <= 1


# ---------------------------------------------------------------------------------------------
# the records of a check and of a claim


def shown(verdict: str, untrained: list[str]) -> str:
    """A verdict as the report prints it: an inconclusive one names the runs that did not train."""
    return f"{INCONCLUSIVE} ({', '.join(untrained)} did not train)" if verdict == INCONCLUSIVE else verdict


@dataclass
class Check:
    key: str  # what was compared, without the numbers (the same at every point of a trend)
    text: str  # with the numbers
    verdict: str
    untrained: list[str] = field(default_factory=list)  # the labels of the runs that did not train
    note: str = ""  # e.g. "both below the bigram baseline"
    trend: list[str] = field(default_factory=list)  # verdicts at 25%, 50%, end (loss checks only)

    @property
    def shown(self) -> str:
        """The verdict as the report prints it."""
        return shown(self.verdict, self.untrained)

    @property
    def evidence(self) -> str:
        parts = [self.shown]
        if self.trend and not settled(self.trend):
            parts.append(f"during training: {trend_text(self.trend)}")
        return f"{self.text}{' — ' + self.note if self.note else ''} ({'; '.join(parts)})"


@dataclass
class Finding:
    claim: str
    verdict: str
    checks: list[Check] = field(default_factory=list)
    note: str = ""
    loss_based: bool = False  # some check compares final losses: it has a trend during training
    trend: list[str] = field(default_factory=list)  # the claim's verdicts at 25%, 50% and the end

    @property
    def untrained(self) -> list[str]:
        return sorted({label for c in self.checks for label in c.untrained})

    @property
    def shown(self) -> str:
        return shown(self.verdict, self.untrained)

    @property
    def settled(self) -> bool:
        return settled(self.trend)

    @property
    def below_bigram(self) -> int:
        """Checks whose runs are all worse than the bigram baseline."""
        return sum(1 for c in self.checks if c.note)

    @property
    def evidence(self) -> str:
        parts = [c.evidence for c in self.checks]
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


def format_measurement(x: float | None, unit: str) -> str:
    """A measured value as a finding's text shows it: a token count whole with thousands separators,
    anything else to three decimals, a missing one as a dash."""
    if x is None:
        return "—"
    if unit == "tokens":
        return f"{x:,.0f}"
    return f"{x:.3f}"
