"""One function per stage of ``layercap run``: the only place that calls the library's APIs.

Each ``stage_*`` function reads what it needs from the run directory, calls one library API,
writes its artefact(s) atomically and returns their paths relative to the run directory. Each
``*_inputs`` function returns what the stage's cache key is made of (config fields, upstream
artefact hashes, data hashes); see :mod:`layercap.experiments.runner`.

Run directory layout (paths relative to it)::

    config.yaml              the resolved config
    model.json               model source, blocks (names, params, prunable weights)
    model/                   tiny-<family> models only: the saved random-init checkpoint
    data/calibration.npy     calibration windows (int64, nsamples x seqlen) + data.json
    scores/<method>.json     layercap.scores/v1
    utility/utility.json     layercap.utility/v1 (only when allocation.rules has mdl:measured)
    allocation/<rule>.json   layercap.allocation/v1
    damage/<kind>.json       layercap.damage/v1 (mdl:obd -> obd, mdl:damage -> damage)
    ratios/<rule>.json       layercap.ratios/v1 (``:`` in a rule name is ``-`` in its file name)
    pruned/<rule>.json       what was pruned (measured sparsity per block) + pruned/<rule>/ checkpoint
    eval/<variant>.json      layercap.run-eval/v1 (perplexity, accuracy per task)
    report.md, report.html, report_files/*.png
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from layercap.errors import LayercapError
from layercap.io import atomic_directory, atomic_write_bytes, atomic_write_json
from layercap.models.load import model_source, set_model_source
from layercap.experiments.config import RULE_SOURCES, PipelineConfig
from layercap.experiments.common import (
    compute_scores,
    drop_timings,
    is_tiny,
    model_fingerprint,
    prunable_scores,
    read_json,
)
from layercap.experiments.runner import Stage, StageRunner, hash_output
from layercap.programs.rules import rule_file
from layercap.scores.api import versions as _versions

EVAL_SCHEMA = "layercap.run-eval/v1"
PRUNED_SCHEMA = "layercap.run-pruned/v1"
MODEL_SCHEMA = "layercap.run-model/v1"
DATA_SCHEMA = "layercap.run-data/v1"


@dataclass
class RunContext:
    """What every stage sees: the resolved config, the run directory, the device, a logger."""

    config: PipelineConfig
    run_dir: Path
    runner: StageRunner
    device: str = "cpu"
    log: Callable[[str], None] = field(default=lambda msg: None)
    # the dense (model, tokenizer), loaded once per invocation: stages get deep copies, so a
    # stage that prunes or adapts in place never touches another stage's model
    dense: tuple[Any, Any] | None = field(default=None, repr=False)

    def path(self, rel: str) -> Path:
        return self.run_dir / rel


# ---- model ---------------------------------------------------------------------------------------
def model_inputs(ctx: RunContext) -> dict[str, Any]:
    m = ctx.config.model
    inputs: dict[str, Any] = {"model": {k: getattr(m, k) for k in ("spec", "blocks", "modules")}}
    if is_tiny(m.spec):
        inputs["tiny"] = {"layers": m.tiny_layers, "hidden": m.tiny_hidden, "seed": m.seed}
    else:
        inputs["fingerprint"] = model_fingerprint(m.spec)
    return inputs


def stage_model(ctx: RunContext) -> list[str]:
    """Describe the model (``model.json``); build and save a ``tiny-<family>`` model once."""
    m = ctx.config.model
    outputs = ["model.json"]
    if is_tiny(m.spec):
        from layercap.models.tiny import build_tiny

        model, tokenizer = build_tiny(m.spec[len("tiny-"):], num_layers=m.tiny_layers, hidden=m.tiny_hidden, seed=m.seed)
        with atomic_directory(ctx.path("model")) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        outputs.insert(0, "model")
        source = f"{m.spec} (random init, seed {m.seed}, saved in model/)"
    else:
        model, tokenizer = load_run_model(ctx, with_tokenizer=False)
        source = str(model_source(model, m.spec))
    blocks = find_run_blocks(ctx, model)
    doc = {
        "schema": MODEL_SCHEMA, "spec": m.spec, "source": source, "architecture": type(model).__name__,
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "blocks": [{"name": b.name, "params": int(b.num_params), "prunable": int(b.num_prunable), "linears": len(b.linears)}
                   for b in blocks],
    }
    atomic_write_json(ctx.path("model.json"), doc)
    return outputs


def model_dir_or_spec(ctx: RunContext) -> str:
    return str(ctx.path("model")) if is_tiny(ctx.config.model.spec) else ctx.config.model.spec


def load_run_model(ctx: RunContext, with_tokenizer: bool = True, path: str | None = None):
    """(model, tokenizer) of the run: the saved tiny model, the pruned checkpoint at ``path``, or the spec."""
    import copy

    from layercap.models import load_model

    if path is None:
        dense, tokenizer = dense_model(ctx)
        model = copy.deepcopy(dense)
        tokenizer = tokenizer if with_tokenizer else None
    else:
        model, tokenizer = load_model(path, dtype=ctx.config.model.dtype, device=ctx.device, with_tokenizer=with_tokenizer)
    # Artefacts name the model by its spec (and run-relative path), never by an absolute path,
    # so that the same run in another directory writes byte-identical files.
    label = ctx.config.model.spec
    if path:
        label += f" ({Path(path).relative_to(ctx.run_dir)})" if Path(path).is_relative_to(ctx.run_dir) else f" ({path})"
    set_model_source(model, label)
    return model, tokenizer


def dense_model(ctx: RunContext):
    """The run's dense (model, tokenizer), loaded on first use and kept for the invocation.
    Never modify it: :func:`load_run_model` hands stages deep copies."""
    from layercap.models import load_model

    if ctx.dense is None:
        ctx.dense = load_model(model_dir_or_spec(ctx), dtype=ctx.config.model.dtype, device=ctx.device)
    return ctx.dense


def find_run_blocks(ctx: RunContext, model):
    from layercap.models import find_blocks

    return find_blocks(model, blocks_regex=ctx.config.model.blocks, modules_regex=ctx.config.model.modules)


# ---- calibration data -----------------------------------------------------------------------------
def data_inputs(ctx: RunContext) -> dict[str, Any]:
    d = ctx.config.data
    path = _existing(ctx.config.data_path(d.calibration), "data.calibration")
    return {"data": {"nsamples": d.nsamples, "seqlen": d.seqlen, "seed": d.seed, "bos": d.bos, "start_token": d.start_token},
            "file": hash_output(path),
            "tokenizer": ctx.runner.upstream(*(["model"] if is_tiny(ctx.config.model.spec) else ["model.json"]))}


def stage_data(ctx: RunContext) -> list[str]:
    """Draw the calibration windows once; every later stage reads the same ``data/calibration.npy``."""
    from layercap.data.calibration import calibration_set
    from layercap.models import load_tokenizer

    d = ctx.config.data
    tokenizer = load_tokenizer(model_dir_or_spec(ctx))
    path = ctx.config.data_path(d.calibration)
    # the family decides BOS too (Gemma always gets one), not only the tokenizer
    if is_tiny(ctx.config.model.spec):
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(ctx.path("model"))
    else:
        model_config = dense_model(ctx)[0].config
    calib = calibration_set(tokenizer, path, nsamples=d.nsamples, seqlen=d.seqlen, seed=d.seed, bos=d.bos, model=model_config,
                            start_token=d.start_token)
    buf = io.BytesIO()
    np.save(buf, calib.input_ids.numpy().astype(np.int64), allow_pickle=False)
    atomic_write_bytes(ctx.path("data/calibration.npy"), buf.getvalue())
    atomic_write_json(ctx.path("data/data.json"), {
        "schema": DATA_SCHEMA, "source": str(path), "source_sha256": hash_output(path), "sha256": calib.sha256,
        "nsamples": d.nsamples, "seqlen": d.seqlen, "seed": d.seed, "start_token": d.start_token, "tokens": calib.num_tokens,
        "bos": calib.bos.to_dict(),
    })
    return ["data/calibration.npy", "data/data.json"]


def load_calibration(ctx: RunContext):
    import torch

    from layercap.data.bos import BosChoice
    from layercap.data.calibration import CalibrationSet

    meta = read_json(ctx.path("data/data.json"))
    ids = torch.from_numpy(np.load(ctx.path("data/calibration.npy"), allow_pickle=False))
    return CalibrationSet(ids, meta["sha256"], meta["source"], meta["seed"], BosChoice.from_dict(meta.get("bos", {})))


def _model_and_data(ctx: RunContext) -> dict[str, str]:
    rels = ["model.json", "data/data.json"] + (["model"] if is_tiny(ctx.config.model.spec) else [])
    return ctx.runner.upstream(*rels)


# ---- scoring ------------------------------------------------------------------------------------------
def score_inputs(ctx: RunContext, method: str) -> dict[str, Any]:
    s = ctx.config.scoring
    # batch_size is a memory knob only (results do not depend on it), so it is not part of the key.
    return {"method": method, "damping": s.damping, "options": s.options, "dtype": ctx.config.model.dtype,
            "upstream": _model_and_data(ctx)}


def stage_score(ctx: RunContext, method: str) -> list[str]:
    from layercap.scores import ScoreOptions

    s = ctx.config.scoring
    model, _ = load_run_model(ctx, with_tokenizer=False)
    rel = f"scores/{method}.json"
    extras = _score_option_extras(ScoreOptions, s.options)
    compute_scores(model, method, load_calibration(ctx), ctx.path(rel), batch_size=s.batch_size, device=ctx.device,
                   progress=True, metadata={"model": ctx.config.model.spec}, damping=s.damping,
                   seed=extras.pop("seed", 0), **extras)
    return [rel]


def _score_option_extras(options_cls, extras: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import fields

    allowed = {f.name for f in fields(options_cls)} - {"batch_size", "damping", "device", "progress", "extra"}
    unknown = sorted(set(extras) - allowed)
    if unknown:
        raise LayercapError(f"scoring.options: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}.")
    return dict(extras)


def load_scores(ctx: RunContext, method: str):
    from layercap.scorefile import LayerScores

    return LayerScores.load(ctx.path(f"scores/{method}.json"))


# ---- programs -----------------------------------------------------------------------------------------
def rule_source(ctx: RunContext, program: str, rule: str) -> str:
    """The scores file a rule reads. Rules that need no scores (uniform, MoLA patterns) read the
    decision scores only for the layer names and sizes."""
    scores = ctx.config.allocation.scores if program == "allocation" else ctx.config.pruning.scores
    return RULE_SOURCES.get((program, rule), scores)


UTILITY_FILE = "utility/utility.json"


def allocation_inputs(ctx: RunContext, rule: str) -> dict[str, Any]:
    from layercap.programs.rules import UTILITY_RULES

    a = ctx.config.allocation
    fields_ = {k: getattr(a, k) for k in ("budget", "unit", "lower", "upper", "beta", "alpha", "integer")}
    rels = [f"scores/{rule_source(ctx, 'allocation', rule)}.json"] + ([UTILITY_FILE] if rule in UTILITY_RULES else [])
    return {"rule": rule, "allocation": fields_, "upstream": ctx.runner.upstream(*rels)}


def utility_inputs(ctx: RunContext) -> dict[str, Any]:
    a = ctx.config.allocation
    return {"levels": a.utility_levels, "steps": a.utility_steps, "lr": a.utility_lr, "rank": a.utility_rank,
            "batch_size": ctx.config.scoring.batch_size, "upstream": _model_and_data(ctx)}


def stage_utility(ctx: RunContext) -> list[str]:
    """Measured utility curves (``mdl:measured``): each block alone adapted at each level on the
    first half of the calibration windows, the NLL reduction measured on the second half (both
    from the calibration tokens, so never the evaluation text)."""
    from layercap.apply.utility import measure_utility

    a = ctx.config.allocation
    calib = load_calibration(ctx)
    n = calib.input_ids.shape[0]
    if n < 2:
        raise LayercapError(f"mdl:measured needs data.nsamples >= 2 (half to adapt on, half to measure), got {n}.")
    halves = calib.halves()
    model, _ = load_run_model(ctx, with_tokenizer=False)
    ctx.path("utility").mkdir(parents=True, exist_ok=True)
    table = measure_utility(model, halves[0], halves[1], a.utility_levels, steps=a.utility_steps, lr=a.utility_lr,
                            unit_rank=a.utility_rank, batch_size=ctx.config.scoring.batch_size,
                            checkpoint=str(ctx.path(UTILITY_FILE)) + ".partial", model_id=ctx.config.model.spec)
    table.save(ctx.path(UTILITY_FILE))
    Path(str(ctx.path(UTILITY_FILE)) + ".partial").unlink(missing_ok=True)
    return [UTILITY_FILE]


def stage_allocation(ctx: RunContext, rule: str) -> list[str]:
    from layercap.programs.rules import UTILITY_RULES, allocation_by_rule

    a = ctx.config.allocation
    scores = load_scores(ctx, rule_source(ctx, "allocation", rule))
    utility = None
    if rule in UTILITY_RULES:
        from layercap.programs.utility import UtilityTable

        utility = UtilityTable.load(ctx.path(UTILITY_FILE))
    alloc = allocation_by_rule(rule, scores, a.budget, beta=a.beta, alpha=a.alpha, lower=a.lower, upper=a.upper,
                               integer=a.integer, unit=a.unit, utility=utility)
    rel = f"allocation/{rule_file(rule)}.json"
    alloc.save(ctx.path(rel))
    return [rel]


def _pruning_spec(ctx: RunContext, rule: str):
    from layercap.programs.rules import parse_rule

    return parse_rule(rule, "pruning", curvature=ctx.config.pruning.scores)


def ratios_inputs(ctx: RunContext, rule: str) -> dict[str, Any]:
    from layercap.programs.rules import DAMAGE_SOURCES, LINEAR_SOURCES, MEASURED

    p = ctx.config.pruning
    fields_ = {k: getattr(p, k) for k in ("sparsity", "mode", "eta", "min_ratio", "max_ratio")}
    spec = _pruning_spec(ctx, rule)
    if spec.source in DAMAGE_SOURCES + LINEAR_SOURCES:
        upstream = ctx.runner.upstream(f"damage/{spec.source}.json")
        if spec.source == "context":  # its trust radius is chosen on the pruned model's calibration KL
            from layercap.programs.damage import TRUST_RADII

            fields_.update(method=p.method, structure=p.structure, radii=list(TRUST_RADII))
            upstream = {**upstream, **_model_and_data(ctx)}
    elif spec.source == MEASURED:  # a search over the pruned model on the calibration windows
        fields_.update(method=p.method, structure=p.structure)
        upstream = _model_and_data(ctx)
    else:
        upstream = ctx.runner.upstream(f"scores/{rule_source(ctx, 'pruning', rule)}.json")
    return {"rule": rule, "pruning": fields_, "upstream": upstream}


def stage_ratios(ctx: RunContext, rule: str) -> list[str]:
    from layercap.programs.rules import DAMAGE_COLUMNS, DAMAGE_SOURCES, LINEAR_SOURCES, MEASURED, ratios_by_rule

    p = ctx.config.pruning
    spec = _pruning_spec(ctx, rule)
    blocks = read_json(ctx.path("model.json"))["blocks"]
    names, params = [b["name"] for b in blocks], [b["prunable"] for b in blocks]
    if spec.source in LINEAR_SOURCES:  # a ratio per Linear: the table's rows are the model's Linears
        from layercap.apply.prune.damage import prunable_units

        units = prunable_units(find_run_blocks(ctx, dense_model(ctx)[0]), "linear")  # read only: no copy
        names, params = [u.name for u in units], [u.params for u in units]
    if spec.source in DAMAGE_SOURCES + LINEAR_SOURCES:
        from layercap.programs.damage import load_for, ratios_from_damage

        table = load_for(ctx.path(f"damage/{spec.source}.json"), names, params)
        if spec.source == "context":  # the program in a trust region, its radius by calibration KL
            from layercap.apply.prune.search import KLFitness, trust_region_search

            model, _ = load_run_model(ctx, with_tokenizer=False)
            with KLFitness(model, load_calibration(ctx), p.method, batch_size=ctx.config.scoring.batch_size) as fit:
                ratios = trust_region_search(fit, table, p.sparsity, min_ratio=p.min_ratio, max_ratio=p.max_ratio, rule=rule)
            ratios.metadata = drop_timings(ratios.metadata)
        else:
            ratios = ratios_from_damage(table, p.sparsity, source=DAMAGE_COLUMNS[spec.source],
                                        min_ratio=p.min_ratio, max_ratio=p.max_ratio, rule=rule)
    elif spec.source == MEASURED:
        from layercap.apply.prune.search import KLFitness, atp_search, evolve_ratios
        from layercap.programs.records import PruningRatios

        model, _ = load_run_model(ctx, with_tokenizer=False)
        calib = load_calibration(ctx)
        if spec.rule == "atp":
            with KLFitness(model, calib, p.method, batch_size=ctx.config.scoring.batch_size) as fit:
                ratios = atp_search(fit, names, params, p.sparsity, min_ratio=p.min_ratio, max_ratio=p.max_ratio)
        else:
            ratios = evolve_ratios(model, calib, PruningRatios.uniform(names, params, p.sparsity), method=p.method,
                                   min_ratio=p.min_ratio, max_ratio=p.max_ratio, batch_size=ctx.config.scoring.batch_size)
        ratios.metadata = drop_timings(ratios.metadata)
    else:
        scores = _with_prunable_params(ctx, load_scores(ctx, rule_source(ctx, "pruning", rule)))
        ratios = ratios_by_rule(rule, scores, p.sparsity, mode=p.mode, eta=p.eta, min_ratio=p.min_ratio, max_ratio=p.max_ratio)
    rel = f"ratios/{rule_file(rule)}.json"
    ratios.save(ctx.path(rel))
    return [rel]


def damage_inputs(ctx: RunContext, kind: str) -> dict[str, Any]:
    p = ctx.config.pruning
    return {"kind": kind, "method": p.method, "structure": p.structure, "levels": p.damage_levels,
            "batch_size": ctx.config.scoring.batch_size, "upstream": _model_and_data(ctx),
            **({"sparsity": p.sparsity} if kind == "context" else {})}


def stage_damage(ctx: RunContext, kind: str) -> list[str]:
    """Damage curves of every block under ``pruning.method``: the KL measured when each block alone
    is pruned (``damage``), the free second-order (OBD, diagonal Fisher) estimate (``obd``), or the
    KL increase measured with every other block pruned uniformly at ``pruning.sparsity`` (``context``)."""
    from layercap.apply.prune.damage import damage_table

    p = ctx.config.pruning
    model, _ = load_run_model(ctx, with_tokenizer=False)
    rel = f"damage/{kind}.json"
    ctx.path("damage").mkdir(parents=True, exist_ok=True)
    context = None
    if kind == "context":
        blocks = read_json(ctx.path("model.json"))["blocks"]
        context = {b["name"]: float(p.sparsity) for b in blocks}
    table = damage_table(model, load_calibration(ctx), kind, p.damage_levels, p.method, structure=p.structure,
                         batch_size=ctx.config.scoring.batch_size, checkpoint=str(ctx.path(rel)) + ".partial",
                         model_id=ctx.config.model.spec, context=context)
    table.save(ctx.path(rel))
    return [rel]


def _with_prunable_params(ctx: RunContext, scores):
    blocks = {b["name"]: b["prunable"] for b in read_json(ctx.path("model.json"))["blocks"]}
    return prunable_scores(scores, blocks)


# ---- pruning ------------------------------------------------------------------------------------------
def prune_inputs(ctx: RunContext, rule: str) -> dict[str, Any]:
    p = ctx.config.pruning
    return {"rule": rule, "method": p.method, "structure": p.structure, "save": p.save_checkpoints, "format": p.save_format,
            "dtype": ctx.config.model.dtype, "upstream": {**_model_and_data(ctx), **ctx.runner.upstream(f"ratios/{rule_file(rule)}.json")}}


def _prune_in_memory(ctx: RunContext, rule: str):
    """Load the dense model, prune it at ``ratios/<rule>.json``; return (model, tokenizer, report dict)."""
    from layercap.apply.prune import prune_model
    from layercap.programs.records import PruningRatios

    p = ctx.config.pruning
    ratios = PruningRatios.load(ctx.path(f"ratios/{rule_file(rule)}.json"))
    model, tokenizer = load_run_model(ctx)
    calib = load_calibration(ctx)
    report = prune_model(model, ratios.ratios(), p.method, calib, p.structure, device=ctx.device,
                         batch_size=ctx.config.scoring.batch_size, progress=True,
                         blocks_regex=ctx.config.model.blocks, modules_regex=ctx.config.model.modules)
    report_doc = drop_timings(report.to_dict())
    return model, tokenizer, report_doc, ratios


def measured_sparsity(ctx: RunContext, model) -> list[dict[str, Any]]:
    """Fraction of exactly-zero weights in each block's Linear modules (checks the pruner did what it was told)."""
    from layercap.models import linear_weight

    out = []
    for b in find_run_blocks(ctx, model):
        zeros = sum(int((linear_weight(m) == 0).sum()) for m in b.linears.values())
        out.append({"name": b.name, "zeros": zeros, "prunable": int(b.num_prunable), "sparsity": zeros / max(1, b.num_prunable)})
    return out


