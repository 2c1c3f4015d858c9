"""Equal training compute, post hoc: the entries' validation curves against training FLOPs
(FLOPs per token of the model x tokens seen), compared at the largest FLOP count every entry reached.

Under a cosine schedule a curve's point before its end is not what a run with that budget would reach
(its rate has not decayed yet), so the comparison favours the model whose point is its end: the report
says at which fraction of each run the common point falls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from picollm.study.results import Entry, GroupResult


@dataclass
class FlopCurve:
    entry: Entry
    flops: list[float]
    losses: list[float]


@dataclass
class EqualCompute:
    flops: float  # the largest FLOP count every entry reached
    losses: dict[str, float]  # label -> validation loss there (interpolated in log FLOPs)
    fractions: dict[str, float]  # label -> the fraction of its run at that point
    leader: str


def flop_curves(group: GroupResult) -> list[FlopCurve]:
    out = []
    for e in group.entries:
        tokens, means, _ = e.curve()
        per_token = next((r.flops_per_token for r in e.finished if r.flops_per_token), None)
        if tokens and per_token:
            out.append(FlopCurve(e, [t * per_token for t in tokens], means))
    return out


def _at(curve: FlopCurve, flops: float) -> float:
    """The loss at `flops`, linear in log FLOPs between the two evaluations around it."""
    xs, ys = curve.flops, curve.losses
    if flops <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= flops <= x1:
            w = (math.log(flops) - math.log(x0)) / max(math.log(x1) - math.log(x0), 1e-12)
            return y0 + w * (y1 - y0)
    return ys[-1]


def equal_compute(group: GroupResult) -> EqualCompute | None:
    curves = flop_curves(group)
    if len(curves) < 2:
        return None
    common = min(c.flops[-1] for c in curves)
    losses = {c.entry.label: _at(c, common) for c in curves}
    fractions = {c.entry.label: common / c.flops[-1] for c in curves}
    return EqualCompute(common, losses, fractions, min(losses, key=losses.get))  # type: ignore[arg-type]


def equal_compute_text(result: EqualCompute) -> str:
    ranked = sorted(result.losses.items(), key=lambda kv: kv[1])
    parts = ", ".join(f"{label} {loss:.3f} (at {100 * result.fractions[label]:.0f}% of its run)"
                      for label, loss in ranked)
    mid = [label for label, f in result.fractions.items() if f < 0.9]  # well before the end of its decay
    text = (f"At equal training compute: at {result.flops:.2e} FLOPs, the largest count every run here reached, "
            f"{result.leader} is ahead; validation loss {parts}.")
    if mid:
        text += (f" This point falls mid-schedule for {', '.join(sorted(mid))}: under the cosine schedule their "
                 "learning rate had not decayed yet, so their loss there is higher than a run with that budget "
                 "would reach.")
    return text
