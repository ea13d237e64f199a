"""The pruning sweep (``layercap compare-pruning``): ratio rules x pruners x sparsities on one
model (the paper's Tables 1-2), as stages of the one runner.

Every cell (rule, pruner, sparsity) prunes a fresh copy of the dense model on the *same*
calibration windows, then evaluates perplexity and zero-shot accuracy; the dense model is
evaluated once as the reference (it also decides which tasks are "above chance", see
``layercap.evaluate``). Stages (names; artefacts relative to OUTDIR)::

    dense                  cells/dense.json          the dense model's evaluation
    scores:<source>        scores/<source>.json      layer scores of the dense model
    cell:<id>              cells/<id>.json           e.g. cell:mdl-kfac_wanda_s0.50
    fit:<id>               fidelity/<id>.json        the cell's pruned model against the dense one on
                                                     the calibration windows (layercap's pick)

A stage's cache key holds everything it depends on (calibration windows, evaluation settings and
files, the rule, pruner and sparsity, its upstream artefacts), so a rerun computes exactly what
is new or changed: another sparsity adds its cells; other calibration settings recompute scores
and cells but not the dense evaluation. ``run.json`` records the shared settings of the latest
run; :func:`collect` (``--report-only``) reads the cells computed with those settings.

Rules (``RULE[:SOURCE]``; the default score source in brackets): ``uniform`` (none), ``owl``
[owl], ``alphapruning`` [alpha-hill], ``layerif`` [influence], ``mdl`` [kfac] -- ``mdl:diag``,
``mdl:kfac``, ``mdl:ekfac``, ``mdl:gradnorm`` ... choose the estimator of zeta^2; ``mdl-paper``
(the paper's protocol: zeta^2 program capped at s + 0.05). Measured rules: ``mdl:damage`` (the
convex-damage program on the KL measured when each block alone is pruned, stage
``damage:<pruner>`` -> ``damage/<pruner>.json``), ``mdl:obd`` (the same program on the free
second-order estimate, stage ``obd:<pruner>``), ``atp`` (arithmetic progression over depth, its
slope chosen on calibration KL) and ``evopress`` (level-switch search from uniform on
calibration KL); ``mdl:damage-linear`` / ``mdl:obd-linear`` run the program on tables with a row
(and give a ratio) per Linear. Every rule's ratios are weighted by each block's *prunable* weights and meet
the target sparsity exactly within the same box [min_ratio, max_ratio]; each cell records the
wall seconds of its rule's decision (scores or damage stage plus program or search).
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
from layercap.experiments.common import check_device, file_hash, model_fingerprint, prunable_scores
from layercap.experiments.runner import Stage, StageRunner, check_run_dir, removed_on_failure, run_stages
from layercap.io import atomic_write_json, read_json, sha256_json

HINT = "It may be damaged; delete it to recompute, or choose a new -o."
from layercap.programs.damage import TRUST_RADII
from layercap.programs.rules import (DAMAGE_COLUMNS, DAMAGE_SOURCES, LINEAR_SOURCES, MEASURED, REFINE, RuleSpec, damage_kind,
                                     is_refined, parse_rule, table_units)
from layercap.report.pruning_table import cell_id

RUN_FILE = "run.json"
# what a searched rule's ratios record about its search, kept in the cell (atp's steps, mdl:context's radii)
DECISION_KEYS = ("search", "fitness", "radius")


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
    start_token: int = 0
    damage_levels: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    damage_nsamples: int | None = None
    fitness_nsamples: int | None = None
    search_generations: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        from layercap.scores import available_methods

        from layercap.apply.prune import PRUNERS
        from layercap.data.bos import POLICIES

        if self.bos not in POLICIES:
            raise LayercapError(f"bos must be one of {', '.join(POLICIES)}, got {self.bos!r}.")

        from layercap.programs.damage import check_levels

        known = available_methods() + list(DAMAGE_SOURCES) + [k + REFINE for k in DAMAGE_SOURCES] + list(LINEAR_SOURCES)
        specs = [parse_rule(r, "pruning", known_sources=known) for r in self.rules]
        self.damage_levels = check_levels(self.damage_levels, "damage_levels")
        if self.damage_nsamples is not None and not (1 <= self.damage_nsamples <= self.nsamples):
            raise LayercapError(f"damage_nsamples must lie in [1, nsamples = {self.nsamples}], got {self.damage_nsamples}.")
        if self.fitness_nsamples is not None and not (2 <= self.fitness_nsamples <= self.nsamples):
            raise LayercapError(f"fitness_nsamples must lie in [2, nsamples = {self.nsamples}] (the searches screen on 2 "
                                f"windows), got {self.fitness_nsamples}.")
        if self.search_generations < 1:
            raise LayercapError(f"search_generations must be >= 1, got {self.search_generations}.")
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
        if self.limit is not None and self.limit < 1:
            raise LayercapError(f"limit must be >= 1, got {self.limit}.")
        if not self.max_ratio < 1.0:
            raise LayercapError(f"max_ratio {self.max_ratio} must be < 1 (a ratio of 1 removes a whole block).")
        if not 0.0 <= self.min_ratio <= self.max_ratio:
            raise LayercapError(f"min_ratio {self.min_ratio} must lie in [0, max_ratio = {self.max_ratio}].")
        if not self.ppl and not self.tasks:
            raise LayercapError("nothing to compare on: give ppl texts and/or tasks.")
        if not Path(self.data).exists():
            raise LayercapError(f"data {str(self.data)!r} does not exist; pass calibration text (file or directory).")
        for p in self.ppl:
            if not Path(p).is_file():
                raise LayercapError(f"ppl {str(p)!r} is not a file.")
            if Path(p).resolve() == Path(self.data).resolve() and (self.max_tokens is None or self.max_tokens > self.start_token):
                raise LayercapError(
                    f"ppl {str(p)!r} is also the calibration text: perplexity reads "
                    f"{'all its tokens' if self.max_tokens is None else f'its first {self.max_tokens} tokens'} and calibration "
                    f"windows start at token {self.start_token}, so they would overlap; hold the evaluation tokens out "
                    "(max_tokens <= start_token) or use another text.")
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
                                               seed=o.seed + 1, bos=self.calib.bos, start_token=o.start_token)
        return self._validation


def plan(sw: _Sweep) -> list[Stage]:
    o = sw.options
    eval_key = {k: sw.settings[k] for k in ("model_fingerprint", "dtype", "ppl_sha256", "task_sha256", "limit",
                                           "eval_seqlen", "max_tokens", "seed", "bos")}
    calib_key = {"calibration_sha256": sw.calib.sha256, "model_fingerprint": sw.settings["model_fingerprint"], "dtype": o.dtype}
    stages = [Stage("dense", lambda ctx: eval_key, _dense)]
    sources = []
    for s in o.specs:
        if s.source and s.source not in sources and damage_kind(s.source) is None and s.source != MEASURED:
            sources.append(s.source)
    for source in sources:
        key = {**calib_key, "source": source, "seed": o.seed}
        stages.append(Stage(f"scores:{source}", lambda ctx, k=key: k, lambda ctx, src=source: _scores(ctx, src)))
    damage_key = {**calib_key, "levels": o.damage_levels, "nsamples": o.damage_nsamples}
    for kind in [k for k in DAMAGE_SOURCES + LINEAR_SOURCES if any(damage_kind(s.source) == k for s in o.specs)]:
        for method in o.methods:
            for sparsity in (o.sparsities if kind == "context" else [None]):  # a context table per operating point
                key = {**damage_key, "kind": kind, "method": method, **({"sparsity": sparsity} if sparsity else {})}
                name = f"{kind}:{method}" + (f":s{sparsity:.2f}" if sparsity else "")
                stages.append(Stage(name, lambda ctx, k=key: k, lambda ctx, kd=kind, m=method, s=sparsity: _damage(ctx, kd, m, s)))
    for sparsity in o.sparsities:
        for method in o.methods:
            for spec in o.specs:
                cid = cell_id(spec, method, sparsity)
                key = {**eval_key, **calib_key, "rule": spec.label, "method": method, "sparsity": sparsity,
                       "min_ratio": o.min_ratio, "max_ratio": o.max_ratio}
                ups = ["cells/dense.json"] + _source_files(spec, method, sparsity)
                searched = spec.rule == "evopress" or is_refined(spec.source)
                in_context = damage_kind(spec.source) == "context"
                if spec.source == MEASURED or searched or in_context:
                    key["search"] = {"generations": o.search_generations} if searched else {}
                    key["search"]["nsamples"] = _fitness_nsamples(o)
                    if in_context:
                        key["search"]["radii"] = list(TRUST_RADII)
                stages.append(Stage(f"cell:{cid}", lambda ctx, k=key, u=ups: {**k, "upstream": ctx.runner.upstream(*u)},
                                    lambda ctx, sp=spec, m=method, s=sparsity: _cell(ctx, sp, m, s)))
                # keyed on the ratios, not the cell file: a cell re-evaluated at the same ratios keeps its fit
                stages.append(Stage(f"fit:{cid}", lambda ctx, k=calib_key, c=cid, m=method: {
                    **k, "method": m, "ratios_sha256": sha256_json(_cell_file(ctx, c).ratios)},
                    lambda ctx, c=cid, m=method: _fidelity(ctx, c, m)))
    return stages


def _source_files(spec: RuleSpec, method: str, sparsity: float) -> list[str]:
    """The artefacts a rule's decision reads (run-relative): a scores file, a damage table, or none."""
    kind = damage_kind(spec.source)
    if kind:
        return [_damage_rel(kind, method, sparsity)]
    if spec.source and spec.source != MEASURED:
        return [f"scores/{spec.source}.json"]
    return []


