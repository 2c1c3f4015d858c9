"""The study report: `report/index.html` (self-contained, images embedded) and `report/report.md` (with
the PNG files beside it), built from the run logs and study.json alone."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picollm.study import plots
from picollm.study.findings import AGREES, DISAGREES, NOISE, Finding, check_claims, observations
from picollm.study.results import Entry, GroupResult, Stat, StudyResults, finite, load_results

REPORT_DIR = "report"


# ---------------------------------------------------------------------------------------------
# the document model


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    kind: str = ""  # "findings" colours its verdict column; "samples" wraps long text


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class Section:
    anchor: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    blocks: list[Table | Image | str] = field(default_factory=list)  # str = a paragraph among blocks


@dataclass
class Document:
    title: str
    intro: list[str]
    sections: list[Section]


# ---------------------------------------------------------------------------------------------
# number formatting


def fmt_value(x: float | None, kind: str) -> str:
    if x is None or not finite(x):
        return "—"
    if kind == "int":
        return f"{x:,.0f}"
    if kind == "count":
        if abs(x) >= 1e6:
            return f"{x / 1e6:.2f}M"
        if abs(x) >= 1e4:
            return f"{x / 1e3:.0f}K"
        return f"{x:,.0f}"
    if kind == "s":
        return f"{x:.1f}" if abs(x) < 100 else f"{x:,.0f}"
    if kind == "ppl":
        return f"{x:.2f}" if abs(x) < 100 else f"{x:,.1f}"
    return f"{x:.3f}"


def fmt_stat(stat: Stat, kind: str = "3") -> str:
    if not stat:
        return "—"
    text = fmt_value(stat.mean, kind)
    if stat.std is not None:
        text += f" ± {fmt_value(stat.std, kind)}"
    return text


# ---------------------------------------------------------------------------------------------
# building the document


RESULT_COLUMNS: list[tuple[str, str, str]] = [
    ("params", "parameters", "count"),
    ("params_ne", "non-embedding", "count"),
    ("tokens", "tokens seen", "count"),
    ("tokens_to_ref", "tokens to reference", "count"),
    ("wall", "wall time (s)", "s"),
    ("tok_s", "tokens/s", "int"),
    ("train_nll", "train NLL", "3"),
    ("val_nll", "val NLL", "3"),
    ("test_nll", "test NLL", "3"),
    ("train_ppl", "train ppl", "ppl"),
    ("val_ppl", "val ppl", "ppl"),
    ("test_ppl", "test ppl", "ppl"),
    ("train_bpb", "train bpb", "3"),
    ("val_bpb", "val bpb", "3"),
    ("test_bpb", "test bpb", "3"),
]


def results_table(group: GroupResult, diversity_strategy: str | None) -> Table:
    columns = ["run"] + [c[1] for c in RESULT_COLUMNS]
    div_cols = [("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("distinct_3", "distinct-3"),
                ("distinct_4", "distinct-4"), ("distinct_5", "distinct-5"), ("repetition", "repetition-4")]
    columns += [c[1] for c in div_cols]
    rows = []
    for e in group.entries:
        row = [_entry_name(e)]
        row += [fmt_stat(e.get(key), kind) for key, _, kind in RESULT_COLUMNS]
        row += [fmt_stat(e.get(key)) for key, _ in div_cols]
        rows.append(row)
    seeds = max((len(e.runs) for e in group.entries), default=1)
    caption = (f"NLL in nats per token; ppl = exp(NLL); bpb = bits per UTF-8 byte. Distinct-n (words) and "
               f"repetition-4 of the continuations under {diversity_strategy or 'the diversity strategy'}."
               + (f" Mean ± std over {seeds} seeds." if seeds >= 2 else ""))
    return Table(columns, rows, caption)


def _entry_name(e: Entry) -> str:
    missing = len(e.runs) - len(e.finished)
    name = e.label
    if e.source_group:
        name += f" [{e.source_group}]"
    if missing:
        name += f" ({missing} of {len(e.runs)} runs not finished)"
    return name


def diversity_table(group: GroupResult, strategies: list[str]) -> Table:
    columns = ["run", "strategy"] + [f"distinct-{n}" for n in range(1, 6)] + ["repetition-4", "diversity score"]
    rows = []
    for e in group.entries:
        for s in strategies:
            if not e.get(f"{s}:word_distinct_1"):
                continue
            rows.append([_entry_name(e), s] + [fmt_stat(e.get(f"{s}:word_distinct_{n}")) for n in range(1, 6)]
                        + [fmt_stat(e.get(f"{s}:repetition_4")), fmt_stat(e.get(f"{s}:score"))])
    return Table(columns, rows, "Word distinct-n pooled over all continuations (1.0 = no n-gram repeats); "
                                "repetition-4 = share of word 4-grams repeating an earlier one in the same text; "
                                "diversity score = mean of distinct-1..5.")


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
        row = [_entry_name(e)]
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
        row = [_entry_name(e)]
        for s in strategies:
            texts = (sp.get("samples") or {}).get(s) or []
            row.append("\n\n".join(_one_line(t) for t in texts) if texts else "—")
        rows.append(row)
    return Table(["model"] + strategies, rows, f"The study prompt «{prompt}» continued by each model.",
                 kind="samples"), prompt


def budget_section(results: StudyResults) -> Section:
    rec = results.record
    sec = Section("budget", f"Budget: {rec.get('budget') or '—'}")
    if rec.get("budget_description"):
        text = rec["budget_description"].strip().rstrip(".")
        sec.paragraphs.append(f"{text[:1].upper()}{text[1:]}.")
    changes = rec.get("budget_changes") or []
    if changes:
        rows = [[c["key"], _show(c.get("base"), c["key"]), _show(c.get("budget"), c["key"]),
                 c.get("where", "all runs")] for c in changes]
        sec.blocks.append(Table(["setting", "original recipe", f"{rec.get('budget')} budget", "applies to"], rows,
                                "Every change this budget makes to the original recipe."))
    else:
        sec.blocks.append("This budget runs the original recipe unchanged.")
    # what it came to: tokens, epochs, vocabulary, context
    runs = [r for r in results.runs() if r.finished]
    if runs:
        tokens = sorted(int(r.summary.get("tokens_seen", 0)) for r in runs)  # type: ignore[union-attr]
        epochs = sorted(float(r.summary.get("epochs", 0.0)) for r in runs)  # type: ignore[union-attr]
        vocab = sorted({str(r.summary.get("vocab_size") or (r.config.get("model") or {}).get("vocab_size"))
                        for r in runs})  # type: ignore[union-attr]
        tokenizers = sorted({str(r.summary.get("tokenizer")) for r in runs})  # type: ignore[union-attr]
        context = sorted({int(r.summary.get("context_length", 0)) for r in runs})  # type: ignore[union-attr]
        wall = sum(float(r.summary.get("wall_time_s", 0.0)) for r in runs)  # type: ignore[union-attr]
        sec.blocks.append(
            f"In this study that came to {_range(tokens, 'count')} training tokens per run "
            f"({_range(epochs, '2f')} epochs of the training split), tokenizer {', '.join(tokenizers)} "
            f"(vocabulary {', '.join(vocab)}), context {', '.join(map(str, context))} tokens; "
            f"{len(runs)} distinct runs trained for {wall / 60:.1f} minutes in total "
            f"(seeds: {', '.join(map(str, rec.get('seeds') or [])) or '—'}).")
    return sec


def _range(values: list[float], kind: str) -> str:
    lo, hi = values[0], values[-1]
    f = (lambda v: fmt_value(v, "count")) if kind == "count" else (lambda v: f"{v:.2f}")
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}–{f(hi)}"


def _show(v: Any, key: str = "") -> str:
    if v is None:
        return "all" if key == "data.num_stories" else "—"
    if isinstance(v, list):
        return "/".join(_show(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def findings_section(results: StudyResults, findings: list[Finding]) -> Section:
    sec = Section("findings", "Findings: the original study's claims against these numbers")
    sec.paragraphs.append(
        "Each claim is checked by comparing the numbers it is about. A comparison agrees when the difference "
        "has the claimed sign and exceeds the noise, disagrees when it has the opposite sign and exceeds the "
        "noise, and is within noise otherwise; the noise is the seeds' standard deviation with two or more "
        "seeds, else a fixed tolerance (" + _tolerances(results) + ").")
    rows = [[f.claim, f.verdict, f.evidence] for f in findings]
    counts = {v: sum(f.verdict == v for f in findings) for v in (AGREES, DISAGREES, NOISE)}
    sec.blocks.append(Table(["claim", "verdict", "evidence"], rows,
                            f"{counts[AGREES]} agree, {counts[DISAGREES]} disagree, {counts[NOISE]} within noise, "
                            f"{len(findings) - sum(counts.values())} not checked.", kind="findings"))
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
        seed = (r.config.get("train") or {}).get("seed", "—")
        rows.append([labels.get(key, r.directory.name), _rel_name(r.directory, results.directory),
                     ", ".join(where.get(key, [])) or "—", str(seed), str(status)])
    sec.paragraphs.append("One directory per distinct run; groups that ask for the same configuration share it.")
    sec.blocks.append(Table(["run", "directory", "groups", "seed", "status"], rows))
    return sec


def _rel_name(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def build_document(results: StudyResults, image_dir: Path, findings: bool = True) -> Document:
    rec = results.record
    intro = []
    if rec.get("description"):
        intro.append(rec["description"])
    meta = [f"generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"]
    if rec.get("budget"):
        meta.append(f"budget {rec['budget']}")
    if rec.get("seeds"):
        meta.append(f"{len(rec['seeds'])} seed(s)")
    meta.append(f"{len(results.runs())} runs")
    intro.append(" · ".join(meta))
    sections: list[Section] = []
    if rec.get("budget") is not None:
        sections.append(budget_section(results))
    if findings:
        sections.append(findings_section(results, check_claims(results)))
    for group in results.groups:
        sections.append(group_section(group, results, image_dir))
    sections.append(runs_section(results))
    return Document(rec.get("title") or "picollm study", intro, sections)


# ---------------------------------------------------------------------------------------------
# rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n\n", "<br><br>").replace("\n", " ")


def render_markdown(doc: Document, out_dir: Path) -> str:
    lines = [f"# {doc.title}", ""]
    for p in doc.intro:
        lines += [p, ""]
    lines += ["## Contents", ""]
    lines += [f"- [{s.title}](#{s.anchor})" for s in doc.sections]
    lines.append("")
    for s in doc.sections:
        lines += [f'<a id="{s.anchor}"></a>', "", f"## {s.title}", ""]
        for p in s.paragraphs:
            lines += [p, ""]
        for b in s.blocks:
            if isinstance(b, str):
                lines += [b, ""]
            elif isinstance(b, Image):
                rel = b.path.relative_to(out_dir) if b.path.is_relative_to(out_dir) else b.path
                lines += [f"![{b.alt}]({rel.as_posix()})", ""]
            else:
                lines.append("| " + " | ".join(_md_cell(c) for c in b.columns) + " |")
                lines.append("|" + "|".join("---" for _ in b.columns) + "|")
                for row in b.rows:
                    cells = list(row)
                    if b.kind == "findings":
                        cells[1] = f"**{cells[1]}**"
                    lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
                lines.append("")
                if b.caption:
                    lines += [f"*{b.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
background:#fafafa;color:#1d1d1f;line-height:1.45}
main{max-width:1440px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.7em;margin:0.2em 0 0.3em}h2{font-size:1.3em;margin-top:2.2em;border-bottom:1px solid #ddd;
padding-bottom:4px}
p.meta{color:#666;font-size:0.9em}
nav ul{columns:2;font-size:0.92em}
.scroll{overflow-x:auto;margin:10px 0 4px}
table{border-collapse:collapse;font-size:0.8em;background:#fff}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
td.n{text-align:right;white-space:nowrap}
th{background:#f0f0f3;position:sticky;top:0}
td:first-child,th:first-child{text-align:left;white-space:nowrap}
table.samples td{text-align:left;white-space:pre-wrap;max-width:360px;min-width:200px;font-size:0.95em}
table.findings td{text-align:left}
table.findings td:nth-child(1){white-space:normal;max-width:320px;font-weight:500}
table.findings td:nth-child(3){max-width:640px}
td.v-agrees{background:#e3f4e1;color:#1b5e20;font-weight:600;white-space:nowrap}
td.v-disagrees{background:#fde4e1;color:#b71c1c;font-weight:600;white-space:nowrap}
td.v-noise{background:#fff6d6;color:#7a5a00;font-weight:600;white-space:nowrap}
td.v-unchecked{background:#eee;color:#555;white-space:nowrap}
p.caption{color:#555;font-size:0.82em;margin:2px 0 14px}
img{max-width:100%;border:1px solid #e4e4e4;background:#fff;margin:8px 0}
"""