def stage_prune(ctx: RunContext, rule: str) -> list[str]:
    from layercap.apply.prune import calibration_fidelity

    model, tokenizer, report_doc, ratios = _prune_in_memory(ctx, rule)
    # the pruned model's KL to the dense one on the calibration windows: how the report picks a rule
    # without evaluation data (the cached dense model is only read)
    fidelity = calibration_fidelity(dense_model(ctx)[0], model, load_calibration(ctx), batch_size=ctx.config.scoring.batch_size)
    layers = measured_sparsity(ctx, model)
    for layer, target in zip(layers, ratios.block_rho([l["name"] for l in layers])):  # per-Linear rules: weighted mean
        layer["target"] = float(target)
    total = sum(l["prunable"] for l in layers)
    outputs = []
    if ctx.config.pruning.save_checkpoints:
        with atomic_directory(ctx.path(f"pruned/{rule_file(rule)}")) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if ctx.config.pruning.save_format == "compressed-tensors":
                from layercap.export.compressed_tensors import compress_pruned

                compress_pruned(tmp, find_run_blocks(ctx, model), ratios.ratios(), ctx.config.pruning.structure)
        outputs.append(f"pruned/{rule_file(rule)}")
    atomic_write_json(ctx.path(f"pruned/{rule_file(rule)}.json"), {
        "schema": PRUNED_SCHEMA, "rule": rule, "method": ctx.config.pruning.method, "structure": ctx.config.pruning.structure,
        "checkpoint": f"pruned/{rule_file(rule)}" if ctx.config.pruning.save_checkpoints else None,
        "sparsity": sum(l["zeros"] for l in layers) / max(1, total), "layers": layers, "report": report_doc,
        "calibration": fidelity.to_dict(),
    })
    return outputs + [f"pruned/{rule_file(rule)}.json"]


