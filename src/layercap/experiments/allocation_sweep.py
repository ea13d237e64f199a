"""The allocation sweep (``layercap compare-allocation``): each adapter under several
allocation rules with one total budget, on the same data and seeds, as stages of the one runner.

A task is a task file (instruction fine-tuning, scored on its eval file: answer-token NLL and
accuracy) or a text corpus (``.txt``/``.raw``: language-modelling adaptation, scored by the NLL
of its held-out last part, :mod:`layercap.data.domain`).

Stages (names; artefacts relative to OUTDIR)::

    scores:<task>:<method>                    scores/<task>-<method>.json   (alpha-hill: scores/alpha-hill.json,
                                                                            weights only, shared by the tasks)
    baseline:<task>                           baselines/<task>.json  (the unadapted model's nll / acc)
    utility:<task>                            utility/<task>.json   (mdl:measured only: the measured utility
                                                                    curves, layercap.utility/v1; one LoRA of
                                                                    rank rank x n per (block, level), read by
                                                                    both adapters: a moe unit has the same
                                                                    adapter parameters, no router)
    allocation:<task>:<adapter>:<rule>        allocations/<task>/<adapter>/<rule>.json
    finetune:<task>:<adapter>:<rule>:seed<s>  runs/<task>/<adapter>/<rule>/seed<s>/   (finetune.json, adapter/)

Each stage's cache key holds everything it depends on (settings, input file hashes, upstream
artefact hashes), so a changed setting reruns exactly the stages it reaches (a new budget:
allocations and fine-tuning, not scores) and an unchanged one reruns nothing. A fine-tuning
stage interrupted mid-training continues from its last checkpoint only when it is restarted
with the same key; otherwise its folder (written by this sweep) is cleared first. Scores are
computed on calibration windows cut from the task's training examples (rendered in the
fine-tuning template) or from the text's training part; ``influence`` gets other training
windows as validation. No evaluation token is ever used to score or decide.

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

    ``train``/``eval``: one task file or text corpus per task, paired by position (``eval`` may
    be empty; ``-`` for a text corpus, which is scored on its own held-out part).
    ``budget``: total units (experts or rank units) over all blocks, the same for every rule and
    adapter. ``adapters``: the adapters to compare (empty: ``finetune.adapter``). ``lower``:
    minimum units per block (None: 1 for moe, 0 for lora). ``finetune``: the training settings
    every cell shares (its ``seed`` and ``adapter`` are replaced per cell).
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
    adapters: list[str] = field(default_factory=list)
    # mdl:measured: each block adapted alone at these unit levels for utility_steps Adam steps
    # (lr: utility_lr, default the fine-tuning lr) on utility_nsamples x utility_seqlen training
    # tokens, the reduction measured on as many other training windows (never the evaluation data)
    utility_levels: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    utility_steps: int = 5
    utility_lr: float | None = None
    utility_nsamples: int = 4
    utility_seqlen: int = 64

    def __post_init__(self) -> None:
        from layercap.apply.finetune.adapters import ADAPTERS
        from layercap.data.domain import is_text_corpus
        from layercap.scores import available_methods

        if not (self.budget > 0):
            raise LayercapError(f"budget must be > 0, got {self.budget}.")
        from layercap.programs.rules import UTILITY_SOURCES
        from layercap.programs.utility import check_unit_levels

        known = set(available_methods()) | set(UTILITY_SOURCES)
        specs = [parse_rule(r, "allocation", known_sources=known) for r in self.rules]
        self.utility_levels = check_unit_levels(self.utility_levels, "utility_levels")
        if self.utility_steps < 1 or (self.utility_lr is not None and not self.utility_lr > 0):
            raise LayercapError(f"utility_steps must be >= 1 and utility_lr > 0, got {self.utility_steps}, {self.utility_lr}.")
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise LayercapError(f"rules lists a rule twice ({labels}).")
        if self.eval and len(self.eval) != len(self.train):
            raise LayercapError(f"eval gives {len(self.eval)} paths for {len(self.train)} train paths; pair them by position.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise LayercapError(f"seeds must be distinct and at least one, got {self.seeds}.")
        for name in ("calib_nsamples", "calib_seqlen", "calib_batch_size", "utility_nsamples", "utility_seqlen"):
            if getattr(self, name) < 1:
                raise LayercapError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.lower is not None and self.lower < 0:
            raise LayercapError(f"lower must be >= 0, got {self.lower}.")
        self.adapters = list(self.adapters) or [self.finetune.adapter]
        for a in self.adapters:
            if a not in ADAPTERS:
                raise LayercapError(f"adapters: {a!r} is unknown; use {', '.join(ADAPTERS)}.")
        if len(set(self.adapters)) != len(self.adapters):
            raise LayercapError(f"adapters lists an adapter twice ({self.adapters}).")
        self.eval = [None if e in (None, "-", "") else e for e in self.eval]
        for i, p in enumerate(self.train):
            if is_text_corpus(p) and self.eval and self.eval[i] is not None:
                raise LayercapError(f"eval: {self.eval[i]} is paired with the text corpus {p}, which is scored on its own "
                                    "held-out part; pass - in its place.")
        for p in list(self.train) + [e for e in self.eval if e is not None]:
            if not Path(p).exists():
                raise LayercapError(f"task file {p} does not exist.")

    @property
    def specs(self) -> list[RuleSpec]:
        return [parse_rule(r, "allocation") for r in self.rules]

    def min_units(self, adapter: str) -> int:
        return self.lower if self.lower is not None else (1 if adapter == "moe" else 0)

    def finetune_for(self, adapter: str, seed: int | None = None) -> FinetuneOptions:
        d = {**self.finetune.to_dict(), "adapter": adapter}
        if seed is not None:
            d["seed"] = seed
        return FinetuneOptions.from_dict(d)


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


def task_name(path: str) -> str:
    """A task's name: the task file's (``ARC-Easy``), or a text corpus's folder or stem (``tinyshakespeare``)."""
    from layercap.data.domain import is_text_corpus
    from layercap.data.tasks import load_task

    if is_text_corpus(path):
        p = Path(path)
        return p.parent.name if p.stem.lower() in ("input", "train", "text", "data") else p.stem
    return load_task(path, limit=1).name