_NUMERIC = re.compile(r"^[-—]$|^-?[\d,.]+[KM%]?( ± [\d,.]+[KM%]?)?$")
_VERDICT_CLASS = {AGREES: "v-agrees", DISAGREES: "v-disagrees", NOISE: "v-noise"}


def _html_table(t: Table) -> str:
    out = [f'<div class="scroll"><table class="{t.kind}"><thead><tr>']
    out += [f"<th>{html.escape(c)}</th>" for c in t.columns]
    out.append("</tr></thead><tbody>")
    for row in t.rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = ""
            if t.kind == "findings" and i == 1:
                cls = f' class="{_VERDICT_CLASS.get(cell, "v-unchecked")}"'
            text = html.escape(cell)
            if not cls and _NUMERIC.match(cell):
                cls = ' class="n"'
            if t.kind == "samples":
                text = text.replace("«", "<i style=\"color:#777\">«").replace("»", "»</i>")
            out.append(f"<td{cls}>{text}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    if t.caption:
        out.append(f'<p class="caption">{html.escape(t.caption)}</p>')
    return "".join(out)


def render_html(doc: Document) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{html.escape(doc.title)}</h1>"]
    for i, p in enumerate(doc.intro):
        cls = ' class="meta"' if i == len(doc.intro) - 1 else ""
        parts.append(f"<p{cls}>{html.escape(p)}</p>")
    parts.append("<nav><ul>" + "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>'
                                        for s in doc.sections) + "</ul></nav>")
    for s in doc.sections:
        parts.append(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>')
        parts += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
        for b in s.blocks:
            if isinstance(b, str):
                parts.append(f"<p>{html.escape(b)}</p>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                parts.append(f'<img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">')
            else:
                parts.append(_html_table(b))
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def write_report(results: StudyResults, out_dir: str | Path, findings: bool = True) -> Path:
    """Write index.html and report.md (+ PNGs) into `out_dir`; returns the HTML path."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "plots"
    image_dir.mkdir(parents=True, exist_ok=True)
    for old in image_dir.glob("*.png"):
        old.unlink()
    doc = build_document(results, image_dir, findings=findings)
    (out_dir / "report.md").write_text(render_markdown(doc, out_dir), encoding="utf-8")
    index = out_dir / "index.html"
    index.write_text(render_html(doc), encoding="utf-8")
    return index


def build_study_report(study_dir: str | Path) -> Path:
    """`picollm report DIR`: the report of a study directory, from its logs."""
    study_dir = Path(study_dir)
    return write_report(load_results(study_dir), study_dir / REPORT_DIR)
