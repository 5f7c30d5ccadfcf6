"""A self-contained HTML report: every figure embedded as base64 PNG, opens from disk."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from brainrobust.files import write_text


def build_report(sections: Sequence[tuple[str, str, Sequence[Path]]], out: Path,
                 title: str = "brainrobust report") -> Path:
    """Write `out` from (heading, text, [png paths]) sections."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             ("<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
              "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}</style></head><body>"),
             f"<h1>{html.escape(title)}</h1>"]
    for heading, text, images in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2><p>{html.escape(text)}</p>")
        for png in images:
            data = base64.b64encode(Path(png).read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(Path(png).stem)}' "
                         f"src='data:image/png;base64,{data}'><figcaption>{html.escape(Path(png).name)}"
                         "</figcaption></figure>")
    parts.append("</body></html>")
    write_text(out, "\n".join(parts))
    return out
