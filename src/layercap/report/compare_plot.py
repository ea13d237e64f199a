"""Plot of a pruning comparison: perplexity and mean zero-shot accuracy against sparsity.

One panel per metric (first perplexity text, log scale; mean accuracy over the tasks above
chance), one line per (rule, pruner); the dense model is a dashed horizontal reference. Uses
the Agg canvas without pyplot global state.
"""

from __future__ import annotations

from pathlib import Path

from layercap.io import atomic_write_bytes
from layercap.report.plots import PALETTE, _png

MARKERS = {"wanda": "o", "sparsegpt": "s", "magnitude": "^"}
STYLES = {"wanda": "-", "sparsegpt": "--", "magnitude": ":"}


def plot_comparison(comparison, path: str | Path) -> Path:
    """Write ``comparison.png`` (a ``layercap.evaluate.comparison.Comparison``) to ``path``."""
    from matplotlib.figure import Figure

    ppl_keys, _ = comparison.columns()
    # the legend gets its own column on the right: with a dozen curves it would hide them
    fig = Figure(figsize=(13.0, 4.2), dpi=110)
    grid = fig.add_gridspec(1, 3, width_ratios=(1.0, 1.0, 0.42))
    ax_ppl, ax_acc = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    labels = list(dict.fromkeys(c.label for c in comparison.cells))
    dense = comparison.dense
    # no task above chance (e.g. a random model): fall back to the mean over all tasks
    above = bool(dense.above_chance)
    # MDL rules get the dark blue family first so they stand out; baselines the other colours
    ordered = [l for l in labels if l.startswith("mdl")] + [l for l in labels if not l.startswith("mdl")]
    colour = {l: PALETTE[i % len(PALETTE)] for i, l in enumerate(ordered)}
    for label in labels:
        for method in dict.fromkeys(c.method for c in comparison.cells):
            cells = sorted((c for c in comparison.cells if c.label == label and c.method == method), key=lambda c: c.sparsity)
            if not cells:
                continue
            xs = [c.sparsity for c in cells]
            kw = dict(color=colour[label], marker=MARKERS.get(method, "o"), linestyle=STYLES.get(method, "-"), label=f"{label} + {method}")
            if ppl_keys:
                ax_ppl.plot(xs, [c.eval.ppl[ppl_keys[0]].ppl if ppl_keys[0] in c.eval.ppl else float("nan") for c in cells], **kw)
            acc = [(c.eval.mean_acc_above_chance if above else c.eval.mean_acc) for c in cells]
            ax_acc.plot(xs, [float("nan") if a is None else a for a in acc], **kw)
    if ppl_keys:
        ax_ppl.axhline(dense.ppl[ppl_keys[0]].ppl, color="black", linestyle=":", linewidth=1, label="dense")
        ax_ppl.set_yscale("log")
        ax_ppl.set_ylabel(f"perplexity ({ppl_keys[0]})")
    dense_acc = dense.mean_acc_above_chance if above else dense.mean_acc
    if dense_acc is not None:
        ax_acc.axhline(dense_acc, color="black", linestyle=":", linewidth=1, label="dense")
    chance = [dense.tasks[k].chance for k in (dense.above_chance if above else dense.tasks)]
    if chance:
        ax_acc.axhline(sum(chance) / len(chance), color="grey", linestyle="-.", linewidth=1, label="chance")
    ax_acc.set_ylabel(f"mean acc ({', '.join(dense.above_chance)})" if above else "mean acc (all tasks; none above chance)")
    for ax in (ax_ppl, ax_acc):
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    handles, names = ax_acc.get_legend_handles_labels()
    ax_legend = fig.add_subplot(grid[0, 2])
    ax_legend.axis("off")
    ax_legend.legend(handles, names, fontsize=7, loc="center left", frameon=False)
    fig.suptitle(f"Pruning comparison: {comparison.settings.get('model', '')}", fontsize=10)
    return atomic_write_bytes(path, _png(fig))