def _damage_rel(kind: str, method: str, sparsity: float | None = None) -> str:
    if kind == "context":
        return f"damage/context-{method}-s{sparsity:.2f}.json"
    base, units = table_units(kind)
    tail = "" if units == "block" else f"-{units}"
    return f"damage/{method}{tail}.json" if base == "damage" else f"damage/obd-{method}{tail}.json"


def _first_windows(calib, n: int | None):
    """The first ``n`` windows of ``calib`` (all of them when None), as a CalibrationSet of its own."""
    return calib if n is None else calib.first(n)


def _measure_calib(sw: _Sweep):
    """The calibration windows the damage curves measure KL on: the first ``damage_nsamples``
    windows, or all of them. The pruners always see all windows."""
    return _first_windows(sw.calib, sw.options.damage_nsamples)


def _fitness_nsamples(o: PruningSweepOptions) -> int | None:
    """Windows the searches' fitness reads (None: all): ``fitness_nsamples``, else the damage curves'."""
    return o.fitness_nsamples if o.fitness_nsamples is not None else o.damage_nsamples


def _fitness_calib(sw: _Sweep):
    """The windows of the searches' fitness (atp's step, evopress / +refine, the trust radius). More
    windows cost more per candidate but rank configurations more reliably (results/pruning: 'Is the
    fitness the problem?')."""
    return _first_windows(sw.calib, _fitness_nsamples(sw.options))