# ---- evaluation ---------------------------------------------------------------------------------------
def eval_inputs(ctx: RunContext, variant: str) -> dict[str, Any]:
    e = ctx.config.evaluation
    files = {}
    for ppl in e.perplexity:
        files[ppl] = hash_output(_existing(ctx.config.data_path(ppl), "evaluation.perplexity"))
    for task in e.tasks:
        files[task] = hash_output(_existing(ctx.config.data_path(e.tasks_dir) / task, "evaluation.tasks"))
    if variant == "dense":
        upstream = ctx.runner.upstream(*(["model.json"] + (["model"] if is_tiny(ctx.config.model.spec) else [])))
    else:
        upstream = ctx.runner.upstream(f"pruned/{rule_file(variant)}.json",
                                *([f"pruned/{rule_file(variant)}"] if ctx.config.pruning.save_checkpoints else []),
                                *(["eval/dense.json"] if ctx.config.evaluation.dense else []))
    fields_ = {k: getattr(e, k) for k in ("ppl_tokens", "ppl_seqlen", "limit")} | {"bos": ctx.config.data.bos}
    return {"variant": variant, "evaluation": fields_, "dtype": ctx.config.model.dtype, "files": files, "upstream": upstream}


def _existing(path: Path, key: str) -> Path:
    if not path.exists():
        raise LayercapError(f"{key}: {path} does not exist; fix the path (relative paths are resolved against "
                            "data.root) or set LAYERCAP_SHARED_DATA.")
    return path


