"""Per-layer plots of a run (matplotlib, Agg backend), returned as PNG bytes.

Each function takes ``{label: values}`` with one value per block (shape (K,), block order) and
draws them against the block index, so scores, allocations and ratios of different rules can
be compared layer by layer. No pyplot global state is used (figures are created and closed
explicitly), so plotting is safe inside a long-running process.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

# One colour per label, stable across plots: MDL is always the same dark blue.
PALETTE = ["#1f4e99", "#d1495b", "#edae49", "#00798c", "#66a182", "#8d6a9f", "#555555", "#c97b2a"]
MDL_LABELS = ("mdl",)


def _legend(ax, n: int) -> None:
    """Legend to the right of the axes, so it never hides data however many blocks there are."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def _figure(width: float = 9.0, height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _colours(labels: Sequence[str]) -> dict[str, str]:
    out, i = {}, 0
    for label in labels:
        if label in MDL_LABELS:
            out[label] = PALETTE[0]
        else:
            i += 1
            out[label] = PALETTE[i % len(PALETTE)]
    return out


def _xaxis(ax, k: int) -> None:
    ax.set_xlabel("block index k")
    step = max(1, k // 15)
    ax.set_xticks(range(0, k, step))
    ax.set_xlim(-0.6, k - 0.4)
    ax.grid(True, axis="y", alpha=0.3)


def plot_lines(series: Mapping[str, np.ndarray], ylabel: str, title: str, reference: float | None = None,
               reference_label: str = "") -> bytes:
    """Line plot of one value per block for each label (e.g. q_k per scoring method)."""
    fig, ax = _figure()
    colours = _colours(list(series))
    k = 0
    for label, values in series.items():
        values = np.asarray(values, dtype=float)
        k = max(k, len(values))
        ax.plot(np.arange(len(values)), values, marker="o", markersize=3, linewidth=2.2 if label in MDL_LABELS else 1.4,
                color=colours[label], label=label)
    if reference is not None:
        ax.axhline(reference, color="#999999", linestyle=":", linewidth=1, label=reference_label or None)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    _xaxis(ax, k)
    _legend(ax, len(series))
    return _png(fig)


def plot_bars(series: Mapping[str, np.ndarray], ylabel: str, title: str, markers: Mapping[str, np.ndarray] | None = None) -> bytes:
    """Grouped bars: one group per block, one bar per label (e.g. experts per layer per rule).

    ``markers``: optional ``{label: values}`` drawn as black ticks over the bars of that label
    (e.g. the sparsity measured in the pruned model against the target ratio).
    """
    fig, ax = _figure()
    labels = list(series)
    colours = _colours(labels)
    k = max(len(v) for v in series.values())
    # Many blocks x many rules make bars too thin to read: draw step lines instead.
    as_lines = k * len(labels) > 48
    width = 0.84 / max(1, len(labels))
    for j, label in enumerate(labels):
        values = np.asarray(series[label], dtype=float)
        if as_lines:
            x = np.arange(len(values))
            ax.step(x, values, where="mid", color=colours[label], label=label,
                    linewidth=2.4 if label in MDL_LABELS else 1.3, zorder=3 if label in MDL_LABELS else 2)
        else:
            x = np.arange(len(values)) - 0.42 + width * (j + 0.5)
            ax.bar(x, values, width=width, color=colours[label], label=label, edgecolor="none")
        if markers and label in markers:
            ax.scatter(x, np.asarray(markers[label], dtype=float), marker="_" if not as_lines else "x",
                       color="black", s=40 if not as_lines else 14, zorder=4, label=f"{label} (measured)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    _xaxis(ax, k)
    _legend(ax, len(labels))
    return _png(fig)


def plot_heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str], title: str, colorbar: str) -> bytes:
    """A (rows, cols) matrix as a heat map on a log colour scale (damage spans decades); rows are
    blocks, columns pruning ratios. Missing values (NaN) are left blank."""
    from matplotlib.colors import LogNorm

    m = np.asarray(matrix, dtype=np.float64)
    positive = m[np.isfinite(m) & (m > 0)]
    fig, ax = _figure(width=6.5, height=min(10.0, max(3.0, 0.16 * len(row_labels) + 1.2)))  # per-Linear tables: 200+ rows
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    image = ax.imshow(np.where(m > 0, m, np.nan), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    step = max(1, len(row_labels) // 15)
    ax.set_yticks(range(0, len(row_labels), step), [str(r) for r in row_labels][::step], fontsize=7)
    ax.set_xlabel("pruning ratio of the block alone")
    ax.set_ylabel("block" if len(row_labels) <= 64 else "Linear")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar)
    return _png(fig)
