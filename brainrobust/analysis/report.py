"""A self-contained HTML report: every figure embedded as base64 PNG, opens from disk.

Sections hold figures and tables; a closing "Not drawn" section lists every figure the records
could not support and why, so a missing panel is never mistaken for a missing effect.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from brainrobust.files import write_text


class Section(NamedTuple):
    heading: str
    text: str
    images: Sequence[Path] = ()
    tables: Sequence[tuple[str, pd.DataFrame]] = ()


def _figure(png: Path) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return (f"<figure><img alt='{html.escape(Path(png).stem)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(Path(png).name)}</figcaption></figure>")


def _table(caption: str, table: pd.DataFrame) -> str:
    return (f"<h3>{html.escape(caption)}</h3>"
            + table.to_html(border=0, na_rep="", classes="records", escape=True))


def _not_drawn(items: Sequence[tuple[str, str]]) -> str:
    if not items:
        return "<h2>Not drawn</h2><p>Every figure was drawn.</p>"
    rows = "".join(f"<li><b>{html.escape(what)}</b>: {html.escape(why)}</li>" for what, why in items)
    return f"<h2>Not drawn</h2><ul>{rows}</ul>"


def build_report(sections: Sequence[Section | tuple], out: Path, title: str = "brainrobust report",
                 not_drawn: Sequence[tuple[str, str]] = ()) -> Path:
    """Write `out` from sections ((heading, text, [png paths], [(caption, table)]) tuples) and
    the (figure, reason) pairs of what was not drawn."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             ("<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
              "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
              "table.records{border-collapse:collapse;font-size:.85em}"
              "table.records td,table.records th{padding:.15em .6em;text-align:right}"
              "</style></head><body>"),
             f"<h1>{html.escape(title)}</h1>"]
    for heading, text, images, tables in (Section(*s) for s in sections):
        parts.append(f"<h2>{html.escape(heading)}</h2><p>{html.escape(text)}</p>")
        parts += [_figure(png) for png in images]
        parts += [_table(caption, table) for caption, table in tables]
    parts.append(_not_drawn(not_drawn))
    parts.append("</body></html>")
    write_text(out, "\n".join(parts))
    return out
