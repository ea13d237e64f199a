"""The allocation sweep (``layercap compare-allocation``): the same adapter under several
allocation rules with one total budget, on the same data and seeds, as stages of the one runner.

Stages (names; artefacts relative to OUTDIR)::

    scores:<task>:<method>          scores/<task>-<method>.json   (alpha-hill: scores/alpha-hill.json,
                                                                  weights only, shared by the tasks)
    allocation:<task>:<rule>        allocations/<task>/<rule>.json
    finetune:<task>:<rule>:seed<s>  runs/<task>/<rule>/seed<s>/   (finetune.json, adapter/)

Each stage's cache key holds everything it depends on (settings, input file hashes, upstream
artefact hashes), so a changed setting reruns exactly the stages it reaches (a new budget:
allocations and fine-tuning, not scores) and an unchanged one reruns nothing. A fine-tuning
stage interrupted mid-training continues from its last checkpoint only when it is restarted
with the same key; otherwise its folder (written by this sweep) is cleared first. Scores are
computed on calibration windows cut from the task's training examples (rendered in the
fine-tuning template); ``influence`` gets the other half of the examples as validation.

After the stages, ``comparison.json`` (``layercap.allocation_comparison/v1``), ``.csv``, ``.md``
and ``.png`` are rewritten from the finished cells.
"""

from __future__ import annotations

import copy
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from layercap.apply.finetune import FinetuneOptions, check_counts_for
from layercap.errors import LayercapError
from layercap.experiments.common import (
    file_hash,
    machine,
    model_fingerprint,
    placeholder_scores,
)
from layercap.experiments.runner import MANIFEST, Stage, StageRunner, removed_on_failure, run_stages
from layercap.programs.rules import RuleSpec, parse_rule


