"""Rendering the report's document to Markdown (with the PNG files beside it) and to one self-contained
HTML page (CSS inline, images embedded as base64)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from picollm.study.document import Document, Image, Table
from picollm.study.verdicts import AGREES, DISAGREES, INCONCLUSIVE, NOISE


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
td.v-inconclusive{background:#e6ecf5;color:#37474f;font-weight:600}
td.v-unchecked{background:#eee;color:#555;white-space:nowrap}
p.caption{color:#555;font-size:0.82em;margin:2px 0 14px}
img{max-width:100%;border:1px solid #e4e4e4;background:#fff;margin:8px 0}
"""

_NUMERIC = re.compile(r"^[-—]$|^-?[\d,.]+[KM%]?( ± [\d,.]+[KM%]?)?$")
_VERDICT_CLASS = {AGREES: "v-agrees", DISAGREES: "v-disagrees", NOISE: "v-noise", INCONCLUSIVE: "v-inconclusive"}


def _html_table(t: Table) -> str:
    out = [f'<div class="scroll"><table class="{t.kind}"><thead><tr>']
    out += [f"<th>{html.escape(c)}</th>" for c in t.columns]
    out.append("</tr></thead><tbody>")
    for row in t.rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = ""
            if t.kind == "findings" and i == 1:
                cls = f' class="{_VERDICT_CLASS.get(cell.split(" (")[0], "v-unchecked")}"'
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