def stage_eval(ctx: RunContext, variant: str) -> list[str]:
    import torch

    from layercap.evaluate import EvalResult

    if variant == "dense":
        model, tokenizer = load_run_model(ctx)
    elif ctx.config.pruning.save_checkpoints:
        model, tokenizer = load_run_model(ctx, path=str(ctx.path(f"pruned/{rule_file(variant)}")))
    else:
        model, tokenizer, _, _ = _prune_in_memory(ctx, variant)
    # Pruned variants average accuracy over the tasks where the dense model beats chance.
    reference = None
    if variant != "dense" and ctx.path("eval/dense.json").is_file():
        reference = EvalResult.from_dict(read_json(ctx.path("eval/dense.json"))["result"])
    with torch.no_grad():  # evaluation needs no autograd graph (saves time and memory)
        result = _evaluate(ctx, model, tokenizer, variant, reference)
    doc = drop_timings(result.to_dict())
    rel = f"eval/{rule_file(variant)}.json"
    atomic_write_json(ctx.path(rel), {"schema": EVAL_SCHEMA, "variant": variant, **summarise_eval(doc), "result": doc})
    return [rel]


def _evaluate(ctx: RunContext, model, tokenizer, variant: str, reference):
    from layercap.evaluate import evaluate_model

    e = ctx.config.evaluation
    return evaluate_model(
        model, tokenizer,
        ppl=[str(ctx.config.data_path(p)) for p in e.perplexity],
        tasks=[str(ctx.config.data_path(e.tasks_dir) / t) for t in e.tasks],
        limit=e.limit, seqlen=e.ppl_seqlen, max_tokens=e.ppl_tokens, batch_size=e.batch_size,
        device=None if ctx.device == "cpu" else ctx.device, reference=reference, model_name=variant, progress=True,
        bos=ctx.config.data.bos,
    )


