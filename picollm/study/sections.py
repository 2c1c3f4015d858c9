"""The report's sections, built from the results: the budget, the learning rates, the findings, one per
group, and the runs."""

from __future__ import annotations

import json
from pathlib import Path

from picollm.study import plots
from picollm.study.compute import equal_compute, equal_compute_text
from picollm.study.document import Image, Section, Table, fmt_value, show_value
from picollm.study.findings import AGREES, DISAGREES, INCONCLUSIVE, NOISE, NOT_SETTLED, Finding, observations
from picollm.study.results import GroupResult, StudyResults
from picollm.study.spec import TREND_POINTS
from picollm.study.tables import (
    diversity_table,
    lr_table,
    prompt_samples_table,
    results_table,
    samples_table,
)
from picollm.study.verdicts import trend_text


def budget_section(results: StudyResults) -> Section:
    rec = results.record
    sec = Section("budget", f"Budget: {rec.get('budget') or '—'}")
    if rec.get("budget_description"):
        text = rec["budget_description"].strip().rstrip(".")
        sec.paragraphs.append(f"{text[:1].upper()}{text[1:]}.")
    changes = rec.get("budget_changes") or []
    if changes:
        rows = [[c["key"], show_value(c.get("base"), c["key"]), show_value(c.get("budget"), c["key"]),
                 c.get("where", "all runs")] for c in changes]
        sec.blocks.append(Table(["setting", "original recipe", f"{rec.get('budget')} budget", "applies to"], rows,
                                "Every change this budget makes to the original recipe."))
    else:
        sec.blocks.append("This budget runs the original recipe unchanged.")
    if rec.get("tune"):
        sec.blocks.append("Learning rate: chosen per model by an lr sweep (train.lr auto; see Learning rates); "
                          "with --no-tune every run trains at the fixed train.lr above.")
    elif rec.get("no_tune"):
        sec.blocks.append(_no_tune_text(results))
    # what it came to: tokens, epochs, vocabulary, context
    runs = [r for r in results.runs() if r.finished]
    if runs:
        summaries = [r.summary or {} for r in runs]
        tokens = sorted(int(s.get("tokens_seen", 0)) for s in summaries)
        epochs = sorted(float(s.get("epochs", 0.0)) for s in summaries)
        vocab = sorted({str(s.get("vocab_size") or (r.config.get("model") or {}).get("vocab_size"))
                        for s, r in zip(summaries, runs)})
        tokenizers = sorted({str(s.get("tokenizer")) for s in summaries})
        context = sorted({int(s.get("context_length", 0)) for s in summaries})
        # each run's own training, and each sweep once (its seeds share it)
        wall = sum(float(s.get("train_wall_time_s", s.get("wall_time_s", 0.0))) for s in summaries)
        sweeps = results.sweeps()
        sweep_wall = sum(float(s.get("wall_time_s", 0.0)) for s in sweeps)
        sec.blocks.append(
            f"In this study that came to {_range(tokens, 'count')} training tokens per run "
            f"({_range(epochs, '2f')} epochs of the training split), tokenizer {', '.join(tokenizers)} "
            f"(vocabulary {', '.join(vocab)}), context {', '.join(map(str, context))} tokens; "
            f"{len(runs)} distinct runs trained for {wall / 60:.1f} minutes in total "
            f"(seeds: {', '.join(map(str, rec.get('seeds') or [])) or '—'})"
            + (f", and {sum(len(s['losses']) for s in sweeps)} lr sweep runs for {len(sweeps)} models took "
               f"{sweep_wall / 60:.1f} minutes" if sweeps else "") + ".")
    return sec


def _no_tune_text(results: StudyResults) -> str:
    """What --no-tune did: no sweep, and the fixed rates the runs trained at."""
    rates: set[float] = set()
    for r in results.runs():  # the rate summary.json records, else the config's (a run not finished yet)
        lr = (r.summary or {}).get("lr", (r.config.get("train") or {}).get("lr"))
        if isinstance(lr, int | float):
            rates.add(float(lr))
    shown = ", ".join(fmt_value(lr, "lr") for lr in sorted(rates)) or "—"
    text = (f"Learning rate: not tuned (--no-tune): no lr sweep ran, and every run trained at a fixed peak rate "
            f"({shown}; the lr column of the results tables gives each run's).")
    untuned: dict[str, float] = results.record.get("untuned") or {}
    if untuned:
        by_rate: dict[float, list[str]] = {}
        for label, lr in untuned.items():
            by_rate.setdefault(lr, []).append(label)
        text += (" Some runs asked for train.lr auto (in the study file or on the command line); under --no-tune "
                 "they trained at the fixed rate instead: " + "; ".join(f"{fmt_value(lr, 'lr')} for {', '.join(labels)}"
                                                for lr, labels in by_rate.items()) + ".")
    return text