def _score_rel(task: str, method: str) -> str:
    return "scores/alpha-hill.json" if method == "alpha-hill" else f"scores/{task}-{method}.json"


def _alloc_rel(task: str, adapter: str, spec: RuleSpec) -> str:
    return f"allocations/{task}/{adapter}/{spec.dirname}.json"


def _cell_rel(task: str, adapter: str, spec: RuleSpec, seed: int) -> str:
    return f"runs/{task}/{adapter}/{spec.dirname}/seed{seed}"


def _utility_rel(task: str) -> str:
    return f"utility/{task}.json"


def _measured(spec: RuleSpec) -> bool:
    from layercap.programs.rules import UTILITY_SOURCES

    return spec.source in UTILITY_SOURCES


def _baseline_rel(task: str) -> str:
    return f"baselines/{task}.json"


def plan(sw: _Sweep) -> list[Stage]:
    o = sw.options
    model_fp = model_fingerprint(o.model)
    calib_key = {"nsamples": o.calib_nsamples, "seqlen": o.calib_seqlen}
    stages: list[Stage] = []
    seen: set[str] = set()
    for task, train, _ in sw.tasks:
        for spec in o.specs:
            if spec.source is None or _measured(spec) or _score_rel(task, spec.source) in seen:
                continue
            rel = _score_rel(task, spec.source)
            seen.add(rel)
            inputs = {"model": model_fp, "method": spec.source, "dtype": o.dtype}
            if spec.source != "alpha-hill":
                inputs.update(train=file_hash(train, "train"), calibration=calib_key)
            name = "scores:alpha-hill" if spec.source == "alpha-hill" else f"scores:{task}:{spec.source}"
            stages.append(Stage(name, lambda ctx, i=inputs: i, lambda ctx, t=task, tr=train, m=spec.source, r=rel: _score(ctx, t, tr, m, r)))
    eval_options = {k: o.finetune.to_dict()[k] for k in ("limit_eval", "max_length", "heldout_fraction", "eval_format", "bos")}
    for task, train, ev in sw.tasks:
        inputs = {"model": model_fp, "dtype": o.dtype, "train": file_hash(train, "train"),
                  "eval": file_hash(ev, "eval") if ev else None, "options": eval_options}
        stages.append(Stage(f"baseline:{task}", lambda ctx, i=inputs: i,
                            lambda ctx, t=task, tr=train, e=ev: _baseline(ctx, t, tr, e)))
    if any(_measured(spec) for spec in o.specs):
        ft = o.finetune
        for task, train, _ in sw.tasks:
            inputs = {"model": model_fp, "dtype": o.dtype, "train": file_hash(train, "train"), "levels": o.utility_levels,
                      "steps": o.utility_steps, "lr": o.utility_lr or ft.lr, "nsamples": o.utility_nsamples,
                      "seqlen": o.utility_seqlen, "rank": ft.rank, "targets": ft.targets, "bos": ft.bos,
                      "heldout_fraction": ft.heldout_fraction}
            stages.append(Stage(f"utility:{task}", lambda ctx, i=inputs: i, lambda ctx, t=task, tr=train: _utility(ctx, t, tr)))
    for task, train, _ in sw.tasks:
        for adapter in o.adapters:
            for spec in o.specs:
                rel = _alloc_rel(task, adapter, spec)
                upstream = ([_utility_rel(task)] if _measured(spec) else
                            [_score_rel(task, spec.source)] if spec.source else [])
                ft = o.finetune_for(adapter)
                settings = {"rule": spec.label, "budget": o.budget, "beta": o.beta, "lower": o.min_units(adapter),
                            "adapter": adapter, "targets": ft.targets, "rank": ft.rank, "model": model_fp}
                stages.append(Stage(f"allocation:{task}:{adapter}:{spec.label}",
                                    lambda ctx, s=settings, u=upstream: {**s, "upstream": ctx.runner.upstream(*u)},
                                    lambda ctx, t=task, a=adapter, sp=spec, r=rel: _allocate(ctx, t, a, sp, r)))
    # seed outermost: an interrupted comparison has complete rule x task tables for its first seeds
    for seed in o.seeds:
        for task, train, ev in sw.tasks:
            for adapter in o.adapters:
                shared = {k: v for k, v in o.finetune_for(adapter).to_dict().items() if k not in ("seed", "progress")}
                for spec in o.specs:
                    rel = _cell_rel(task, adapter, spec, seed)
                    inputs = {"options": shared, "seed": seed, "dtype": o.dtype, "model": model_fp,
                              "train": file_hash(train, "train"), "eval": file_hash(ev, "eval") if ev else None}
                    stages.append(Stage(f"finetune:{task}:{adapter}:{spec.label}:seed{seed}",
                                        lambda ctx, i=inputs, al=_alloc_rel(task, adapter, spec): {**i, "upstream": ctx.runner.upstream(al)},
                                        lambda ctx, t=task, tr=train, e=ev, a=adapter, sp=spec, s=seed, r=rel:
                                        _finetune(ctx, t, tr, e, a, sp, s, r)))
    return stages


