"""`layercap compare-allocation`: fine-tune the same adapter under several allocation rules.

Every rule gets the same total budget (e.g. 120 experts over SmolLM2's 30 blocks, at least 1
each), the same training data, steps and seeds. Rules are written ``RULE`` or ``RULE:METHOD``
where METHOD is the score source (``mdl:kfac``, ``mdl:diag``); defaults: mdl/proportional ->
kfac, layerif -> influence, alphalora -> alpha-hill, uniform/mola-* need no scores.

Scores are computed once per (task, method) on calibration windows cut from the task's
training examples (rendered in the fine-tuning template); ``influence`` gets a disjoint second
half of those examples as its validation set. Every (task, rule, seed) cell is one
``finetune`` run in ``OUTDIR/runs/<task>/<rule>/seed<s>``; ``--resume`` skips finished cells and
continues interrupted ones from their last checkpoint.

Outputs: ``scores/``, ``allocations/``, ``runs/``, and ``comparison.json`` (schema
``layercap.allocation_comparison/v1``), ``comparison.csv``, ``comparison.md`` (mean +- sample std
over seeds per rule and task, paired MDL-vs-baseline differences) and ``comparison.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from layercap.errors import LayercapError
from layercap.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text
from layercap.models.load import model_source
from layercap.programs.rules import ALLOCATION_RULES, RULE_SOURCES

NAME = "compare-allocation"
SCHEMA = "layercap.allocation_comparison/v1"
NO_SCORES = ("uniform", "mola-2468", "mola-8642", "mola-5555")
# rule -> the score source it reads by default: baselines their own (programs.rules), mdl/proportional K-FAC zeta^2
DEFAULT_SOURCE = {rule: RULE_SOURCES.get(rule, "kfac") for rule in ALLOCATION_RULES if rule not in NO_SCORES}


@dataclass(frozen=True)
class RuleSpec:
    """``rule`` from ALLOCATION_RULES; ``method`` the score source (None: the rule needs none)."""

    rule: str
    method: str | None

    @property
    def label(self) -> str:
        return f"{self.rule}:{self.method}" if self.method and self.rule in ("mdl", "proportional") else self.rule

    @property
    def dirname(self) -> str:
        return self.label.replace(":", "-")


def parse_rule(text: str) -> RuleSpec:
    from layercap.programs.rules import ALLOCATION_RULES

    rule, _, method = text.partition(":")
    if rule not in ALLOCATION_RULES:
        raise LayercapError(f"--rules: {rule!r} is not an allocation rule; choose from {', '.join(ALLOCATION_RULES)} "
                            "(mdl and proportional take a score method, e.g. mdl:kfac).")
    if rule in NO_SCORES:
        if method:
            raise LayercapError(f"--rules: {rule!r} uses no scores; drop ':{method}'.")
        return RuleSpec(rule, None)
    return RuleSpec(rule, method or DEFAULT_SOURCE[rule])


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
class Comparison:
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
    def from_dict(cls, d: dict) -> "Comparison":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not an allocation comparison: schema {d.get('schema')!r}, expected {SCHEMA!r}.")
        d = dict(d)
        d["cells"] = [Cell(**c) for c in d["cells"]]
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def save(self, path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Comparison":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---- statistics ---------------------------------------------------------------------------
def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(xs)
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, s


def summarise(cells: list[Cell], rules: list[str], tasks: list[str]) -> list[dict]:
    rows = []
    for task in tasks + ["mean"]:
        for rule in rules:
            if task == "mean":
                # per seed, the mean over tasks; then mean/std over seeds
                seeds = sorted({c.seed for c in cells if c.rule == rule})
                per_seed = []
                for s in seeds:
                    vals = [c.acc for c in cells if c.rule == rule and c.seed == s and c.acc is not None]
                    if len(vals) == len(tasks):
                        per_seed.append(sum(vals) / len(vals))
                accs, norms, losses = per_seed, [], []
            else:
                sel = [c for c in cells if c.rule == rule and c.task == task and c.acc is not None]
                accs = [c.acc for c in sel]
                norms = [c.acc_norm for c in sel]
                losses = [c.final_lm_loss for c in sel if c.final_lm_loss is not None]
            if not accs:
                continue
            m, s = mean_std(accs)
            row = {"task": task, "rule": rule, "n_seeds": len(accs), "acc_mean": m, "acc_std": s}
            if norms:
                row["acc_norm_mean"], row["acc_norm_std"] = mean_std(norms)
            if losses:
                row["final_loss_mean"], row["final_loss_std"] = mean_std(losses)
            rows.append(row)
    return rows


def paired_differences(cells: list[Cell], rules: list[str], tasks: list[str]) -> list[dict]:
    """For each mdl rule vs each other rule and task: mean and std error of acc(mdl) - acc(other)
    over seeds (same seed = same data order and adapter init), and whether |mean| > 2 se."""
    out = []
    acc = {(c.task, c.rule, c.seed): c.acc for c in cells if c.acc is not None}
    for mdl in [r for r in rules if r.startswith("mdl")]:
        for other in [r for r in rules if r != mdl]:
            for task in tasks:
                diffs = [acc[(task, mdl, s)] - acc[(task, other, s)] for (t, r, s) in acc
                         if t == task and r == mdl and (task, other, s) in acc]
                if not diffs:
                    continue
                m, sd = mean_std(diffs)
                se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else None  # undefined for one seed
                out.append({"mdl": mdl, "other": other, "task": task, "n": len(diffs), "diff_mean": m,
                            "diff_se": se, "beyond_2se": bool(len(diffs) > 1 and abs(m) > 2 * se)})
    return out


# ---- scores and allocations ---------------------------------------------------------------
def task_calibration(tokenizer, train_path: Path, nsamples: int, seqlen: int, seed: int = 0):
    """Two disjoint CalibrationSets (train, validation) from the task's rendered training examples."""
    from layercap.apply.finetune import render_prompt
    from layercap.data.calibration import CalibrationSet, tokenize_text
    from layercap.data.tasks import load_task
    from layercap.io import sha256_bytes

    pairs = load_task(train_path).training_examples()
    random.Random(seed).shuffle(pairs)
    halves = (pairs[0::2], pairs[1::2])
    sets = []
    for half in halves:
        need = nsamples * seqlen
        text, tokens = [], 0
        for p, a in half:
            piece = render_prompt(p) + a
            text.append(piece)
            tokens += len(piece) // 3  # rough; the exact count is checked below
            if tokens > 2 * need:
                break
        ids = tokenize_text(tokenizer, "\n\n".join(text))
        if ids.numel() < need:
            raise LayercapError(f"{train_path}: not enough training text for {nsamples} x {seqlen} calibration "
                                "tokens; lower --calib-nsamples / --calib-seqlen.")
        windows = ids[:need].reshape(nsamples, seqlen).clone()
        sets.append(CalibrationSet(windows, sha256_bytes(windows.numpy().tobytes()), str(train_path), seed))
    return sets[0], sets[1]


