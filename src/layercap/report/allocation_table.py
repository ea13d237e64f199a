"""The allocation comparison's record (``layercap.allocation_comparison/v1``) and its renderings:
Markdown table, CSV summary and a PNG (accuracy per rule and task; units per block)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from layercap.errors import LayercapError
from layercap.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text, read_json

SCHEMA = "layercap.allocation_comparison/v1"


@dataclass
class Cell:
    """One (task, rule, seed) fine-tuning result; accuracies in [0, 1]."""

    task: str
    rule: str
    seed: int
    acc: float | None
    acc_norm: float | None
    final_lm_loss: float | None
    train_time_s: float
    counts: list[int]
    eval: dict = field(default_factory=dict)
    wall_time_s: float = 0.0  # the cell's whole finetune run (training + evaluation), seconds


@dataclass
class AllocationComparison:
    """All cells plus per (rule, task) summaries. Schema ``layercap.allocation_comparison/v1``."""

    model: str
    budget: float
    rules: list[str]
    tasks: list[dict[str, str]]
    seeds: list[int]
    options: dict[str, Any]
    cells: list[Cell]
    summary: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    allocations: dict[str, dict[str, list[int]]]
    wall_time_s: float
    machine: dict[str, Any]
    command: str
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AllocationComparison":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not an allocation comparison: schema {d.get('schema')!r}, expected {SCHEMA!r}.")
        d = dict(d)
        d["cells"] = [Cell(**c) for c in d["cells"]]
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def save(self, path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "AllocationComparison":
        return cls.from_dict(read_json(path, "comparison", "Rerun the comparison with --resume."))


def markdown_table(c: AllocationComparison) -> str:
    tasks = [t["name"] for t in c.tasks] + (["mean"] if len(c.tasks) > 1 else [])
    by = {(r["rule"], r["task"]): r for r in c.summary}
    lines = ["| rule | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for rule in c.rules:
        row = []
        for t in tasks:
            r = by.get((rule, t))
            row.append(f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}" if r else "-")
        lines.append(f"| {rule} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_outputs(c: AllocationComparison, out: Path) -> None:
    c.save(out / "comparison.json")
    header = ["task", "rule", "n_seeds", "acc_mean", "acc_std", "acc_norm_mean", "acc_norm_std", "final_loss_mean", "final_loss_std"]
    atomic_write_csv(out / "comparison.csv", header, [[r.get(h, "") for h in header] for r in c.summary])
    md = [f"# Allocation comparison on {c.model}", "",
          f"Budget {c.budget:g} units, seeds {c.seeds}, adapter {c.options.get('adapter')} "
          f"(rank {c.options.get('rank')}, top-k {c.options.get('top_k')}), max steps {c.options.get('max_steps')}, "
          f"batch {c.options.get('batch_size')}, lr {c.options.get('lr')}, max length {c.options.get('max_length')}, "
          f"eval limit {c.options.get('limit_eval')}, eval format {c.options.get('eval_format')}.", "",
          "Accuracy (%), mean ± sample std over seeds:", "", markdown_table(c), "",
          "Paired differences acc(MDL) - acc(other) in points (same seed: same data order and init); "
          "'beyond noise' when |mean| > 2 standard errors:", "",
          "| mdl | other | task | diff | se | beyond noise |", "|---|---|---|---|---|---|"]
    for p in c.paired:
        se = "-" if p["diff_se"] is None else f"{100 * p['diff_se']:.1f}"
        verdict = "n/a (one seed)" if p["diff_se"] is None else ("yes" if p["beyond_2se"] else "no")
        md.append(f"| {p['mdl']} | {p['other']} | {p['task']} | {100 * p['diff_mean']:+.1f} | {se} | {verdict} |")
    md += ["", "Experts per block (first task):", ""]
    first = next(iter(c.allocations.values()), {})
    for rule, ns in first.items():
        md.append(f"- {rule}: {ns}")
    cells_min = sum(x.wall_time_s for x in c.cells) / 60
    md += ["", f"Fine-tuning cells: {cells_min:.1f} min in total (sum of the cells' wall times, training + "
           f"evaluation; scoring not included); this invocation {c.wall_time_s / 60:.1f} min (cells finished "
           f"earlier are read back). Machine: {c.machine}.", "", f"Command: `{c.command}`", ""]
    atomic_write_text(out / "comparison.md", "\n".join(md))
    atomic_write_bytes(out / "comparison.png", plot(c))


def plot(c: AllocationComparison) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t["name"] for t in c.tasks]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    by = {(r["rule"], r["task"]): r for r in c.summary}
    width = 0.8 / max(1, len(c.rules))
    for j, rule in enumerate(c.rules):
        xs, ms, ss = [], [], []
        for i, t in enumerate(tasks):
            r = by.get((rule, t))
            if r:
                xs.append(i + j * width)
                ms.append(100 * r["acc_mean"])
                ss.append(100 * r["acc_std"])
        axes[0].bar(xs, ms, width, yerr=ss, capsize=3, label=rule)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_title(f"accuracy, mean ± std over seeds {c.seeds}")
    axes[0].legend(fontsize=8)
    first = next(iter(c.allocations.values()), {})
    for rule, ns in first.items():
        axes[1].plot(range(len(ns)), ns, marker="o", ms=3, label=rule)
    axes[1].set_xlabel("block")
    axes[1].set_ylabel("experts / rank units")
    axes[1].set_title(f"allocation ({tasks[0] if tasks else ''}), budget {c.budget:g}")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