def summarise_eval(doc: dict[str, Any]) -> dict[str, Any]:
    """The report's view of an EvalResult dict (``layercap.eval/v1``): ``{"perplexity": {corpus: ppl},
    "accuracy": {task: acc}, "items": {task: n}, "chance": {task: p}, "mean_accuracy",
    "mean_accuracy_above_chance", "above_chance": [task]}`` (accuracies in [0, 1])."""
    tasks = doc.get("tasks") or {}
    return {
        "perplexity": {k: float(v["ppl"]) for k, v in (doc.get("ppl") or {}).items()},
        "accuracy": {k: float(v["acc"]) for k, v in tasks.items()},
        "items": {k: int(v["n"]) for k, v in tasks.items()},
        "chance": {k: float(v["chance"]) for k, v in tasks.items()},
        "mean_accuracy": doc.get("mean_acc"),
        "mean_accuracy_above_chance": doc.get("mean_acc_above_chance"),
        "above_chance": list(doc.get("above_chance") or []),
    }


# ---- report -------------------------------------------------------------------------------------------
def report_inputs(ctx: RunContext) -> dict[str, Any]:
    """Every finished stage's record (artefact hashes and timings) plus the report settings."""
    records = {name: rec.to_dict() for name, rec in ctx.runner.manifest.stages.items() if name != "report"}
    return {"report": {"title": ctx.config.report.title, "html": ctx.config.report.html}, "stages": records,
            "config": ctx.config.to_dict(), "versions": _versions()}