@dataclass
class AllocationSweepOptions:
    """Settings of one allocation comparison; validated on construction (errors name fields).

    ``train``/``eval``: one task file per task, paired by position (``eval`` may be empty).
    ``budget``: total units (experts or rank units) over all blocks. ``lower``: minimum units per
    block (None: 1 for moe, 0 for lora). ``finetune``: the training settings every cell shares
    (its ``seed`` is replaced by each of ``seeds``).
    """

    model: str
    budget: float
    rules: list[str]
    train: list[str]
    eval: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    beta: float = 0.9
    lower: int | None = None
    calib_nsamples: int = 32
    calib_seqlen: int = 256
    calib_batch_size: int = 4
    dtype: str = "float32"
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)

    def __post_init__(self) -> None:
        from layercap.scores import available_methods

        if not (self.budget > 0):
            raise LayercapError(f"budget must be > 0, got {self.budget}.")
        known = available_methods()
        specs = [parse_rule(r, "allocation", known_sources=known) for r in self.rules]
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise LayercapError(f"rules lists a rule twice ({labels}).")
        if self.eval and len(self.eval) != len(self.train):
            raise LayercapError(f"eval gives {len(self.eval)} paths for {len(self.train)} train paths; pair them by position.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise LayercapError(f"seeds must be distinct and at least one, got {self.seeds}.")
        for name in ("calib_nsamples", "calib_seqlen", "calib_batch_size"):
            if getattr(self, name) < 1:
                raise LayercapError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.lower is not None and self.lower < 0:
            raise LayercapError(f"lower must be >= 0, got {self.lower}.")
        for p in list(self.train) + list(self.eval):
            if not Path(p).exists():
                raise LayercapError(f"task file {p} does not exist.")

    @property
    def specs(self) -> list[RuleSpec]:
        return [parse_rule(r, "allocation") for r in self.rules]

    @property
    def min_units(self) -> int:
        return self.lower if self.lower is not None else (1 if self.finetune.adapter == "moe" else 0)


@dataclass
class _Sweep:
    """The context every stage of the sweep sees (model loaded once, on first use)."""

    options: AllocationSweepOptions
    out: Path
    runner: StageRunner
    tasks: list[tuple[str, str, str | None]]  # (name, train path, eval path)
    _base: tuple[Any, Any] | None = None

    def base(self):
        if self._base is None:
            from layercap.models import load_model

            from layercap.models.checks import check_seqlen

            self._base = load_model(self.options.model, dtype=self.options.dtype)
            check_seqlen(self._base[0], self.options.calib_seqlen, "--calib-seqlen")
            check_seqlen(self._base[0], self.options.finetune.max_length, "--max-length")
        return self._base


def _score_rel(task: str, method: str) -> str:
    return "scores/alpha-hill.json" if method == "alpha-hill" else f"scores/{task}-{method}.json"


def _alloc_rel(task: str, spec: RuleSpec) -> str:
    return f"allocations/{task}/{spec.dirname}.json"


def _cell_rel(task: str, spec: RuleSpec, seed: int) -> str:
    return f"runs/{task}/{spec.dirname}/seed{seed}"


def plan(sw: _Sweep) -> list[Stage]:
    o = sw.options
    model_fp = model_fingerprint(o.model)
    calib_key = {"nsamples": o.calib_nsamples, "seqlen": o.calib_seqlen}
    stages: list[Stage] = []
    seen: set[str] = set()
    for task, train, _ in sw.tasks:
        for spec in o.specs:
            if spec.source is None or _score_rel(task, spec.source) in seen:
                continue
            rel = _score_rel(task, spec.source)
            seen.add(rel)
            inputs = {"model": model_fp, "method": spec.source, "dtype": o.dtype}
            if spec.source != "alpha-hill":
                inputs.update(train=file_hash(train, "train"), calibration=calib_key)
            name = "scores:alpha-hill" if spec.source == "alpha-hill" else f"scores:{task}:{spec.source}"
            stages.append(Stage(name, lambda ctx, i=inputs: i, lambda ctx, t=task, tr=train, m=spec.source, r=rel: _score(ctx, t, tr, m, r)))
    for task, train, _ in sw.tasks:
        for spec in o.specs:
            rel = _alloc_rel(task, spec)
            upstream = [_score_rel(task, spec.source)] if spec.source else []
            settings = {"rule": spec.label, "budget": o.budget, "beta": o.beta, "lower": o.min_units,
                        "adapter": o.finetune.adapter, "targets": o.finetune.targets, "model": model_fp}
            stages.append(Stage(f"allocation:{task}:{spec.label}",
                                lambda ctx, s=settings, u=upstream: {**s, "upstream": ctx.runner.upstream(*u)},
                                lambda ctx, t=task, sp=spec, r=rel: _allocate(ctx, t, sp, r)))
    # seed outermost: an interrupted comparison has complete rule x task tables for its first seeds
    shared = {k: v for k, v in o.finetune.to_dict().items() if k not in ("seed", "progress")}
    for seed in o.seeds:
        for task, train, ev in sw.tasks:
            for spec in o.specs:
                rel = _cell_rel(task, spec, seed)
                inputs = {"options": shared, "seed": seed, "dtype": o.dtype, "model": model_fp,
                          "train": file_hash(train, "train"), "eval": file_hash(ev, "eval") if ev else None}
                stages.append(Stage(f"finetune:{task}:{spec.label}:seed{seed}",
                                    lambda ctx, i=inputs, a=_alloc_rel(task, spec): {**i, "upstream": ctx.runner.upstream(a)},
                                    lambda ctx, t=task, tr=train, e=ev, sp=spec, s=seed, r=rel: _finetune(ctx, t, tr, e, sp, s, r)))
    return stages


def _score(sw: _Sweep, task: str, train: str, method: str, rel: str) -> list[str]:
    from layercap.data.instruction import instruction_calibration
    from layercap.experiments.common import compute_scores

    o = sw.options
    model, tokenizer = sw.base()
    calib = validation = None
    if method != "alpha-hill":
        from layercap.data.bos import resolve_bos

        bos = resolve_bos(o.finetune.bos, tokenizer, model)
        calib, validation = instruction_calibration(tokenizer, Path(train), o.calib_nsamples, o.calib_seqlen, bos=bos)
        print(f"scoring {method} on {train} ({o.calib_nsamples} x {o.calib_seqlen} tokens)", file=sys.stderr)
    compute_scores(model, method, calib, sw.out / rel, batch_size=o.calib_batch_size,
                   progress=o.finetune.progress, validation=validation,
                   metadata={"calibration": "task training examples (fine-tuning template)"} if calib is not None else None)
    return [rel]


def _allocate(sw: _Sweep, task: str, spec: RuleSpec, rel: str) -> list[str]:
    from layercap.programs.rules import allocation_by_rule
    from layercap.scorefile import LayerScores

    o = sw.options
    model, _ = sw.base()
    scores = LayerScores.load(sw.out / _score_rel(task, spec.source)) if spec.source else placeholder_scores(model)
    alloc = allocation_by_rule(spec.rule, scores, o.budget, beta=o.beta, lower=o.min_units, integer=True,
                               unit="experts" if o.finetune.adapter == "moe" else "rank")
    check_counts_for(model, {k: int(v) for k, v in alloc.counts().items()}, o.finetune)
    alloc.save(sw.out / rel)
    return [rel]


def _finetune(sw: _Sweep, task: str, train: str, ev: str | None, spec: RuleSpec, seed: int, rel: str) -> list[str]:
    from layercap.experiments.finetune_job import finetune
    from layercap.programs.records import Allocation

    cell = sw.out / rel
    if cell.exists() and not sw.runner.resuming:
        # written by this sweep under other settings (or an unfinished run of them): start afresh
        shutil.rmtree(cell)
    alloc = Allocation.load(sw.out / _alloc_rel(task, spec))
    counts = {k: int(v) for k, v in alloc.counts().items()}
    options = FinetuneOptions.from_dict({**sw.options.finetune.to_dict(), "seed": seed})
    model, tokenizer = sw.base()
    print(f"{task} {spec.label} seed {seed}: units {list(counts.values())}", file=sys.stderr)
    finetune(copy.deepcopy(model), tokenizer, counts, train, cell, options, eval_path=ev, allocation=alloc.to_dict(),
             resume=sw.runner.resuming)
    return [rel]


def run_allocation_sweep(options: AllocationSweepOptions, outdir: str | Path, *, resume: bool = False, command: str = "",
                         log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)):
    """Run (or resume) every stage; write OUTDIR/comparison.{json,csv,md,png}; return the
    :class:`~layercap.report.allocation_table.AllocationComparison` and the runner's
    :class:`~layercap.experiments.runner.RunSummary` (which stages ran, which were unchanged).

    An OUTDIR that holds files is used only with ``resume`` and only if this sweep wrote it
    (it has the runner's ``stages.json``); nothing else in it is touched.
    """
    from layercap.data.tasks import load_task

    from layercap.io import check_output_parent

    out = Path(outdir)
    check_output_parent(out, "-o")
    if out.exists() and not out.is_dir():
        raise LayercapError(f"output {out} is a file; pass a directory.")
    if out.is_dir() and any(out.iterdir()):
        if not resume:
            raise LayercapError(f"{out} is not empty; pass --resume to continue that comparison, or choose a new -o.")
        if not (out / MANIFEST).is_file():
            raise LayercapError(f"{out} holds files that no layercap sweep wrote ({MANIFEST} is missing); choose a new -o.")
    names = [load_task(t, limit=1).name for t in options.train]
    if len(set(names)) != len(names):
        raise LayercapError(f"two train files have the same task name {names}; use one file per task.")
    evals = list(options.eval) or [None] * len(options.train)
    started = time.perf_counter()
    with removed_on_failure(out):
        out.mkdir(parents=True, exist_ok=True)
        runner = StageRunner(out, log=log)
        sweep = _Sweep(options, out, runner, list(zip(names, options.train, evals)))
        stages = plan(sweep)
        # every allocation is checked against the model before any training starts
        summary = run_stages(runner, [s for s in stages if not s.name.startswith("finetune:")], sweep, log, keep_only_plan=False)
        summary_ft = run_stages(runner, [s for s in stages if s.name.startswith("finetune:")], sweep, log, keep_only_plan=False)
    comparison = collect(sweep, time.perf_counter() - started, command)
    from layercap.report.allocation_table import write_outputs

    write_outputs(comparison, out)
    summary.ran += summary_ft.ran
    summary.skipped += summary_ft.skipped
    return comparison, summary