def _damage(sw: _Sweep, kind: str, method: str, sparsity: float | None = None) -> list[str]:
    """The damage table of ``method`` pruning: measured KL per (block, level), OBD estimates only, or
    (``context``) the measured KL increase with every other block pruned uniformly at ``sparsity``
    the way the cells prune (all calibration windows)."""
    from layercap.apply.prune.damage import damage_table

    o = sw.options
    calib = _measure_calib(sw)
    rel = _damage_rel(kind, method, sparsity)
    context = _uniform_context(sw, sparsity) if kind == "context" else None
    path = sw.out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    partial = path.with_name(path.name + ".partial")
    table = damage_table(sw.model, calib, kind, o.damage_levels, method, batch_size=o.batch_size, progress=o.progress,
                         checkpoint=partial, model_id=str(o.model), context=context, context_calib=sw.calib)
    table.save(path)
    partial.unlink(missing_ok=True)  # the finished table replaces it
    sw.log(f"{kind}:{method}: {time.perf_counter() - t0:.1f} s")
    return [rel]


def _uniform_context(sw: _Sweep, sparsity: float) -> dict[str, float]:
    from layercap.models import find_blocks
    from layercap.programs.records import PruningRatios

    blocks = find_blocks(sw.model)
    return PruningRatios.uniform([b.name for b in blocks], [b.num_prunable for b in blocks], sparsity).ratios()


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


