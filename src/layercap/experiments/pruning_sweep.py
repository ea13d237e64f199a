"""The pruning sweep (``layercap compare-pruning``): ratio rules x pruners x sparsities on one
model (the paper's Tables 1-2), as stages of the one runner.

Every cell (rule, pruner, sparsity) prunes a fresh copy of the dense model on the *same*
calibration windows, then evaluates perplexity and zero-shot accuracy; the dense model is
evaluated once as the reference (it also decides which tasks are "above chance", see
``layercap.evaluate``). Stages (names; artefacts relative to OUTDIR)::

    dense                  cells/dense.json          the dense model's evaluation
    scores:<source>        scores/<source>.json      layer scores of the dense model
    cell:<id>              cells/<id>.json           e.g. cell:mdl-kfac_wanda_s0.50

A stage's cache key holds everything it depends on (calibration windows, evaluation settings and
files, the rule, pruner and sparsity, its upstream artefacts), so a rerun computes exactly what
is new or changed: another sparsity adds its cells; other calibration settings recompute scores
and cells but not the dense evaluation. ``run.json`` records the shared settings of the latest
run; :func:`collect` (``--report-only``) reads the cells computed with those settings.

Rules (``RULE[:SOURCE]``; the default score source in brackets): ``uniform`` (none), ``owl``
[owl], ``alphapruning`` [alpha-hill], ``layerif`` [influence], ``mdl`` [kfac] -- ``mdl:diag``,
``mdl:kfac``, ``mdl:ekfac``, ``mdl:gradnorm`` ... choose the estimator of zeta^2. Every rule's
ratios are weighted by each block's *prunable* weights and meet the target sparsity exactly
within the same box [min_ratio, max_ratio].
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from layercap.errors import LayercapError
from layercap.experiments.common import check_device, file_hash, known_score_methods, model_fingerprint, prunable_scores
from layercap.experiments.runner import Stage, StageRunner, check_run_dir, removed_on_failure, run_stages
from layercap.io import atomic_write_json, sha256_json
from layercap.programs.rules import RuleSpec, parse_rule

RUN_FILE = "run.json"


@dataclass
class PruningSweepOptions:
    """Settings of one pruning comparison; validated on construction (errors name fields).

    ``data``: calibration text shared by scores and pruners; ``ppl``: texts for perplexity;
    ``tasks``: task files for zero-shot accuracy (``limit``: a seeded subset of N items);
    ``eval_seqlen`` / ``max_tokens``: perplexity windows and the tokens read per text.
    """

    model: str
    rules: list[str]
    methods: list[str]
    sparsities: list[float]
    data: str
    nsamples: int = 128
    seqlen: int = 512
    ppl: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    eval_seqlen: int = 512
    max_tokens: int | None = None
    batch_size: int = 8
    min_ratio: float = 0.0
    max_ratio: float = 0.9
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    bos: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        from layercap.apply.prune import PRUNERS
        from layercap.data.bos import POLICIES

        if self.bos not in POLICIES:
            raise LayercapError(f"bos must be one of {', '.join(POLICIES)}, got {self.bos!r}.")

        known = known_score_methods()
        specs = [parse_rule(r, "pruning", known_sources=known) for r in self.rules]
        if len({s.label for s in specs}) != len(specs):
            raise LayercapError(f"rules lists a rule twice: {self.rules}.")
        for m in self.methods:
            if m not in PRUNERS:
                raise LayercapError(f"methods: pruner {m!r} is unknown; use {', '.join(PRUNERS)}.")
        for s in self.sparsities:
            if not (self.min_ratio <= s <= self.max_ratio and 0.0 < s < 1.0):
                raise LayercapError(f"sparsities: {s} must lie in (0, 1) and in [min_ratio {self.min_ratio}, max_ratio {self.max_ratio}].")
        for name in ("nsamples", "seqlen", "eval_seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise LayercapError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.ppl and not self.tasks:
            raise LayercapError("nothing to compare on: give ppl texts and/or tasks.")
        if not Path(self.data).exists():
            raise LayercapError(f"data {str(self.data)!r} does not exist; pass calibration text (file or directory).")
        for p in self.ppl:
            if not Path(p).is_file():
                raise LayercapError(f"ppl {str(p)!r} is not a file.")
        for t in self.tasks:
            if not Path(t).exists():
                raise LayercapError(f"tasks {str(t)!r} does not exist.")
        self.device = check_device(self.device)

    @property
    def specs(self) -> list[RuleSpec]:
        return [parse_rule(r, "pruning") for r in self.rules]


@dataclass
class _Sweep:
    """What every stage of the sweep sees: the options, the loaded model, the calibration windows."""

    options: PruningSweepOptions
    out: Path
    runner: StageRunner
    model: Any
    tokenizer: Any
    calib: Any
    settings: dict[str, Any]
    log: Callable[[str], None]
    _validation: Any = None

    def upstream(self, *rels: str) -> dict[str, str]:
        return {rel: self.runner.output_hash(rel) for rel in rels}

    def eval_kwargs(self) -> dict[str, Any]:
        o = self.options
        return dict(ppl=o.ppl, tasks=o.tasks, limit=o.limit, seqlen=o.eval_seqlen, max_tokens=o.max_tokens,
                    batch_size=o.batch_size, seed=o.seed, progress=o.progress, bos=self.calib.bos)

    def validation(self):
        """LayerIF's held-out windows: other windows of the same text."""
        if self._validation is None:
            from layercap.data.calibration import calibration_set

            o = self.options
            self._validation = calibration_set(self.tokenizer, o.data, nsamples=max(2, o.nsamples // 2), seqlen=o.seqlen,
                                               seed=o.seed + 1, bos=self.calib.bos)
        return self._validation


def plan(sw: _Sweep) -> list[Stage]:
    o = sw.options
    eval_key = {k: sw.settings[k] for k in ("model_fingerprint", "dtype", "ppl_sha256", "task_sha256", "limit",
                                           "eval_seqlen", "max_tokens", "seed", "bos")}
    calib_key = {"calibration_sha256": sw.calib.sha256, "model_fingerprint": sw.settings["model_fingerprint"], "dtype": o.dtype}
    stages = [Stage("dense", lambda ctx: eval_key, _dense)]
    sources = []
    for s in o.specs:
        if s.source and s.source not in sources:
            sources.append(s.source)
    for source in sources:
        key = {**calib_key, "source": source, "seed": o.seed}
        stages.append(Stage(f"scores:{source}", lambda ctx, k=key: k, lambda ctx, src=source: _scores(ctx, src)))
    for sparsity in o.sparsities:
        for method in o.methods:
            for spec in o.specs:
                cid = cell_id(spec, method, sparsity)
                key = {**eval_key, **calib_key, "rule": spec.label, "method": method, "sparsity": sparsity,
                       "min_ratio": o.min_ratio, "max_ratio": o.max_ratio}
                ups = ["cells/dense.json"] + ([f"scores/{spec.source}.json"] if spec.source else [])
                stages.append(Stage(f"cell:{cid}", lambda ctx, k=key, u=ups: {**k, "upstream": ctx.upstream(*u)},
                                    lambda ctx, sp=spec, m=method, s=sparsity: _cell(ctx, sp, m, s)))
    return stages


def cell_id(spec: RuleSpec, method: str, sparsity: float) -> str:
    from layercap.report.pruning_table import cell_id as _cell_id

    return _cell_id(spec, method, sparsity)


def _dense(sw: _Sweep) -> list[str]:
    from layercap.evaluate import evaluate_model

    dense = evaluate_model(sw.model, sw.tokenizer, model_name=f"{sw.options.model} (dense)", **sw.eval_kwargs())
    dense.save(sw.out / "cells" / "dense.json")
    sw.log(dense.table())
    return ["cells/dense.json"]


def _scores(sw: _Sweep, source: str) -> list[str]:
    from layercap.experiments.common import compute_scores

    t0 = time.perf_counter()
    rel = f"scores/{source}.json"
    compute_scores(sw.model, source, sw.calib, sw.out / rel, batch_size=sw.options.batch_size, seed=sw.options.seed,
                   progress=sw.options.progress, validation=sw.validation() if source == "influence" else None)
    sw.log(f"scores {source}: {time.perf_counter() - t0:.1f} s")
    return [rel]


def _ratios(sw: _Sweep, spec: RuleSpec, sparsity: float):
    from layercap.models import find_blocks
    from layercap.programs.records import PruningRatios
    from layercap.programs.rules import ratios_by_rule
    from layercap.scorefile import LayerScores

    blocks = find_blocks(sw.model)
    if spec.source is None:
        return PruningRatios.uniform([b.name for b in blocks], [b.num_prunable for b in blocks], sparsity)
    scores = prunable_scores(LayerScores.load(sw.out / f"scores/{spec.source}.json"), {b.name: b.num_prunable for b in blocks})
    return ratios_by_rule(spec.rule, scores, sparsity, min_ratio=sw.options.min_ratio, max_ratio=sw.options.max_ratio)


def _cell(sw: _Sweep, spec: RuleSpec, method: str, sparsity: float) -> list[str]:
    import layercap.apply.prune as prune
    from layercap.evaluate import EvalResult, evaluate_model
    from layercap.report.pruning_table import CellResult

    o = sw.options
    ratios = _ratios(sw, spec, sparsity)
    dense = EvalResult.load(sw.out / "cells" / "dense.json")
    pruned = copy.deepcopy(sw.model)
    t0 = time.perf_counter()
    report = prune.prune_model(pruned, ratios.ratios(), method=method, calib=sw.calib, batch_size=o.batch_size, progress=False)
    t1 = time.perf_counter()
    ev = evaluate_model(pruned, sw.tokenizer, model_name=f"{o.model} {spec.label} {method} {sparsity:g}", reference=dense,
                        **sw.eval_kwargs())
    cell = CellResult(spec.rule, spec.source, method, float(sparsity), float(report.achieved), ratios.ratios(), ev,
                      t1 - t0, time.perf_counter() - t1, list(getattr(ratios, "warnings", []) or []),
                      settings_sha256=sha256_json(sw.settings))
    rel = f"cells/{cell_id(spec, method, sparsity)}.json"
    atomic_write_json(sw.out / rel, cell.to_dict())
    sw.log(f"{cell_id(spec, method, sparsity)}: ppl {', '.join(f'{v.ppl:.2f}' for v in ev.ppl.values())}; "
           f"mean acc above chance {ev.mean_acc_above_chance}; prune {t1 - t0:.0f} s, eval {cell.eval_seconds:.0f} s")
    return [rel]


def run_pruning_sweep(options: PruningSweepOptions, outdir: str | Path,
                      log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)):
    """Run (or resume) every stage; write OUTDIR/comparison.{json,csv,md,png}; return the
    :class:`~layercap.report.pruning_table.Comparison` of this invocation's cells and the
    runner's :class:`~layercap.experiments.runner.RunSummary`."""
    from layercap.data.calibration import calibration_set
    from layercap.data.tasks import load_task
    from layercap.evaluate import EvalResult
    from layercap.models import load_model
    from layercap.report.pruning_table import CellResult, Comparison, write_outputs

    o = options
    task_hashes = [load_task(t, limit=o.limit, seed=o.seed).sha256 for t in o.tasks]  # parse errors before any work
    out = check_run_dir(outdir, markers=("stages.json", RUN_FILE))
    model, tokenizer = load_model(o.model, dtype=o.dtype, device=o.device)
    calib = calibration_set(tokenizer, o.data, nsamples=o.nsamples, seqlen=o.seqlen, seed=o.seed, bos=o.bos, model=model)
    settings = {
        "model": str(o.model), "model_fingerprint": model_fingerprint(o.model), "dtype": o.dtype, "data": str(o.data),
        "calibration_sha256": calib.sha256, "nsamples": o.nsamples, "seqlen": o.seqlen, "seed": o.seed,
        "bos": calib.bos.to_dict(),
        "ppl": [str(p) for p in o.ppl], "ppl_sha256": [file_hash(p, "ppl") for p in o.ppl],
        "tasks": [str(t) for t in o.tasks], "task_sha256": task_hashes, "limit": o.limit, "eval_seqlen": o.eval_seqlen,
        "max_tokens": o.max_tokens, "min_ratio": o.min_ratio, "max_ratio": o.max_ratio,
    }
    with removed_on_failure(out):
        out.mkdir(parents=True, exist_ok=True)
        runner = StageRunner(out, device=o.device, log=lambda m: None)
        sweep = _Sweep(o, out, runner, model, tokenizer, calib, settings, log)
        stages = plan(sweep)
        summary = run_stages(runner, stages, sweep, lambda m: None, keep_only_plan=False)
    atomic_write_json(out / RUN_FILE, {"settings": settings, "settings_sha256": sha256_json(settings)})
    cells = [CellResult.from_dict(json.loads((out / f"cells/{s.name[len('cell:'):]}.json").read_text()))
             for s in stages if s.name.startswith("cell:")]
    result = Comparison(settings, EvalResult.load(out / "cells" / "dense.json"), cells)
    write_outputs(result, out)
    return result, summary