def stage_report(ctx: RunContext) -> list[str]:
    from layercap.report.build import write_report

    return write_report(ctx.run_dir, title=ctx.config.report.title, html=ctx.config.report.html, versions=_versions())


# ---- preflight -----------------------------------------------------------------------------------------
def preflight(config: PipelineConfig) -> None:
    """Check that the model and every data path exist before anything is written (LayercapError otherwise)."""
    spec = config.model.spec
    if is_tiny(spec):
        from layercap.models.tiny import FAMILIES

        if spec[len("tiny-"):] not in FAMILIES:
            raise LayercapError(f"model.spec = {spec!r}: unknown tiny family; choose one of: "
                                + ", ".join(f"tiny-{f}" for f in FAMILIES) + ".")
    else:
        from layercap.models import resolve_model

        resolve_model(spec)
    where = (f"(data.root = {config.data.root!r}, resolved against {Path.cwd()}). Run from the repository root so that "
             "../shared/data is found, set LAYERCAP_SHARED_DATA to the data folder, or fix the path with --set.")
    paths = [("data.calibration", config.data.calibration)]
    paths += [("evaluation.perplexity", p) for p in config.evaluation.perplexity]
    paths += [("evaluation.tasks", str(Path(config.evaluation.tasks_dir) / t)) for t in config.evaluation.tasks]
    for key, rel in paths:
        path = config.data_path(rel)
        if not path.exists():
            raise LayercapError(f"{key}: {path} does not exist {where}")