def _ratios(sw: _Sweep, spec: RuleSpec, method: str, sparsity: float):
    """The rule's per-block ratios for this cell (PruningRatios)."""
    from layercap.models import find_blocks
    from layercap.programs.records import PruningRatios
    from layercap.programs.rules import ratios_by_rule
    from layercap.scorefile import LayerScores

    o = sw.options
    blocks = find_blocks(sw.model)
    names, params = [b.name for b in blocks], [b.num_prunable for b in blocks]
    if spec.source is None:
        return PruningRatios.uniform(names, params, sparsity)
    kind = damage_kind(spec.source)
    if kind:
        from layercap.apply.prune.damage import prunable_units
        from layercap.programs.damage import load_for, ratios_from_damage

        units = prunable_units(blocks, table_units(kind)[1])  # a row per block, or per Linear
        table = load_for(sw.out / _damage_rel(kind, method, sparsity), [u.name for u in units], [u.params for u in units])
        if kind == "context":  # the program in a trust region around the operating point, radius by calibration KL
            from layercap.apply.prune.search import KLFitness, trust_region_search

            with KLFitness(copy.deepcopy(sw.model), _fitness_calib(sw), method, batch_size=o.batch_size) as fit:
                ratios = trust_region_search(fit, table, sparsity, min_ratio=o.min_ratio, max_ratio=o.max_ratio,
                                             rule=f"{spec.rule}:{kind}")
        else:
            ratios = ratios_from_damage(table, sparsity, source=DAMAGE_COLUMNS[kind],
                                        min_ratio=o.min_ratio, max_ratio=o.max_ratio, rule=f"{spec.rule}:{kind}")
        return _search(sw, ratios, method, rule=spec.label) if is_refined(spec.source) else ratios
    if spec.source == MEASURED:
        if spec.rule == "atp":
            from layercap.apply.prune.search import KLFitness, atp_search

            with KLFitness(copy.deepcopy(sw.model), _fitness_calib(sw), method, batch_size=o.batch_size) as fit:
                return atp_search(fit, names, params, sparsity, min_ratio=o.min_ratio, max_ratio=o.max_ratio)
        return _search(sw, PruningRatios.uniform(names, params, sparsity), method)
    scores = prunable_scores(LayerScores.load(sw.out / f"scores/{spec.source}.json"), dict(zip(names, params)))
    return ratios_by_rule(spec.rule, scores, sparsity, min_ratio=o.min_ratio, max_ratio=o.max_ratio)


def _search(sw: _Sweep, start, method: str, rule: str | None = None):
    """The evopress search from ``start`` (uniform: the evopress peer; the program's ratios: +refine)
    on a copy of the model and the measurement windows."""
    from layercap.apply.prune.search import evolve_ratios

    o = sw.options
    return evolve_ratios(copy.deepcopy(sw.model), _fitness_calib(sw), start, method=method, rule=rule,
                         min_ratio=o.min_ratio, max_ratio=o.max_ratio, generations=o.search_generations,
                         progress=o.progress, batch_size=o.batch_size)


def _decision_seconds(sw: _Sweep, spec: RuleSpec, method: str, sparsity: float) -> float:
    """Wall seconds of the stage that made the rule's input (scores or damage table), as recorded."""
    for rec in sw.runner.manifest.stages.values():
        if any(rel in rec.outputs for rel in _source_files(spec, method, sparsity)):
            return float(rec.wall_time_s)
    return 0.0


def _cell(sw: _Sweep, spec: RuleSpec, method: str, sparsity: float) -> list[str]:
    import layercap.apply.prune as prune
    from layercap.evaluate import EvalResult, evaluate_model
    from layercap.report.pruning_table import CellResult

    o = sw.options
    t_decide = time.perf_counter()
    ratios = _ratios(sw, spec, method, sparsity)
    decision = time.perf_counter() - t_decide + _decision_seconds(sw, spec, method, sparsity)
    tried = {k: ratios.metadata[k] for k in DECISION_KEYS if k in (ratios.metadata or {})}
    if "fitness" in tried:  # every search records its best fitness; say how many windows it read
        tried["fitness_windows"] = int(_fitness_calib(sw).input_ids.shape[0])
    dense = EvalResult.load(sw.out / "cells" / "dense.json")
    pruned = copy.deepcopy(sw.model)
    t0 = time.perf_counter()
    report = prune.prune_model(pruned, ratios.ratios(), method=method, calib=sw.calib, batch_size=o.batch_size, progress=False)
    t1 = time.perf_counter()
    ev = evaluate_model(pruned, sw.tokenizer, model_name=f"{o.model} {spec.label} {method} {sparsity:g}", reference=dense,
                        **sw.eval_kwargs())
    cell = CellResult(spec.rule, spec.source, method, float(sparsity), float(report.achieved), ratios.ratios(), ev,
                      t1 - t0, time.perf_counter() - t1, list(getattr(ratios, "warnings", []) or []),
                      settings_sha256=sha256_json(sw.settings), decision_seconds=decision,
                      decision=tried)
    rel = f"cells/{cell_id(spec, method, sparsity)}.json"
    atomic_write_json(sw.out / rel, cell.to_dict())
    sw.log(f"{cell_id(spec, method, sparsity)}: ppl {', '.join(f'{v.ppl:.2f}' for v in ev.ppl.values())}; "
           f"mean acc above chance {ev.mean_acc_above_chance}; prune {t1 - t0:.0f} s, eval {cell.eval_seconds:.0f} s")
    return [rel]