def _calibration(sw: _Sweep, train: str, nsamples: int | None = None, seqlen: int | None = None):
    """(calibration, validation) windows (default calib_nsamples x calib_seqlen) for scoring and
    utility curves: from the task's rendered training examples, or from a text's training part
    (never its held-out part)."""
    from layercap.data.bos import resolve_bos
    from layercap.data.domain import domain_split, is_text_corpus
    from layercap.data.instruction import instruction_calibration

    o = sw.options
    nsamples, seqlen = nsamples or o.calib_nsamples, seqlen or o.calib_seqlen
    model, tokenizer = sw.base()
    bos = resolve_bos(o.finetune.bos, tokenizer, model)
    if is_text_corpus(train):
        split = domain_split(tokenizer, train, seqlen, o.finetune.heldout_fraction, bos=bos)
        return split.calibration(nsamples), split.calibration(nsamples, offset=0.5)
    return instruction_calibration(tokenizer, Path(train), nsamples, seqlen, bos=bos)


def _score(sw: _Sweep, task: str, train: str, method: str, rel: str) -> list[str]:
    from layercap.experiments.common import compute_scores

    o = sw.options
    model, _ = sw.base()
    calib = validation = None
    if method != "alpha-hill":
        calib, validation = _calibration(sw, train)
        print(f"scoring {method} on {train} ({o.calib_nsamples} x {o.calib_seqlen} tokens)", file=sys.stderr)
    compute_scores(model, method, calib, sw.out / rel, batch_size=o.calib_batch_size,
                   progress=o.finetune.progress, validation=validation,
                   metadata={"calibration": "task training examples or the text's training part"} if calib is not None else None)
    return [rel]


