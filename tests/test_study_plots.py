"""The report's figures draw what they claim: asserted on the matplotlib Axes (lines, labels), not on pixels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=True)

import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
import pytest  # noqa: E402

from picollm.study import plots  # noqa: E402

BASELINE = {"bigram": "bigram_interpolated",
            "models": {"unigram": {"val": {"nll": 6.1023}}, "bigram_add_k": {"val": {"nll": 4.5}},
                       "bigram_interpolated": {"val": {"nll": 4.1187}}}}
SWEEPS = [
    {"label": "lstm-pico", "fraction": 0.25, "length": 0.25, "chosen": 0.01,
     "losses": [[0.001, 6.2], [0.003, 5.4], [0.01, 4.9], [0.03, None]]},
    {"label": "transformer-pico", "fraction": 0.25, "length": 1.0, "chosen": 0.003,
     "losses": [[0.001, 6.05], [0.003, 5.0], [0.01, 5.6], [0.03, 7.0]]},
]


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def _horizontal(ax) -> dict[str, float]:
    """Label -> y of the horizontal lines spanning the axes (axhline)."""
    return {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()
            if list(line.get_xdata()) == [0, 1] and len(set(line.get_ydata())) == 1}


def test_lr_sweeps_plot_draws_the_unigram_and_bigram_baselines(ax):
    assert plots.draw_lr_sweeps(ax, SWEEPS, BASELINE) == 2
    lines = _horizontal(ax)
    assert lines == {"unigram baseline 6.102": pytest.approx(6.1023), "bigram baseline 4.119": pytest.approx(4.1187)}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "unigram baseline 6.102" in legend and "bigram baseline 4.119" in legend
    assert "transformer-pico (1 of the run)" in legend  # a sweep chosen at a longer length says so
    # the sweep curves themselves: a diverged rate (None) is left out
    curves = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines() if line.get_label() == "lstm-pico"}
    assert curves == {"lstm-pico": [6.2, 5.4, 4.9]}
    # the baselines stay in view however high the untrained sweep points go
    low, high = ax.get_ylim()
    assert low < 4.1187 and high > 7.0


def test_lr_sweeps_plot_without_baselines_draws_no_reference_lines(ax):
    assert plots.draw_lr_sweeps(ax, SWEEPS, None) == 2
    assert _horizontal(ax) == {}


def test_lr_plot_writes_a_png_and_skips_sweeps_without_losses(tmp_path):
    path = plots.lr_plot(SWEEPS, tmp_path / "plots" / "lr-sweeps.png", BASELINE)
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = [{**SWEEPS[0], "losses": [[0.001, None]]}]
    assert plots.lr_plot(empty, tmp_path / "none.png", BASELINE) is None and not (tmp_path / "none.png").exists()
