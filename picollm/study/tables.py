"""The report's tables: results (with the baselines and the lr each model trained at), diversity, samples,
the lr sweeps."""

from __future__ import annotations

import math
from typing import Any

from picollm.study.document import Table, fmt_rate, fmt_stat, fmt_value
from picollm.study.results import Entry, GroupResult, StudyResults

RESULT_COLUMNS: list[tuple[str, str, str]] = [
    ("params", "parameters", "count"),
    ("params_ne", "non-embedding", "count"),
    ("tokens", "tokens seen", "count"),
    ("tokens_to_ref", "tokens to reference", "count"),
    ("wall", "wall time (s)", "s"),
    ("tok_s", "tokens/s", "int"),
    ("train_nll", "train NLL", "3"),
    ("val_nll", "val NLL", "3"),
    ("margin_bigram", "val NLL − bigram", "signed"),
    ("test_nll", "test NLL", "3"),
    ("train_ppl", "train ppl", "ppl"),
    ("val_ppl", "val ppl", "ppl"),
    ("test_ppl", "test ppl", "ppl"),
    ("train_bpb", "train bpb", "3"),
    ("val_bpb", "val bpb", "3"),
    ("test_bpb", "test bpb", "3"),
]
DIVERSITY_COLUMNS = [("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("distinct_3", "distinct-3"),
                     ("distinct_4", "distinct-4"), ("distinct_5", "distinct-5"), ("repetition", "repetition-4")]
BASELINE_SUFFIX = " (baseline)"


def entry_name(e: Entry) -> str:
    """The label, where it comes from, and what went wrong: not finished, or did not train."""
    missing = len(e.runs) - len(e.finished)
    name = e.label
    if e.source_group:
        name += f" [{e.source_group}]"
    if missing:
        name += f" ({missing} of {len(e.runs)} runs not finished)"
    untrained = e.untrained
    if untrained:
        name += " — did not train" + (f" ({len(untrained)} of {len(e.finished)} seeds)"
                                      if len(e.finished) > 1 else "")
    return name


def lr_cell(e: Entry) -> str:
    """The peak rate the entry trained at (its seeds share it); "(edge)" when the sweep's best rate was
    the edge of every rate it tried."""
    rates = sorted(set(e.get("lr").values))
    if not rates:
        return "—"
    text = "/".join(fmt_value(r, "lr") for r in rates)
    return text + (" (edge)" if e.get("lr_at_edge").mean else "")


def baseline_rows(group: GroupResult, columns: list[str]) -> list[list[str]]:
    """The unigram and the two bigrams of the group's data: their val/test NLL, ppl and bpb."""
    record = next((e.baseline for e in group.entries if e.baseline), None)
    if not record:
        return []
    bigram_val = record["models"][record["bigram"]]["val"]["nll"]
    rows = []
    for model in record["models"].values():
        cells = {"val_nll": model["val"]["nll"], "test_nll": (model.get("test") or {}).get("nll"),
                 "val_bpb": model["val"].get("bpb"), "test_bpb": (model.get("test") or {}).get("bpb"),
                 "margin_bigram": model["val"]["nll"] - bigram_val}
        cells["val_ppl"] = math.exp(cells["val_nll"])
        cells["test_ppl"] = math.exp(cells["test_nll"]) if cells["test_nll"] is not None else None
        row = [model["name"] + BASELINE_SUFFIX]
        for column in columns[1:]:
            spec = next((c for c in RESULT_COLUMNS if c[1] == column), None)
            row.append(fmt_value(cells.get(spec[0]), spec[2]) if spec else "—")
        rows.append(row)
    return rows


def results_table(group: GroupResult, diversity_strategy: str | None) -> Table:
    columns = ["run", "lr"] + [c[1] for c in RESULT_COLUMNS] + [c[1] for c in DIVERSITY_COLUMNS]
    rows = []
    for e in group.entries:
        row = [entry_name(e), lr_cell(e)]
        row += [fmt_stat(e.get(key), kind) for key, _, kind in RESULT_COLUMNS]
        row += [fmt_rate(e.get(key)) if e.finished and e.finished[0].eval else "—" for key, _ in DIVERSITY_COLUMNS]
        rows.append(row)
    rows += baseline_rows(group, columns)
    seeds = max((len(e.runs) for e in group.entries), default=1)
    caption = (f"NLL in nats per token; ppl = exp(NLL); bpb = bits per UTF-8 byte. lr: the peak learning rate "
               "(chosen by the lr sweep with lr auto). val NLL − bigram: below 0 = better than the bigram baseline. "
               "A run that did not close half of the gap from the unigram to the bigram baseline on validation "
               "NLL is marked \"did not train\". The baselines are computed exactly from the training split "
               "(picollm.baselines). Distinct-n (words) and repetition-4 of the continuations under "
               f"{diversity_strategy or 'the diversity strategy'}; n/a: no continuation had n words."
               + (f" Mean ± std over {seeds} seeds." if seeds >= 2 else ""))
    return Table(columns, rows, caption)


def diversity_table(group: GroupResult, strategies: list[str]) -> Table:
    columns = ["run", "strategy"] + [f"distinct-{n}" for n in range(1, 6)] + ["repetition-4", "diversity score"]
    rows = []
    for e in group.entries:
        for s in strategies:
            if not e.get(f"{s}:texts"):
                continue
            rows.append([entry_name(e), s] + [fmt_rate(e.get(f"{s}:word_distinct_{n}")) for n in range(1, 6)]
                        + [fmt_rate(e.get(f"{s}:repetition_4")), fmt_rate(e.get(f"{s}:score"))])
    return Table(columns, rows, "Word distinct-n pooled over all continuations (1.0 = no n-gram repeats; n/a = no "
                                "continuation had n words: undefined, left out of the score); repetition-4 = share "
                                "of word 4-grams repeating an earlier one in the same text; diversity score = mean "
                                "of the defined distinct-1..5.")


def lr_table(results: StudyResults, sweeps: list[dict[str, Any]]) -> Table:
    """One row per model: the final validation NLL of each sweep run, the rate chosen."""
    rates = sorted({lr for s in sweeps for lr, _ in s["losses"]})
    rows = []
    for s in sweeps:
        losses = dict(s["losses"])
        cells = [("—" if lr not in losses else "diverged" if losses[lr] is None else fmt_value(losses[lr], "3"))
                 for lr in rates]
        chosen = fmt_value(s["chosen"], "lr") + (" (edge)" if s["at_edge"] else "")
        if not s.get("trained", True):
            chosen += " (no sweep run trained)"
        rows.append([s["label"], *cells, f"{s.get('length', s['fraction']):g} ({s.get('steps', '—')})", chosen])
    return Table(["model", *[f"lr {fmt_value(lr, 'lr')}" for lr in rates], "length (steps)", "chosen lr"], rows,
                 "Final validation NLL (full split) of each sweep run at the length the rate was chosen at (a "
                 "fraction of the run's steps: longer than the first when no rate trained at it); the model "
                 "trains at the lowest. \"(edge)\": the best rate was at the edge of every rate tried, one grid "
                 "step beyond included.")
def _first_eval(e: Entry) -> dict[str, Any]:
    for r in e.finished or e.runs:
        if r.eval:
            return r.eval
    return {}


def samples_table(group: GroupResult, strategies: list[str], samples_per_cell: int = 2) -> Table:
    rows = []
    prompts_shown: list[str] = []
    for e in group.entries:
        ev = _first_eval(e)
        if not ev:
            continue
        prompts = ev.get("prompts") or []
        row = [entry_name(e)]
        for s in strategies:
            texts = (ev.get("samples") or {}).get(s) or []
            cells = []
            for i, text in enumerate(texts[:samples_per_cell]):
                prompt = prompts[i] if i < len(prompts) else ""
                if prompt and prompt not in prompts_shown:
                    prompts_shown.append(prompt)
                cells.append(f"«{prompt}» {_one_line(text)}")
            row.append("\n\n".join(cells) if cells else "—")
        rows.append(row)
    return Table(["run"] + strategies, rows, f"The first {samples_per_cell} validation prompts (in «») and each "
                 "model's continuation with each strategy (seed 0 of each run).", kind="samples")


def _one_line(text: str) -> str:
    """A continuation on one line: its line breaks shown as ⏎, runs of blanks as one."""
    return " ".join(text.strip().replace("\n", " ⏎ ").split())


def prompt_samples_table(group: GroupResult, strategies: list[str]) -> tuple[Table, str]:
    rows = []
    prompt = ""
    for e in group.entries:
        ev = _first_eval(e)
        sp = ev.get("study_prompt") or {}
        prompt = sp.get("prompt", prompt)
        row = [entry_name(e)]
        for s in strategies:
            texts = (sp.get("samples") or {}).get(s) or []
            row.append("\n\n".join(_one_line(t) for t in texts) if texts else "—")
        rows.append(row)
    return Table(["model"] + strategies, rows, f"The study prompt «{prompt}» continued by each model.",
                 kind="samples"), prompt


