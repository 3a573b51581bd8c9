"""Documents as plain blocks (headings, paragraphs, tables, images), rendered to Markdown and HTML.

The HTML page is self-contained: inline CSS, images embedded as base64 PNG ``data:`` URIs. Text
is escaped by the renderers, so callers pass plain text (model answers included).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    """A section title (level 1-3)."""

    level: int
    text: str


@dataclass(frozen=True)
class Para:
    """A paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class Facts:
    """Key/value lines about the run (model, secret fingerprint, sizes)."""

    items: list[tuple[str, str]]


@dataclass(frozen=True)
class Table:
    """A table of plain-text cells; ``groups`` adds a spanning header row in HTML."""

    headers: list[str]
    rows: list[list[str]]
    groups: list[tuple[str, int]] = field(default_factory=list)  # spanning header row
    css: str = ""


@dataclass(frozen=True)
class Bullets:
    """A bulleted list of plain-text items."""

    items: list[str]


@dataclass(frozen=True)
class Image:
    """A PNG beside the Markdown file, embedded as base64 in the HTML page."""

    name: str
    alt: str


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # where a Markdown renderer would open HTML


def _md_text(text: str) -> str:
    """Plain text for Markdown: no HTML tag can open, Markdown syntax is escaped."""
    text = _TAG_START.sub("&lt;", text.replace("&", "&amp;"))
    return _MD_SPECIAL.sub(r"\\\1", text)


def md_table(t: Table) -> str:
    """One table as Markdown; a spanning group name prefixes its columns' headers."""
    headers = t.headers
    if t.groups:
        names = [g for g, span in t.groups for _ in range(span)]
        headers = [f"{g}, {h}" if g else h for g, h in zip(names, t.headers, strict=True)]
    lines = ["| " + " | ".join(_md_text(h) for h in headers) + " |"]
    lines.append("|" + "---|" * len(headers))
    lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def to_markdown(blocks: list) -> str:
    """Render blocks as Markdown (images referenced by file name, beside the Markdown file)."""
    out = []
    for b in blocks:
        match b:
            case Heading(level, text):
                out.append("#" * level + " " + _md_text(text))
            case Para(text):
                out.append(_md_text(text))
            case Facts(items):
                out.append("\n".join(f"- **{_md_text(k)}**: {_md_text(v)}" for k, v in items))
            case Bullets(items):
                out.append("\n".join(f"- {_md_text(item)}" for item in items))
            case Table():
                out.append(md_table(b))
            case Image(name, alt):
                out.append(f"![{_md_text(alt)}]({name})")
        out.append("")
    return "\n".join(out)


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       margin: 0; background: #fafafa; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 12px; }
h2 { font-size: 1.25em; margin: 28px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 18px 0 6px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f7; } tr:nth-child(even) td { background: #fafbfc; }
table.results td, table.results th { white-space: nowrap; }
table.examples { table-layout: fixed; width: 100%; font-size: 0.88em; }
table.examples td { overflow-wrap: anywhere; }
figure { margin: 12px 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #666; font-size: 0.9em; }
.scroll { overflow-x: auto; }
"""


def _html_table(t: Table) -> str:
    def row(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    head = []
    if t.groups:
        spans = "".join(
            f'<th colspan="{span}">{html.escape(g)}</th>'
            if span > 1
            else f"<th>{html.escape(g)}</th>"
            for g, span in t.groups
        )
        head.append(f"<tr>{spans}</tr>")
    head.append(row(t.headers, "th"))
    body = "\n".join(row(r, "td") for r in t.rows)
    css = f' class="{t.css}"' if t.css else ""
    return (
        f'<div class="scroll"><table{css}>\n<thead>{"".join(head)}</thead>\n'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


def to_html(blocks: list, folder: str | Path) -> str:
    """Render blocks as one self-contained HTML page (inline CSS, images as data: URIs).

    Args:
        blocks: the document.
        folder: where the images' PNG files are (read and embedded).
    """
    title = next((b.text for b in blocks if isinstance(b, Heading)), "report")
    out = []
    for b in blocks:
        match b:
            case Heading(level, text):
                out.append(f"<h{level}>{html.escape(text)}</h{level}>")
            case Para(text):
                out.append(f"<p>{html.escape(text)}</p>")
            case Facts(items):
                dl = "".join(
                    f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items
                )
                out.append(f'<dl class="facts">{dl}</dl>')
            case Bullets(items):
                lis = "".join(f"<li>{html.escape(item)}</li>" for item in items)
                out.append(f"<ul>{lis}</ul>")
            case Table():
                out.append(_html_table(b))
            case Image(name, alt):
                data = base64.b64encode((Path(folder) / name).read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
                    f"<figcaption>{html.escape(alt)} ({html.escape(name)})</figcaption></figure>"
                )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        "<body><main>\n" + "\n".join(out) + "\n</main></body>\n</html>\n"
    )