def _range(values: list[float], kind: str) -> str:
    lo, hi = values[0], values[-1]
    f = (lambda v: fmt_value(v, "count")) if kind == "count" else (lambda v: f"{v:.2f}")
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}–{f(hi)}"


def lr_section(results: StudyResults, image_dir: Path) -> Section | None:
    sweeps = results.sweeps()
    if not sweeps:
        return None
    sec = Section("learning-rates", "Learning rates")
    first = sweeps[0]
    sec.paragraphs.append(
        f"Each model's peak learning rate was chosen by a sweep: a complete short run (the schedule compressed to "
        f"{100 * first['fraction']:g}% of the run's steps, seed {first['seed']}) at each rate of the grid "
        f"{', '.join(fmt_value(x, 'lr') for x in first['grid'])}, scored by its final NLL on the full validation "
        "split; the lowest wins, and when it is at an edge of the grid one more rate a grid step beyond is tried. "
        "When no sweep run trained (none closed half the gap from the unigram to the bigram baseline: their "
        "ranking is noise), the sweep is repeated with runs twice as long, up to the whole run. The seeds of a "
        "model share its sweep. Every model is tuned the same way, so no family is held back by a rate that "
        "suits another.")
    # the baselines as reference lines, when every sweep ran on the same data (else no single line is right)
    baselines = {json.dumps(s["baseline"], sort_keys=True) for s in sweeps}
    baseline = sweeps[0]["baseline"] if len(baselines) == 1 else None
    img = plots.lr_plot(sweeps, image_dir / "lr-sweeps.png", baseline)
    if img:
        lines = " (dotted: the unigram and bigram baselines)" if baseline else ""
        sec.blocks.append(Image(img, f"Learning-rate sweeps: final validation loss against the peak rate{lines}"))
    sec.blocks.append(lr_table(results, sweeps))
    longer = [f"{s['label']} ({s['length']:g})" for s in sweeps if s.get("length", s["fraction"]) != s["fraction"]]
    if longer:
        sec.blocks.append(f"Sweeps repeated longer because no rate trained at {100 * first['fraction']:g}% of the "
                          f"steps: {', '.join(longer)}.")
    edge = [s["label"] for s in sweeps if s.get("at_edge")]
    if edge:
        sec.blocks.append(f"lr at grid edge: {', '.join(edge)}: the best rate tried was the extreme one, so a "
                          "better rate may lie further out.")
    untrained = [s["label"] for s in sweeps if not s.get("trained", True)]
    if untrained:
        sec.blocks.append(f"No sweep run trained, even at the whole length: {', '.join(untrained)}; the rate with "
                          "the lowest loss was taken.")
    return sec


def findings_section(results: StudyResults, findings: list[Finding]) -> Section:
    sec = Section("findings", "Findings: the original study's claims against these numbers")
    points = " → ".join([f"{100 * p:g}%" for p in TREND_POINTS] + ["end"])
    sec.paragraphs.append(
        "Each claim is checked by comparing the numbers it is about. A comparison agrees when the difference "
        "has the claimed sign and is larger than the noise threshold, disagrees when it has the opposite sign "
        "and is larger, and is within noise otherwise. The threshold is the fixed tolerance ("
        + _tolerances(results) + ") with one seed; with two or more seeds it is the larger of that tolerance "
        "and k x the standard error of the difference of the means, k the 95% point of Student's t for the "
        "seeds (6.31 with 2 seeds, 2.92 with 3). A comparison using a run that did not train is inconclusive. "
        f"'During training' repeats each loss comparison with the full-split validation NLL at {points} of the "
        "runs' tokens (under a cosine schedule, not what a smaller budget would give); a claim whose verdict "
        f"changes along the way is {NOT_SETTLED}.")
    rows = []
    for f in findings:
        verdict = f.shown + ("" if f.settled else f" ({NOT_SETTLED})")
        rows.append([f.claim, verdict, trend_text(f.trend) if f.trend else "—", f.evidence])
    counts = {v: sum(f.verdict == v for f in findings) for v in (AGREES, DISAGREES, NOISE, INCONCLUSIVE)}
    unsettled = sum(1 for f in findings if not f.settled)
    below = sum(f.below_bigram for f in findings)
    sec.blocks.append(Table(
        ["claim", "verdict", f"during training ({points})", "evidence"], rows,
        f"{counts[AGREES]} agree, {counts[DISAGREES]} disagree, {counts[NOISE]} within noise, "
        f"{counts[INCONCLUSIVE]} inconclusive (a run did not train), {len(findings) - sum(counts.values())} not "
        f"checked; {unsettled} not settled at this budget; {below} comparisons between runs that are all below "
        "the bigram baseline.", kind="findings"))
    for text in observations(results):
        sec.blocks.append(text)
    return sec