def collect(outdir: str | Path):
    """The comparison of every finished cell in ``outdir`` computed with the latest run's shared
    settings (no model work), ordered by sparsity, pruner, then rule."""
    from layercap.apply.prune import PRUNERS
    from layercap.evaluate import EvalResult
    from layercap.report.pruning_table import RULE_ORDER, CellResult, Comparison

    outdir = Path(outdir)
    run_file, dense_file = outdir / RUN_FILE, outdir / "cells" / "dense.json"
    if not run_file.is_file() or not dense_file.is_file():
        raise LayercapError(f"{outdir} holds no comparison run (run.json and cells/dense.json missing); run compare-pruning first.")
    run = json.loads(run_file.read_text(encoding="utf-8"))
    current = run.get("settings_sha256")
    cells = []
    for f in sorted((outdir / "cells").glob("*.json")):
        if f.name == "dense.json":
            continue
        cell = CellResult.from_dict(json.loads(f.read_text(encoding="utf-8")))
        if cell.settings_sha256 in (None, current):  # None: a cell written before settings were recorded per cell
            cells.append(cell)
    pruner_order = {m: i for i, m in enumerate(PRUNERS)}
    cells.sort(key=lambda c: (c.sparsity, pruner_order.get(c.method, 99), RULE_ORDER.get(c.rule, 99), c.label))
    return Comparison(run["settings"], EvalResult.load(dense_file), cells)
