"""A tiny document model rendered to Markdown and to self-contained HTML.

A report is a list of blocks (:class:`Heading`, :class:`Para`, :class:`Table`, :class:`Figure`,
:class:`Code`). Both renderers walk the same list, so the Markdown and the HTML always say the
same thing. Markdown figures are written as PNG files beside the report; HTML figures are
embedded as base64 ``data:`` URIs and the CSS is inline, so ``report.html`` is one file that
opens anywhere without network access.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Union


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    """A paragraph; ``**bold**`` and ``code`` spans are rendered in both formats."""

    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    align_right: bool = True  # numbers: every column but the first is right-aligned


@dataclass
class Figure:
    """A PNG image (bytes) with a file stem (Markdown) and a caption."""

    name: str
    png: bytes
    caption: str = ""


@dataclass
class Code:
    text: str
    language: str = ""


@dataclass
class Details:
    """Collapsible in HTML (``<details>``), a plain sub-section in Markdown."""

    summary: str
    blocks: list = field(default_factory=list)


Block = Union[Heading, Para, Table, Figure, Code, Details]


# ---- Markdown ----------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], figure_dir: str = "report_files") -> tuple[str, dict[str, bytes]]:
    """Return (Markdown text, {relative PNG path: bytes}) ; figures are referenced by relative path."""
    out: list[str] = []
    files: dict[str, bytes] = {}
    for block in _flatten(blocks):
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + block.text)
        elif isinstance(block, Para):
            out.append(block.text)
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                     "| " + " | ".join(("---:" if (block.align_right and i) else "---") for i in range(len(block.headers))) + " |"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            if block.caption:
                lines.insert(0, f"*{block.caption}*\n")
            out.append("\n".join(lines))
        elif isinstance(block, Figure):
            rel = f"{figure_dir}/{block.name}.png"
            files[rel] = block.png
            out.append(f"![{block.caption or block.name}]({rel})" + (f"\n\n*{block.caption}*" if block.caption else ""))
        elif isinstance(block, Code):
            out.append(f"```{block.language}\n{block.text.rstrip()}\n```")
    return "\n\n".join(out) + "\n", files


def _flatten(blocks: list[Block]) -> list[Block]:
    flat: list[Block] = []
    for block in blocks:
        if isinstance(block, Details):
            flat.append(Heading(block.summary, 3))
            flat.extend(_flatten(block.blocks))
        else:
            flat.append(block)
    return flat


# ---- HTML --------------------------------------------------------------------------------------
CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1d2330;
       max-width: 1080px; margin: 2em auto; padding: 0 1.5em; background: #fff; }
h1 { font-size: 1.7em; border-bottom: 2px solid #3a6ea5; padding-bottom: .2em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #d5dbe5; padding-bottom: .15em; }
h3 { font-size: 1.08em; margin-top: 1.2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }
th, td { border: 1px solid #d5dbe5; padding: .28em .65em; }
th { background: #eef2f8; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #f8f9fb; }
caption { caption-side: top; text-align: left; font-style: italic; color: #4a5568; padding-bottom: .3em; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e2e6ee; }
figcaption { color: #4a5568; font-size: .9em; }
pre { background: #f4f6fa; border: 1px solid #e2e6ee; padding: .8em; overflow-x: auto; font-size: .85em; }
code { font-family: "SFMono-Regular", Consolas, "Liberation Mono", monospace; font-size: .92em; }
details { margin: .6em 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _inline(text: str) -> str:
    """Escape, then render ``code`` and **bold** spans."""
    import re

    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _html_blocks(blocks: list[Block]) -> list[str]:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            cap = f"<caption>{_inline(block.caption)}</caption>" if block.caption else ""
            head = "".join(f"<th>{_inline(h)}</th>" for h in block.headers)
            rows = []
            for row in block.rows:
                cells = "".join(
                    f'<td class="num">{_inline(c)}</td>' if (block.align_right and i) else f"<td>{_inline(c)}</td>"
                    for i, c in enumerate(row)
                )
                rows.append(f"<tr>{cells}</tr>")
            out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            alt = html.escape(block.caption or block.name, quote=True)
            cap = f"<figcaption>{_inline(block.caption)}</figcaption>" if block.caption else ""
            out.append(f'<figure><img alt="{alt}" data-name="{html.escape(block.name, quote=True)}" '
                       f'src="data:image/png;base64,{data}">{cap}</figure>')
        elif isinstance(block, Code):
            out.append(f"<pre><code>{html.escape(block.text.rstrip())}</code></pre>")
        elif isinstance(block, Details):
            inner = "\n".join(_html_blocks(block.blocks))
            out.append(f"<details><summary>{_inline(block.summary)}</summary>\n{inner}\n</details>")
    return out


def render_html(blocks: list[Block], title: str) -> str:
    """One self-contained HTML page: inline CSS, images as data URIs, no scripts, no external links."""
    body = "\n".join(_html_blocks(blocks))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