# ---- the plan -----------------------------------------------------------------------------------------
def plan(config: PipelineConfig) -> list[Stage]:
    """The stages of a run, in execution order (each depends only on stages before it)."""
    stages = [Stage("model", model_inputs, stage_model), Stage("data", data_inputs, stage_data)]
    for method in config.scoring.methods:
        stages.append(Stage(f"score:{method}", _bind(score_inputs, method), _bind(stage_score, method)))
    from layercap.programs.rules import UTILITY_RULES

    if any(rule in UTILITY_RULES for rule in config.allocation.rules):
        stages.append(Stage("utility", utility_inputs, stage_utility))
    for rule in config.allocation.rules:
        stages.append(Stage(f"allocation:{rule}", _bind(allocation_inputs, rule), _bind(stage_allocation, rule)))
    for kind in damage_kinds(config):
        stages.append(Stage(f"damage:{kind}", _bind(damage_inputs, kind), _bind(stage_damage, kind)))
    for rule in config.pruning.rules:
        stages.append(Stage(f"ratios:{rule}", _bind(ratios_inputs, rule), _bind(stage_ratios, rule)))
    for rule in config.pruning.apply:
        stages.append(Stage(f"prune:{rule}", _bind(prune_inputs, rule), _bind(stage_prune, rule)))
    for variant in eval_variants(config):
        stages.append(Stage(f"eval:{variant}", _bind(eval_inputs, variant), _bind(stage_eval, variant)))
    stages.append(Stage("report", report_inputs, stage_report))
    return stages


def damage_kinds(config: PipelineConfig) -> list[str]:
    """The damage tables the pruning rules read (``mdl:damage`` -> damage, ``mdl:obd`` -> obd)."""
    from layercap.programs.rules import DAMAGE_SOURCES, LINEAR_SOURCES

    return [k for k in DAMAGE_SOURCES + LINEAR_SOURCES if f"mdl:{k}" in config.pruning.rules]


def eval_variants(config: PipelineConfig) -> list[str]:
    return (["dense"] if config.evaluation.dense else []) + list(config.pruning.apply)


def _bind(fn, arg):
    return lambda ctx: fn(ctx, arg)