def _utility(sw: _Sweep, task: str, train: str) -> list[str]:
    """The measured utility curves of every block for rule mdl:measured (training windows only)."""
    from layercap.apply.utility import measure_utility

    o = sw.options
    model, _ = sw.base()
    calib, validation = _calibration(sw, train, o.utility_nsamples, o.utility_seqlen)
    rel = _utility_rel(task)
    print(f"utility curves on {train}: levels {o.utility_levels}, {o.utility_steps} steps", file=sys.stderr)
    table = measure_utility(model, calib, validation, o.utility_levels, steps=o.utility_steps,
                            lr=o.utility_lr or o.finetune.lr, unit_rank=o.finetune.rank, adapter="lora",
                            targets=o.finetune.targets, batch_size=o.calib_batch_size,
                            checkpoint=sw.out / (rel + ".partial"), progress=o.finetune.progress, model_id=o.model)
    table.save(sw.out / rel)
    (sw.out / (rel + ".partial")).unlink(missing_ok=True)
    return [rel]


def _baseline(sw: _Sweep, task: str, train: str, ev: str | None) -> list[str]:
    """The unadapted model on the cells' evaluation data: the scale every reduction is read against."""
    from layercap.experiments.finetune_job import evaluate_adapter, evaluation_data
    from layercap.io import atomic_write_json

    o = sw.options
    model, tokenizer = sw.base()
    split, tasks = evaluation_data(model, tokenizer, train, ev, o.finetune)
    results, head, nll = evaluate_adapter(model, tokenizer, tasks, o.finetune, split)
    atomic_write_json(sw.out / _baseline_rel(task), {"task": task, "nll": nll, "acc": head["acc"] if head else None,
                                                     "eval": results})
    return [_baseline_rel(task)]


def _allocate(sw: _Sweep, task: str, adapter: str, spec: RuleSpec, rel: str) -> list[str]:
    from layercap.programs.rules import allocation_by_rule
    from layercap.scorefile import LayerScores

    o = sw.options
    model, _ = sw.base()
    utility = None
    if _measured(spec):
        from layercap.programs.utility import UtilityTable

        utility = UtilityTable.load(sw.out / _utility_rel(task))
    scores = (LayerScores.load(sw.out / _score_rel(task, spec.source)) if spec.source and utility is None
              else placeholder_scores(model))
    # mdl with a utility table is the measured program (its allocation is labelled mdl:measured)
    alloc = allocation_by_rule(spec.rule, scores, o.budget, beta=o.beta, lower=o.min_units(adapter), integer=True,
                               unit="experts" if adapter == "moe" else "rank", utility=utility)
    check_counts_for(model, {k: int(v) for k, v in alloc.counts().items()}, o.finetune_for(adapter))
    alloc.save(sw.out / rel)
    return [rel]


