"""A small self-contained HTML report: numbers, tables and figures inlined (no external assets)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2rem auto; padding: 0 1rem;
       color: #1f2933; background: #fbfbf8; }
h1 { font-weight: 600; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #d9dcd3; padding-bottom: .3rem; }
table { border-collapse: collapse; margin: .6rem 0; } td, th { padding: .25rem .7rem; text-align: right; }
th { background: #eef0ea; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #f4f5f1; }
.grid { display: flex; flex-wrap: wrap; gap: 1rem; } figure { margin: 0; max-width: 340px; }
figure img { max-width: 100%; border-radius: 6px; border: 1px solid #d9dcd3; }
figcaption { font-size: 13px; color: #52606d; } .words { font-size: 13px; color: #3e4c59; }
code { background: #eef0ea; padding: 0 .3rem; border-radius: 3px; } .muted { color: #7b8794; }
td:first-child { white-space: nowrap; } table.text td, table.text th { text-align: left; }
img { max-width: 100%; }
.warn { color: #8a3b12; background: #fdf1e7; padding: .2rem .5rem; border-radius: 4px; }
"""


def image_tag(path: str | Path, alt: str = "", width: int | None = None) -> str:
    """An <img> with the PNG/JPEG file inlined as base64."""
    path = Path(path)
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    data = base64.b64encode(path.read_bytes()).decode()
    size = f' width="{width}"' if width else ""
    return f'<img src="data:{mime};base64,{data}" alt="{html.escape(alt)}"{size}>'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, text: bool = False) -> str:
    """A table; numbers right-aligned (floats with one decimal), or every column left when `text`."""

    def cell(value: Any) -> str:
        return f"{value:.1f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    css = " class='text'" if text else ""
    return f"<table{css}><tr>{head}</tr>{body}</table>"


def figure(path: str | Path, caption: str, words: str = "") -> str:
    extra = f'<div class="words">{html.escape(words)}</div>' if words else ""
    return f"<figure>{image_tag(path, caption)}<figcaption>{html.escape(caption)}</figcaption>{extra}</figure>"


def page(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """A full HTML document from (heading, html body) sections."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{intro}</p>"
        + "\n".join(parts)
        + "</body></html>"
    )


def escape(text: str) -> str:
    return html.escape(text)