def uniform_scores(model):
    """Placeholder scores (all 1) naming the model's blocks, for rules that use none."""
    from layercap.models import find_blocks
    from layercap.scorefile import LayerScore, LayerScores

    return LayerScores([LayerScore(b.name, 1.0, b.num_params) for b in find_blocks(model)], method="none",
                       metadata={"note": "placeholder: this rule uses no scores"})


def get_scores(model, tokenizer, method: str, train_path: Path, path: Path, args):
    from layercap.scorefile import LayerScores

    if path.is_file():
        return LayerScores.load(path)
    from layercap.scores.api import score_model
    from layercap.scores.registry import ScoreOptions

    options = ScoreOptions(batch_size=args.calib_batch_size, seed=0, progress=not args.no_progress)
    if method == "alpha-hill":  # weights only
        print(f"scoring {method} (weights only)", file=sys.stderr)
        scores = score_model(model, method, None, options=options)
    else:
        train, validation = task_calibration(tokenizer, train_path, args.calib_nsamples, args.calib_seqlen)
        if method == "influence":
            options.extra["validation"] = validation
        print(f"scoring {method} on {train_path} ({args.calib_nsamples} x {args.calib_seqlen} tokens)", file=sys.stderr)
        scores = score_model(model, method, train, options=options,
                             metadata={"calibration": "task training examples (fine-tuning template)"})
    scores.save(path)
    return scores


# ---- the command --------------------------------------------------------------------------
def register(subparsers) -> argparse.ArgumentParser:
    from layercap.commands.finetune import add_training_args

    p = subparsers.add_parser(
        NAME,
        help="compare allocation rules by fine-tuning on the same budget",
        description=(
            "Fine-tune the same adapter (LoRA-MoE experts or LoRA rank units per block) under several "
            "allocation rules with one total budget, on the same data and seeds; report mean +- std "
            "accuracy per rule and task. Resumable per (task, rule, seed) cell."
        ),
    )
    p.add_argument("model", help="model: smollm2, a save_pretrained directory, or a .gguf file")
    p.add_argument("--budget", type=float, required=True, help="total units over all blocks (e.g. 120 experts)")
    p.add_argument("--rules", nargs="+", required=True,
                   help="rules, RULE or RULE:METHOD (e.g. uniform mola-2468 mola-8642 alphalora layerif mdl:diag mdl:kfac)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; default 0")
    p.add_argument("--beta", type=float, default=0.9, help="score exponent of mdl/layerif/alphalora; default 0.9")
    p.add_argument("--lower", type=int, default=None, help="minimum units per block (default 1 for moe, 0 for lora)")
    p.add_argument("--calib-nsamples", type=int, default=32, help="calibration windows for scoring; default 32")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration window; default 256")
    p.add_argument("--calib-batch-size", type=int, default=4, help="windows per scoring micro-batch; default 4")
    add_training_args(p)
    # --train / --eval take one path per task, paired by position
    for action in p._actions:
        if action.dest in ("train", "eval"):
            action.nargs = "+"
    p.add_argument("--resume", action="store_true", help="skip finished cells, continue interrupted ones")
    p.add_argument("-o", "--output", required=True, help="output directory")
    return p


