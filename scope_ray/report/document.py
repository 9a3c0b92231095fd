"""A report as plain data (sections of text, tables and figures) and its two renderings.

:mod:`scope_ray.report.content` decides what the report says; this module only lays it out, the
same content twice: Markdown that reads well in a terminal (aligned pipe tables, figures as
relative links, no HTML) and one self-contained HTML file (inline CSS, figures as base64
``data:`` URIs; nothing is fetched, so it opens offline). Pure: no Ray, no storage.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field

from scope_ray.report.figures import format_cell, table_markdown


@dataclass
class Table:
    """Rows as dicts; ``columns`` are ``(key, header, format spec)`` as in ``table_markdown``."""

    columns: list[tuple[str, str, str]]
    rows: list[dict]
    title: str = ""
    notes: list[str] = field(default_factory=list)  # one line each, printed under the table


@dataclass
class Figure:
    caption: str
    filename: str  # basename under the report's figures/ folder
    png: bytes


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    level: int = 2


@dataclass
class Document:
    title: str
    sections: list[Section]


FIGURES_DIR = "figures"


def render_markdown(doc: Document) -> str:
    out = [f"# {doc.title}", ""]
    for sec in doc.sections:
        out += ["#" * sec.level + " " + sec.title, ""]
        for p in sec.paragraphs:
            out += [p, ""]
        for t in sec.tables:
            if t.title:
                out += [t.title, ""]
            out.append(table_markdown(t.rows, t.columns, aligned=True).rstrip("\n"))
            out.append("")
            for note in t.notes:
                out += [f"- {note}"]
            if t.notes:
                out.append("")
        for f in sec.figures:
            out += [f"![{f.caption}]({FIGURES_DIR}/{f.filename})", ""]
    return "\n".join(out).rstrip("\n") + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
 padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem;border-bottom:2px solid #4477aa;padding-bottom:.3rem}
h2{font-size:1.3rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
h3{font-size:1.1rem;margin-top:1.6rem}
div.wide{overflow-x:auto}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{border:1px solid #ccc;padding:.25rem .55rem}
th{background:#eef2f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.paper td{background:#fbf7ea;font-style:italic}
p.caption{font-size:.85rem;color:#555;margin:.2rem 0 1.2rem}
ul.notes{font-size:.85rem;color:#444;margin-top:.2rem}
figure{margin:1rem 0}
figure img{max-width:100%;border:1px solid #eee}
code{background:#f4f4f4;padding:0 .2rem}
"""

# Marks every image's load state on the DOM (data-state, data-natural-width), so a headless
# browser's DOM dump shows whether each embedded figure decoded (tests/browser.py reads it).
IMAGE_CHECK_SCRIPT = """
function mark(img){img.dataset.state=(img.complete&&img.naturalWidth>0)?'loaded':'broken';
 img.dataset.naturalWidth=String(img.naturalWidth);}
window.addEventListener('load',function(){var imgs=document.images;
 for(var i=0;i<imgs.length;i++){mark(imgs[i]);}document.body.dataset.imagesChecked=String(imgs.length);});
"""


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in t.columns)
    body = []
    for row in t.rows:
        cls = ' class="paper"' if str(row.get("_kind", "")) == "paper" else ""
        cells = "".join(
            f'<td class="num">{html.escape(format_cell(row.get(k), spec))}</td>' if spec
            else f"<td>{html.escape(format_cell(row.get(k), spec))}</td>"
            for k, _, spec in t.columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    parts = []
    if t.title:
        parts.append(f"<p><strong>{html.escape(t.title)}</strong></p>")
    parts.append(f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    if t.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_inline(n)}</li>" for n in t.notes) + "</ul>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code> (the only inline markup paragraphs use)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(doc: Document) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(doc.title)}</title>", f"<style>{_CSS}</style>",
           f"<script>{IMAGE_CHECK_SCRIPT}</script>", "</head><body>", f"<h1>{html.escape(doc.title)}</h1>"]
    for sec in doc.sections:
        h = min(max(sec.level, 2), 6)
        out.append(f"<h{h}>{html.escape(sec.title)}</h{h}>")
        out += [f"<p>{_inline(p)}</p>" for p in sec.paragraphs]
        out += [_html_table(t) for t in sec.tables]
        for f in sec.figures:
            data = base64.b64encode(f.png).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(f.caption)}" src="data:image/png;base64,{data}">'
                       f'<p class="caption">{html.escape(f.caption)}</p></figure>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