FIDELITY_SCHEMA = "layercap.cell_fidelity/v1"


def _fidelity_rel(cid: str) -> str:
    return f"fidelity/{cid}.json"


def _cell_file(sw: _Sweep, cid: str):
    from layercap.report.pruning_table import CellResult

    return CellResult.from_dict(read_json(sw.out / f"cells/{cid}.json", "comparison cell", HINT))


def _fidelity(sw: _Sweep, cid: str, method: str) -> list[str]:
    """The cell's pruned model (pruned again at its ratios, on all calibration windows, as the
    cell was) against the dense model on those windows: the evaluation-free quantity by which the
    standings choose among layercap's rules. Costs one pruning plus two forwards of the windows."""
    from layercap.apply.prune import calibration_fidelity, prune_model

    o = sw.options
    cell = _cell_file(sw, cid)
    pruned = copy.deepcopy(sw.model)
    t0 = time.perf_counter()
    prune_model(pruned, cell.ratios, method=method, calib=sw.calib, batch_size=o.batch_size, progress=False)
    t1 = time.perf_counter()
    fit = calibration_fidelity(sw.model, pruned, sw.calib, batch_size=o.batch_size)
    del pruned
    rel = _fidelity_rel(cid)
    atomic_write_json(sw.out / rel, {"schema": FIDELITY_SCHEMA, "cell": cid, "method": method,
                                     "ratios_sha256": sha256_json(cell.ratios), **fit.to_dict(),
                                     "prune_seconds": t1 - t0, "seconds": time.perf_counter() - t0})
    sw.log(f"{cid}: calibration KL {fit.kl:.4f} nats/token on {fit.windows} windows")
    return [rel]


def _attach_fidelity(out: Path, cells: list) -> None:
    """Set each cell's ``calibration_kl`` from fidelity/<id>.json when that file measured the
    cell's current ratios (a file left from other ratios is ignored until its stage reruns)."""
    from layercap.apply.prune.fidelity import Fidelity
    from layercap.report.pruning_table import cell_id

    for c in cells:
        path = out / _fidelity_rel(cell_id(RuleSpec(c.rule, c.source, "pruning"), c.method, c.sparsity))
        if not path.is_file():
            continue
        doc = read_json(path, "cell fidelity", HINT)
        if doc.get("schema") != FIDELITY_SCHEMA:
            raise LayercapError(f"{path}: schema {doc.get('schema')!r} is not {FIDELITY_SCHEMA!r}. {HINT}")
        if doc.get("ratios_sha256") == sha256_json(c.ratios):
            c.calibration_kl = Fidelity.from_dict(doc, str(path)).kl


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
    calib = calibration_set(tokenizer, o.data, nsamples=o.nsamples, seqlen=o.seqlen, seed=o.seed, bos=o.bos, model=model,
                            start_token=o.start_token)
    from layercap.models.checks import check_seqlen

    check_seqlen(model, o.seqlen, "--seqlen")
    if o.ppl:
        check_seqlen(model, o.eval_seqlen, "--eval-seqlen")
    settings = {
        "model": str(o.model), "model_fingerprint": model_fingerprint(o.model), "dtype": o.dtype, "data": str(o.data),
        "calibration_sha256": calib.sha256, "nsamples": o.nsamples, "seqlen": o.seqlen, "seed": o.seed,
        "start_token": o.start_token, "bos": calib.bos.to_dict(),
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
    cells = [CellResult.from_dict(read_json(out / f"cells/{s.name[len('cell:'):]}.json", "comparison cell", HINT))
             for s in stages if s.name.startswith("cell:")]
    _attach_fidelity(out, cells)
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
    run = read_json(run_file, "comparison run file", HINT)
    current = run.get("settings_sha256")
    cells = []
    for f in sorted((outdir / "cells").glob("*.json")):
        if f.name == "dense.json":
            continue
        cell = CellResult.from_dict(read_json(f, "comparison cell", HINT))
        if cell.settings_sha256 in (None, current):  # None: a cell written before settings were recorded per cell
            cells.append(cell)
    _attach_fidelity(outdir, cells)
    pruner_order = {m: i for i, m in enumerate(PRUNERS)}
    cells.sort(key=lambda c: (c.sparsity, pruner_order.get(c.method, 99), RULE_ORDER.get(c.rule, 99), c.label))
    return Comparison(run["settings"], EvalResult.load(dense_file), cells)
