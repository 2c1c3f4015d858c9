"""The verdict rule on made-up numbers: fixed tolerance with one seed, k x SE with seeds; trend words."""

from __future__ import annotations

import math

import pytest

from picollm.study.runlog import Stat
from picollm.study.verdicts import (
    AGREES,
    DISAGREES,
    INCONCLUSIVE,
    NOISE,
    UNCHECKED,
    combine,
    compare,
    noise,
    settled,
    t95,
    trend_text,
)


def test_one_seed_uses_the_fixed_tolerance():
    assert compare(Stat([4.00]), Stat([4.02]), 0.01)[0] == AGREES  # 0.02 lower: beyond 0.01
    assert compare(Stat([4.00]), Stat([4.005]), 0.01)[0] == NOISE
    assert compare(Stat([4.03]), Stat([4.00]), 0.01)[0] == DISAGREES
    assert noise(Stat([1.0]), Stat([2.0, 2.1]), 0.01).se is None  # one side with one seed: tolerance alone


def test_paired_seeds_threshold_is_k_times_the_standard_error_of_the_mean_difference():
    # per-seed differences a - b: -0.10 and -0.12 -> mean -0.11, std 0.01414, SE = std / sqrt(2) = 0.01,
    # 1 degree of freedom: k = 6.314, threshold = max(0.01, 0.06314) -> |-0.11| > 0.063: agrees
    a, b = Stat([4.00, 4.02]), Stat([4.10, 4.14])
    verdict, n = compare(a, b, 0.01)
    assert n.se == pytest.approx(0.01) and n.k == pytest.approx(6.314) and n.df == 1
    assert n.threshold == pytest.approx(0.06314)
    assert verdict == AGREES
    # the same mean difference with noisier seeds (-0.01 and -0.21: SE 0.1): within noise
    assert compare(Stat([4.00, 4.02]), Stat([4.01, 4.23]), 0.01)[0] == NOISE
    # the other sign, as clear: disagrees
    assert compare(b, a, 0.01)[0] == DISAGREES
    # the tolerance is a floor: identical differences (SE 0) still need to pass it
    verdict, n = compare(Stat([4.000, 4.010]), Stat([4.005, 4.015]), 0.01)
    assert n.se == 0.0 and n.threshold == 0.01 and verdict == NOISE


def test_three_seeds_and_unpaired_seeds():
    # three seeds: differences -0.1, -0.2, -0.3 -> mean -0.2, std 0.1, SE 0.0577, k(2 df) = 2.920
    verdict, n = compare(Stat([1.0, 1.0, 1.0]), Stat([1.1, 1.2, 1.3]), 0.01)
    assert n.k == pytest.approx(2.920) and n.threshold == pytest.approx(2.920 * 0.1 / math.sqrt(3))
    assert verdict == AGREES
    # 2 seeds against 3 do not pair: Welch's SE and degrees of freedom
    a, b = Stat([1.0, 1.1]), Stat([2.0, 2.2, 2.4])
    n = noise(a, b, 0.01)
    va, vb = a.std ** 2 / 2, b.std ** 2 / 3
    assert n.se == pytest.approx(math.sqrt(va + vb))
    assert n.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2))


def test_t_table():
    assert (t95(1), t95(2), t95(3), t95(30), t95(1000)) == (6.314, 2.920, 2.353, 1.697, 1.645)
    assert t95(2.7) == 2.920  # fractional (Welch) degrees of freedom round down: the safer k


def test_combining_checks_and_trend_words():
    assert combine([AGREES, AGREES]) == AGREES
    assert combine([AGREES, DISAGREES, INCONCLUSIVE]) == DISAGREES
    assert combine([AGREES, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([AGREES, NOISE]) == NOISE
    assert combine([]) == UNCHECKED
    assert trend_text([DISAGREES, NOISE, AGREES]) == "disagrees → within noise → agrees"
    assert not settled([DISAGREES, NOISE, AGREES]) and settled([AGREES, AGREES, AGREES])