def _finetune(sw: _Sweep, task: str, train: str, ev: str | None, adapter: str, spec: RuleSpec, seed: int,
              rel: str) -> list[str]:
    from layercap.experiments.finetune_job import finetune
    from layercap.programs.records import Allocation

    cell = sw.out / rel
    if cell.exists() and not sw.runner.resuming:
        # written by this sweep under other settings (or an unfinished run of them): start afresh
        shutil.rmtree(cell)
    alloc = Allocation.load(sw.out / _alloc_rel(task, adapter, spec))
    counts = {k: int(v) for k, v in alloc.counts().items()}
    model, tokenizer = sw.base()
    print(f"{task} {adapter} {spec.label} seed {seed}: units {list(counts.values())}", file=sys.stderr)
    finetune(copy.deepcopy(model), tokenizer, counts, train, cell, sw.options.finetune_for(adapter, seed), eval_path=ev,
             allocation=alloc.to_dict(), resume=sw.runner.resuming)
    return [rel]


def run_allocation_sweep(options: AllocationSweepOptions, outdir: str | Path, *, resume: bool = False, command: str = "",
                         log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)):
    """Run (or resume) every stage; write OUTDIR/comparison.{json,csv,md,png}; return the
    :class:`~layercap.report.allocation_table.AllocationComparison` and the runner's
    :class:`~layercap.experiments.runner.RunSummary` (which stages ran, which were unchanged).

    An OUTDIR that holds files is used only with ``resume`` and only if this sweep wrote it
    (it has the runner's ``stages.json``); nothing else in it is touched.
    """
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
    names = [task_name(t) for t in options.train]
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
    from layercap.io import read_json
    from layercap.programs.records import Allocation
    from layercap.report.allocation_table import AllocationComparison, Cell
    from layercap.report.statistics import paired_differences, separation, summarise

    o = sw.options
    labels = [s.label for s in o.specs]
    cells = []
    allocations: dict[str, dict[str, list[int]]] = {}
    for task, _, _ in sw.tasks:
        for adapter in o.adapters:
            allocations[f"{task}/{adapter}"] = {
                s.label: [int(v) for v in Allocation.load(sw.out / _alloc_rel(task, adapter, s)).counts().values()]
                for s in o.specs}
    for seed in o.seeds:
        for task, _, _ in sw.tasks:
            for adapter in o.adapters:
                for spec in o.specs:
                    res = FinetuneResult.load(sw.out / _cell_rel(task, adapter, spec, seed) / "finetune.json")
                    cells.append(Cell(task, spec.label, seed, res.acc, res.acc_norm,
                                      res.train_loss[-1]["lm_loss"] if res.train_loss else None, res.train_time_s,
                                      allocations[f"{task}/{adapter}"][spec.label], res.eval, res.wall_time_s,
                                      adapter=adapter, nll=res.nll))
    baselines = {}
    for task, _, _ in sw.tasks:
        b = read_json(sw.out / _baseline_rel(task), "baseline record", "rerun the comparison with --resume")
        baselines[task] = {"nll": b.get("nll"), "acc": b.get("acc")}
    bad = [s.label for s in o.specs if s.rule == "adversarial"]
    return AllocationComparison(
        model=str(model_fingerprint(o.model).get("source", o.model)), budget=o.budget, rules=labels,
        tasks=[{"name": n, "train": str(t), "eval": str(e) if e else None} for n, t, e in sw.tasks],
        seeds=list(o.seeds), options={k: v for k, v in o.finetune.to_dict().items() if k not in ("seed", "progress", "adapter")},
        cells=cells, summary=summarise(cells, labels), paired=paired_differences(cells, labels),
        allocations=allocations, wall_time_s=wall_time_s, machine=machine(), command=command,
        adapters=list(o.adapters), separation=separation(cells, bad[0]) if bad and "uniform" in labels else [],
        baselines=baselines,
    )
