"""The report's figures: matplotlib (Agg backend, no display needed), written as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from picollm.study.compute import flop_curves
from picollm.study.results import Entry, GroupResult

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
STYLES = ["-", "--", ":", "-."]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _baselines(ax: Any, baseline: dict[str, Any] | None) -> list[float]:
    """The unigram and bigram baselines as horizontal reference lines; their losses."""
    if not baseline:
        return []
    uni = baseline["models"]["unigram"]["val"]["nll"]
    bi = baseline["models"][baseline["bigram"]]["val"]["nll"]
    ax.axhline(uni, color="#999999", linewidth=1.0, linestyle=(0, (1, 2)), label=f"unigram baseline {uni:.3f}")
    ax.axhline(bi, color="#000000", linewidth=1.0, linestyle=(0, (1, 2)), label=f"bigram baseline {bi:.3f}")
    return [uni, bi]


def curves_plot(group: GroupResult, path: Path) -> Path | None:
    """Validation loss by tokens seen, one line per entry (mean over seeds, ± std shaded), with the
    unigram and bigram baselines."""
    drawn = [(e, *e.curve()) for e in group.entries]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=110)
    for i, (entry, tokens, means, stds) in enumerate(drawn):
        color = COLORS[i % len(COLORS)]
        style = STYLES[(i // len(COLORS)) % len(STYLES)]
        ax.plot(tokens, means, style, color=color, label=entry.label, linewidth=1.6, marker=".", markersize=4)
        if any(s > 0 for s in stds):
            lo = [m - s for m, s in zip(means, stds, strict=True)]
            hi = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(tokens, lo, hi, color=color, alpha=0.15, linewidth=0)
    if group.reference_loss is not None:
        ax.axhline(group.reference_loss, color="#555555", linewidth=0.8, linestyle=(0, (4, 3)),
                   label=f"reference {group.reference_loss:.3f}")
    references = _baselines(ax, next((e.baseline for e in group.entries if e.baseline), None))
    # the first evaluations sit near ln(vocab); zoom on where the curves separate (baselines in view)
    finals = [m[-1] for _, _, m, _ in drawn]
    tail = [v for _, _, m, _ in drawn for v in m[len(m) // 4:]]
    if tail:
        top = max(tail + references)
        bottom = min(finals + tail + references)
        pad = max(0.05, 0.08 * (top - bottom))
        ax.set_ylim(bottom - pad, top + pad)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(group.title, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, ncol=2 if len(drawn) > 6 else 1, loc="upper right", framealpha=0.85)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def diversity_plot(group: GroupResult, strategies: list[str], path: Path) -> Path | None:
    """Per entry, the diversity score and repetition-4 of each decoding strategy (grouped bars)."""
    entries = [e for e in group.entries if any(e.get(f"{s}:score") for s in strategies)]
    if not entries or not strategies:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    width = 0.8 / len(strategies)
    for ax, metric, title in ((axes[0], "score", "diversity score (mean distinct-1..5)"),
                              (axes[1], "repetition_4", "repetition-4 (lower: fewer loops)")):
        for j, strategy in enumerate(strategies):
            values = [e.get(f"{strategy}:{metric}").mean or 0.0 for e in entries]
            xs = [i + (j - (len(strategies) - 1) / 2) * width for i in range(len(entries))]
            ax.bar(xs, values, width=width, color=COLORS[j % len(COLORS)], label=strategy)
        top = max([e.get(f"{s}:{metric}").mean or 0.0 for e in entries for s in strategies] + [0.1])
        ax.set_ylim(0, top * 1.3)
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels([e.label for e in entries], rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=len(strategies), loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def params_plot(entries: list[Entry], title: str, path: Path) -> Path | None:
    """Stacked bars: embedding (+ output layer) and non-embedding parameters per entry."""
    rows = [(e.label, e.get("params").mean, e.get("params_ne").mean) for e in entries]
    rows = [(label, total, ne) for label, total, ne in rows if total is not None and ne is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    labels = [r[0] for r in rows]
    ne = [r[2] for r in rows]
    emb = [r[1] - r[2] for r in rows]
    ax.bar(labels, ne, color=COLORS[0], label="non-embedding")
    ax.bar(labels, emb, bottom=ne, color=COLORS[3], label="embeddings + output layer")
    for i, (total, n) in enumerate(zip([r[1] for r in rows], ne, strict=True)):
        ax.text(i, total, f"{total / 1e6:.2f}M\n({n / 1e3:.0f}K non-emb.)", ha="center", va="bottom", fontsize=7.5)
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}K"))
    ax.set_ylabel("parameters")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(r[1] for r in rows) * 1.55)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def flops_plot(group: GroupResult, path: Path) -> Path | None:
    """Validation loss against training FLOPs (FLOPs per token x tokens), one line per entry, log x."""
    curves = flop_curves(group)
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=110)
    for i, c in enumerate(curves):
        ax.plot(c.flops, c.losses, "-", color=COLORS[i % len(COLORS)], label=c.entry.label, linewidth=1.6,
                marker=".", markersize=4)
    common = min(c.flops[-1] for c in curves)
    ax.axvline(common, color="#555555", linewidth=0.8, linestyle=(0, (4, 3)), label="largest common FLOPs")
    references = _baselines(ax, next((e.baseline for e in group.entries if e.baseline), None))
    tail = [v for c in curves for v in c.losses[len(c.losses) // 4:]]
    top, bottom = max(tail + references), min(tail + references)
    pad = max(0.05, 0.08 * (top - bottom))
    ax.set_ylim(bottom - pad, top + pad)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{group.title}: validation loss at equal compute", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper right", framealpha=0.85)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def lr_plot(sweeps: list[dict[str, Any]], path: Path, baseline: dict[str, Any] | None = None) -> Path | None:
    """Final validation loss of each sweep run against its learning rate, a curve per model, the chosen
    rate marked, and the unigram and bigram baselines of the data (`baseline`, a picollm.baselines record)
    as reference lines: a point near the unigram line did not train at that rate."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 5.4), dpi=110)
    drawn = draw_lr_sweeps(ax, sweeps, baseline)
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def draw_lr_sweeps(ax: Any, sweeps: list[dict[str, Any]], baseline: dict[str, Any] | None = None) -> int:
    """`lr_plot`'s drawing on `ax`; the number of sweeps drawn (0: none has a loss, nothing is drawn)."""
    drawn = [s for s in sweeps if any(loss is not None for _, loss in s["losses"])]
    if not drawn:
        return 0
    for i, s in enumerate(drawn):
        points = [(lr, loss) for lr, loss in s["losses"] if loss is not None]
        color = COLORS[i % len(COLORS)]
        style = STYLES[(i // len(COLORS)) % len(STYLES)]
        length = s.get("length", s["fraction"])
        label = s["label"] + (f" ({length:g} of the run)" if length != s["fraction"] else "")
        ax.plot([p[0] for p in points], [p[1] for p in points], style, color=color, marker="o", markersize=3,
                linewidth=1.2, label=label)
        chosen = dict(points).get(s["chosen"])
        if chosen is not None:
            ax.plot([s["chosen"]], [chosen], "*", color=color, markersize=11, markeredgecolor="black",
                    markeredgewidth=0.5)
    _baselines(ax, baseline)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss of the sweep run (nats/token)")
    ax.set_title("Learning-rate sweeps at the length each rate was chosen at (★ = the rate the model trains at)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2 if len(drawn) > 8 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5),
              framealpha=0.85)
    return len(drawn)
