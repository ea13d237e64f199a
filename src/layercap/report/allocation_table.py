"""The allocation comparison's record (``layercap.allocation_comparison/v1``) and its renderings:
Markdown tables, CSV summary and a PNG (held-out NLL per rule, task and adapter; units per block).

``cells`` holds one record per (task, adapter, rule, seed) with ``nll`` (held-out NLL, nats per
token: the text's held-out windows, or the correct answer's tokens of a task's eval items) and
``acc`` where defined, so a script can recompute every table from it."""

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
    """One (task, adapter, rule, seed) fine-tuning result; accuracies in [0, 1], nll in nats/token."""

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
    adapter: str = ""
    nll: float | None = None


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
    adapters: list[str] = field(default_factory=list)
    separation: list[dict[str, Any]] = field(default_factory=list)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> the unadapted model's nll/acc
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


def _pm(row, key, scale=1.0, digits=3):
    if row is None or f"{key}_mean" not in row:
        return "-"
    return f"{scale * row[key + '_mean']:.{digits}f} ± {scale * row[key + '_std']:.{digits}f}"


def markdown_table(c: AllocationComparison) -> str:
    """One row per rule; per (task, adapter) the held-out NLL (and accuracy where defined)."""
    from layercap.report.statistics import groups_of

    groups = groups_of(c.cells)
    by = {(r["task"], r.get("adapter", ""), r["rule"]): r for r in c.summary}
    has_acc = {g: any(by.get((*g, rule), {}).get("acc_mean") is not None for rule in c.rules) for g in groups}
    head = []
    for task, adapter in groups:
        head.append(f"{task} {adapter} NLL")
        if has_acc[(task, adapter)]:
            head.append(f"{task} {adapter} acc %")
    lines = ["| rule | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for rule in c.rules:
        row = []
        for g in groups:
            r = by.get((*g, rule))
            row.append(_pm(r, "nll"))
            if has_acc[g]:
                row.append(_pm(r, "acc", 100.0, 1))
        lines.append(f"| {rule} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_outputs(c: AllocationComparison, out: Path) -> None:
    c.save(out / "comparison.json")
    header = ["task", "adapter", "rule", "n_seeds", "nll_mean", "nll_std", "acc_mean", "acc_std", "acc_norm_mean",
              "acc_norm_std", "final_loss_mean", "final_loss_std"]
    atomic_write_csv(out / "comparison.csv", header, [[r.get(h, "") for h in header] for r in c.summary])
    # The title names the model file, not the machine-specific path it was read from (kept in the JSON).
    md = [f"# Allocation comparison on {Path(c.model).name or c.model}", "",
          f"Budget {c.budget:g} units, seeds {c.seeds}, adapters {', '.join(c.adapters) or c.options.get('adapter')} "
          f"(rank {c.options.get('rank')}, top-k {c.options.get('top_k')}), max steps {c.options.get('max_steps')}, "
          f"batch {c.options.get('batch_size')}, lr {c.options.get('lr')}, max length {c.options.get('max_length')}, "
          f"eval limit {c.options.get('limit_eval')}.", "",
          "Held-out NLL (nats/token; lower is better) and accuracy (%), mean ± sample std over seeds:", "",
          markdown_table(c), ""]
    if c.baselines:
        md += ["Unadapted model: " + "; ".join(f"{t} NLL {b['nll']:.3f}" + (f", acc {100 * b['acc']:.1f} %" if b.get("acc") is not None else "")
                                               for t, b in c.baselines.items()), ""]
    if c.separation:
        md += ["Separation check (the control `adversarial` against uniform): gap = NLL(adversarial) - NLL(uniform), "
               "against 3 x the larger seed std, and against 3 x the std of the same-seed differences:", "",
               "| task | adapter | gap | seed std | gap / std | separates | same-seed std | separates (paired) |",
               "|---|---|---|---|---|---|---|---|"]
        for x in c.separation:
            ratio = "-" if x["gap_over_std"] is None else f"{x['gap_over_std']:.1f}"
            md.append(f"| {x['task']} | {x['adapter']} | {x['gap']:+.4f} | {x['seed_std']:.4f} | {ratio} | "
                      f"{'yes' if x['separates'] else 'no'} | {x.get('paired_std', float('nan')):.4f} | "
                      f"{'yes' if x.get('separates_paired') else 'no'} |")
        md.append("")
    md += ["Paired differences metric(MDL) - metric(other) (same seed: same data order and init; NLL in nats/token, "
           "accuracy in points); 'beyond noise' when |mean| > 2 standard errors:", "",
           "| mdl | other | task | adapter | metric | diff | se | mdl better | beyond noise |", "|---|---|---|---|---|---|---|---|---|"]
    for p in c.paired:
        scale, digits = (100.0, 1) if p["metric"] == "acc" else (1.0, 4)
        se = "-" if p["diff_se"] is None else f"{scale * p['diff_se']:.{digits}f}"
        verdict = "n/a (one seed)" if p["diff_se"] is None else ("yes" if p["beyond_2se"] else "no")
        md.append(f"| {p['mdl']} | {p['other']} | {p['task']} | {p.get('adapter', '')} | {p['metric']} | "
                  f"{scale * p['diff_mean']:+.{digits}f} | {se} | {'yes' if p['better'] else 'no'} | {verdict} |")
    md += ["", "Units per block (first task, first adapter):", ""]
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

    from layercap.report.statistics import groups_of

    groups = groups_of(c.cells)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    by = {(r["task"], r.get("adapter", ""), r["rule"]): r for r in c.summary}
    width = 0.8 / max(1, len(c.rules))
    for j, rule in enumerate(c.rules):
        xs, ms, ss = [], [], []
        for i, g in enumerate(groups):
            r = by.get((*g, rule))
            base = by.get((*g, "uniform"))
            if r and "nll_mean" in r:
                xs.append(i + j * width)
                # relative to uniform, so groups with different NLL scales share one axis
                ms.append(r["nll_mean"] - (base["nll_mean"] if base and "nll_mean" in base else 0.0))
                ss.append(r["nll_std"])
        axes[0].bar(xs, ms, width, yerr=ss, capsize=3, label=rule)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{t}\n{a}" for t, a in groups])
    axes[0].axhline(0.0, color="k", lw=0.6)
    axes[0].set_ylabel("held-out NLL - uniform's (nats/token)")
    axes[0].set_title(f"held-out NLL, mean ± std over seeds {c.seeds}")
    axes[0].legend(fontsize=7)
    first = next(iter(c.allocations.values()), {})
    for rule, ns in first.items():
        axes[1].plot(range(len(ns)), ns, marker="o", ms=3, label=rule)
    axes[1].set_xlabel("block")
    axes[1].set_ylabel("experts / rank units")
    axes[1].set_title(f"allocation ({next(iter(c.allocations), '')}), budget {c.budget:g}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
