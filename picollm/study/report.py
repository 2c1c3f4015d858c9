"""The study report: `report/index.html` (self-contained, images embedded) and `report/report.md` (with
the PNG files beside it), built from the run logs and study.json alone: the document is assembled here
from `sections`, and rendered by `render`."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from picollm import rundir
from picollm.study.document import Document, Section
from picollm.study.findings import check_claims
from picollm.study.render import render_html, render_markdown
from picollm.study.results import StudyResults, load_results
from picollm.study.sections import budget_section, findings_section, group_section, lr_section, runs_section


def _tolerance_note(results: StudyResults) -> str:
    f = results.record.get("findings") or {}
    return (f"Verdicts are single-seed: each comparison is judged against a fixed tolerance "
            f"({f.get('loss_tolerance', 0.01):g} nats for losses, {f.get('distinct_tolerance', 0.01):g} for "
            "distinct-n), not against the seeds' noise; run the study with --seeds 2 or more to test the "
            "claims against it.")


def build_document(results: StudyResults, image_dir: Path, findings: bool = True) -> Document:
    rec = results.record
    intro = []
    if findings and results.seeds < 2:
        intro.append(_tolerance_note(results))
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
    lrs = lr_section(results, image_dir)
    if lrs is not None:
        sections.append(lrs)
    if findings:
        sections.append(findings_section(results, check_claims(results)))
    for group in results.groups:
        sections.append(group_section(group, results, image_dir))
    sections.append(runs_section(results))
    return Document(rec.get("title") or "picollm study", intro, sections)


def write_report(results: StudyResults, out_dir: str | Path, findings: bool = True) -> Path:
    """Write index.html and report.md (+ PNGs) into `out_dir`; returns the HTML path."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "plots"
    image_dir.mkdir(parents=True, exist_ok=True)
    for old in image_dir.glob("*.png"):
        old.unlink()
    doc = build_document(results, image_dir, findings=findings)
    (out_dir / rundir.REPORT_MD).write_text(render_markdown(doc, out_dir), encoding="utf-8")
    index = out_dir / rundir.REPORT_HTML
    index.write_text(render_html(doc), encoding="utf-8")
    return index


def build_study_report(study_dir: str | Path) -> Path:
    """`picollm report DIR`: the report of a study directory, from its logs."""
    study_dir = Path(study_dir)
    return write_report(load_results(study_dir), study_dir / rundir.REPORT_DIR)