def _machine() -> dict:
    import os

    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def main(args) -> int:
    from layercap.apply.finetune import FinetuneResult, check_counts_for, finetune
    from layercap.commands.finetune import options_from_args
    from layercap.models import load_model
    from layercap.programs.rules import allocation_by_rule

    started = time.perf_counter()
    specs = [parse_rule(r) for r in args.rules]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise LayercapError(f"--rules lists a rule twice ({labels}).")
    evals = args.eval or []
    if evals and len(evals) != len(args.train):
        raise LayercapError(f"--eval gives {len(evals)} paths for {len(args.train)} --train paths; pair them by position.")
    if len(set(args.seeds)) != len(args.seeds):
        raise LayercapError(f"--seeds repeats a seed ({args.seeds}).")
    for p in list(args.train) + list(evals):
        if not Path(p).exists():
            raise LayercapError(f"task file {p} does not exist.")
    from layercap.data.tasks import load_task

    task_names = [load_task(t, limit=1).name for t in args.train]
    if len(set(task_names)) != len(task_names):
        raise LayercapError(f"two --train files have the same task name {task_names}; use one file per task.")
    options0 = options_from_args(args, args.seeds[0])
    options0.validate()
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise LayercapError(f"{out} is not empty; pass --resume to continue that comparison, or choose a new -o.")
    lower = args.lower if args.lower is not None else (1 if args.adapter == "moe" else 0)

    base, tokenizer = load_model(args.model, dtype=args.dtype)
    model_label = model_source(base, str(args.model))
    # allocations for every (task, rule), validated before any training
    allocations: dict[str, dict[str, Any]] = {}
    for task, train in zip(task_names, args.train):
        allocations[task] = {}
        for spec in specs:
            if spec.method is None:
                scores = uniform_scores(base)
            else:
                key = "alpha-hill" if spec.method == "alpha-hill" else f"{task}/{spec.method}"
                scores = get_scores(base, tokenizer, spec.method, Path(train),
                                    out / "scores" / f"{key.replace('/', '-')}.json", args)
            alloc = allocation_by_rule(spec.rule, scores, args.budget, beta=args.beta, lower=lower, integer=True,
                                       unit="experts" if args.adapter == "moe" else "rank")
            counts = {k: int(v) for k, v in alloc.counts().items()}
            check_counts_for(base, counts, options0)
            allocations[task][spec.label] = {"counts": counts, "doc": alloc.to_dict(), "record": alloc}
    for task, by_rule in allocations.items():
        for spec in specs:
            by_rule[spec.label].pop("record").save(out / "allocations" / task / f"{spec.dirname}.json")

    cells: list[Cell] = []
    # seed outermost: an interrupted comparison has complete rule x task tables for its first seeds
    jobs = [(t, tr, ev, s, seed) for seed in args.seeds
            for t, tr, ev in zip(task_names, args.train, evals or [None] * len(args.train)) for s in specs]
    for i, (task, train, ev, spec, seed) in enumerate(jobs, 1):
        cell_dir = out / "runs" / task / spec.dirname / f"seed{seed}"
        counts = allocations[task][spec.label]["counts"]
        if (cell_dir / "finetune.json").is_file():
            res = FinetuneResult.load(cell_dir / "finetune.json")
        else:
            print(f"[{i}/{len(jobs)}] {task} {spec.label} seed {seed}: experts {list(counts.values())}", file=sys.stderr)
            options = options_from_args(args, seed)
            model = copy.deepcopy(base)
            res = finetune(model, tokenizer, counts, train, cell_dir, options, eval_path=ev,
                           allocation=allocations[task][spec.label]["doc"], resume=True)
            del model
        cells.append(Cell(task, spec.label, seed, res.acc, res.acc_norm,
                          res.train_loss[-1]["lm_loss"] if res.train_loss else None, res.train_time_s,
                          list(counts.values()), res.eval, res.wall_time_s))

    summary = summarise(cells, labels, task_names)
    paired = paired_differences(cells, labels, task_names)
    comparison = Comparison(
        model=model_label, budget=args.budget, rules=labels,
        tasks=[{"name": n, "train": str(t), "eval": str(e) if e else None}
               for n, t, e in zip(task_names, args.train, evals or [None] * len(args.train))],
        seeds=list(args.seeds), options={k: v for k, v in options0.to_dict().items() if k not in ("seed", "progress")},
        cells=cells, summary=summary, paired=paired,
        allocations={t: {r: list(v["counts"].values()) for r, v in d.items()} for t, d in allocations.items()},
        wall_time_s=time.perf_counter() - started, machine=_machine(),
        command="layercap " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "",
    )
    write_outputs(comparison, out)
    print(markdown_table(comparison))
    print(f"wrote {out / 'comparison.json'}, .csv, .md, .png")
    return 0


# ---- outputs ------------------------------------------------------------------------------
def markdown_table(c: Comparison) -> str:
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


def write_outputs(c: Comparison, out: Path) -> None:
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


def plot(c: Comparison) -> bytes:
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