def _tolerances(results: StudyResults) -> str:
    f = results.record.get("findings") or {}
    return (f"{f.get('loss_tolerance', 0.01):g} nats for losses, {f.get('distinct_tolerance', 0.01):g} for "
            f"distinct-n and repetition, {100 * f.get('convergence_tolerance', 0.1):g}% for tokens to reference, "
            f"{100 * f.get('smoothness_tolerance', 0.1):g}% for roughness")


def group_section(group: GroupResult, results: StudyResults, image_dir: Path) -> Section:
    sec = Section(f"group-{group.name}", group.title)
    if group.description:
        sec.paragraphs.append(group.description)
    strategies = list((results.eval_settings.get("strategies") or {}).keys())
    if not strategies:  # a comparison of runs without study settings: the strategies their eval.json holds
        strategies = sorted({s for e in group.entries for r in e.runs for s in ((r.eval or {}).get("samples") or {})})
    if group.select:
        chosen = ", ".join(f"{e.label} (from {e.source_group})" for e in group.entries) or "none yet"
        by = "validation" if group.select.get("by", "val_loss") == "val_loss" else "test"
        sec.paragraphs.append(f"Chosen by the lowest {by} loss per {group.select.get('per', 'family')}: {chosen}.")
    if not group.entries:
        sec.blocks.append("No run of this group has finished yet.")
        return sec
    show = group.show
    if "curves" in show:
        img = plots.curves_plot(group, image_dir / f"{group.name}-curves.png")
        if img:
            sec.blocks.append(Image(img, f"{group.title}: validation loss by tokens seen"))
        if group.reference_loss is not None:
            sec.blocks.append(
                f"Reference loss: {group.reference_loss:.3f} nats, the worst final validation loss in the group "
                f"({group.reference_label}); 'tokens to reference' is when each run first reached it.")
    if "flops" in show:
        img = plots.flops_plot(group, image_dir / f"{group.name}-flops.png")
        if img:
            sec.blocks.append(Image(img, f"{group.title}: validation loss by training FLOPs"))
        compared = equal_compute(group)
        if compared:
            sec.blocks.append(equal_compute_text(compared))
    if "params" in show:
        img = plots.params_plot(group.entries, f"{group.title}: where the parameters are",
                                image_dir / f"{group.name}-params.png")
        if img:
            sec.blocks.append(Image(img, f"{group.title}: parameters"))
    if "results" in show:
        sec.blocks.append(results_table(group, results.diversity_strategy))
    if "diversity" in show:
        if "curves" not in show:  # a group about decoding: its diversity as a figure too
            img = plots.diversity_plot(group, strategies, image_dir / f"{group.name}-diversity.png")
            if img:
                sec.blocks.append(Image(img, f"{group.title}: diversity by strategy"))
        sec.blocks.append(diversity_table(group, strategies))
    if "samples" in show:
        sec.blocks.append(samples_table(group, strategies))
    if "prompt_samples" in show:
        table, _ = prompt_samples_table(group, strategies)
        sec.blocks.append(table)
    return sec


def runs_section(results: StudyResults) -> Section:
    sec = Section("runs", "Runs")
    where: dict[Path, list[str]] = {}
    labels: dict[Path, str] = {}
    for g in results.groups:
        if g.select:
            continue
        for e in g.entries:
            for r in e.runs:
                key = r.directory.resolve()
                where.setdefault(key, [])
                if g.name not in where[key]:
                    where[key].append(g.name)
                labels.setdefault(key, e.label)
    rows = []
    for r in results.runs():
        key = r.directory.resolve()
        status = (r.summary or {}).get("status", "not started" if not r.metrics else "interrupted")
        if r.did_not_train:
            status += ", did not train"
        seed = (r.config.get("train") or {}).get("seed", "—")
        lr = (r.summary or {}).get("lr", (r.config.get("train") or {}).get("lr"))
        rows.append([labels.get(key, r.directory.name), _rel_name(r.directory, results.directory),
                     ", ".join(where.get(key, [])) or "—", str(seed),
                     fmt_value(lr, "lr") if isinstance(lr, float) else str(lr), str(status)])
    sec.paragraphs.append("One directory per distinct run; groups that ask for the same configuration share it.")
    sec.blocks.append(Table(["run", "directory", "groups", "seed", "lr", "status"], rows))
    return sec


def _rel_name(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