def collect(sw: _Sweep, wall_time_s: float, command: str):
    """The comparison record from the finished stages' artefacts."""
    from layercap.experiments.finetune_job import FinetuneResult
    from layercap.programs.records import Allocation
    from layercap.report.allocation_table import AllocationComparison, Cell
    from layercap.report.statistics import paired_differences, summarise

    o = sw.options
    labels = [s.label for s in o.specs]
    task_names = [t for t, _, _ in sw.tasks]
    cells = []
    allocations: dict[str, dict[str, list[int]]] = {}
    for task, _, _ in sw.tasks:
        allocations[task] = {s.label: [int(v) for v in Allocation.load(sw.out / _alloc_rel(task, s)).counts().values()]
                             for s in o.specs}
    for seed in o.seeds:
        for task, _, _ in sw.tasks:
            for spec in o.specs:
                res = FinetuneResult.load(sw.out / _cell_rel(task, spec, seed) / "finetune.json")
                cells.append(Cell(task, spec.label, seed, res.acc, res.acc_norm,
                                  res.train_loss[-1]["lm_loss"] if res.train_loss else None, res.train_time_s,
                                  allocations[task][spec.label], res.eval, res.wall_time_s))
    return AllocationComparison(
        model=str(model_fingerprint(o.model).get("source", o.model)), budget=o.budget, rules=labels,
        tasks=[{"name": n, "train": str(t), "eval": str(e) if e else None} for n, t, e in sw.tasks],
        seeds=list(o.seeds), options={k: v for k, v in o.finetune.to_dict().items() if k not in ("seed", "progress")},
        cells=cells, summary=summarise(cells, labels, task_names), paired=paired_differences(cells, labels, task_names),
        allocations=allocations, wall_time_s=wall_time_s, machine=machine(), command=command,
    )
