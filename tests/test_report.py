"""Report building blocks: plots (PNG), Markdown and self-contained HTML rendering."""

from __future__ import annotations

import base64
import re

import numpy as np

from layercap.report.document import Code, Details, Figure, Heading, Para, Table, render_html, render_markdown
from layercap.report.plots import plot_bars, plot_lines

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_MAGIC
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_plots_are_png_images_of_a_readable_size():
    q = {"kfac": np.array([0.1, 0.4, 0.3, 0.2]), "diag": np.array([0.25] * 4)}
    w, h = _png_size(plot_lines(q, "q_k", "scores", reference=0.25, reference_label="uniform"))
    assert 600 <= w <= 1200 and 250 <= h <= 600
    png = plot_bars({"mdl": np.array([1, 5, 3]), "uniform": np.array([3, 3, 3])}, "experts", "alloc",
                    markers={"mdl": np.array([1.1, 4.9, 3.0])})
    assert _png_size(png)[0] >= 600
    # different data -> a different picture (the plot is not a constant)
    assert png != plot_bars({"mdl": np.array([5, 1, 3]), "uniform": np.array([3, 3, 3])}, "experts", "alloc")


def _doc(png: bytes):
    return [
        Heading("Title <with> markup", 1),
        Para("Uses **bold** and `code` | pipes."),
        Table(["rule", "value"], [["mdl", "1.50"], ["a|b", "2"]], caption="cap"),
        Figure("fig1", png, caption="a figure"),
        Details("more", [Code("key: value\n")]),
    ]


def test_markdown_rendering():
    png = plot_lines({"a": np.arange(3.0)}, "y", "t")
    md, files = render_markdown(_doc(png), "report_files")
    assert md.startswith("# Title <with> markup\n")
    assert "| rule | value |\n| --- | ---: |\n| mdl | 1.50 |\n| a\\|b | 2 |" in md
    assert "![a figure](report_files/fig1.png)" in md
    assert files == {"report_files/fig1.png": png}
    assert "### more" in md and "```\nkey: value\n```" in md


def test_html_is_self_contained_and_escaped():
    png = plot_lines({"a": np.arange(3.0)}, "y", "t")
    page = render_html(_doc(png), "T & T")
    assert page.startswith("<!DOCTYPE html>") and "<title>T &amp; T</title>" in page
    assert "<h1>Title &lt;with&gt; markup</h1>" in page
    assert "<strong>bold</strong>" in page and "<code>code</code>" in page
    # no external resources of any kind: every src is a data URI, no links, no scripts
    assert not re.search(r"(?:src|href)=\"(?!data:)", page)
    assert "<script" not in page and "<link" not in page
    srcs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(s) for s in srcs] == [png]
    assert '<td class="num">1.50</td>' in page and "<td>mdl</td>" in page
    assert "<details><summary>more</summary>" in page
