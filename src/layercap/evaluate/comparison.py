"""Pruning comparison: ratio rules x pruners x sparsities on one model (the paper's Tables 1-2).

Every cell (rule, pruner, sparsity) prunes a fresh copy of the dense model on the *same*
calibration windows, then evaluates perplexity and zero-shot accuracy; the dense model is
evaluated once as the reference (it also decides which tasks are "above chance", see
``layercap.evaluate``). Layer scores are computed once per score source on the dense model and
cached in ``OUTDIR/scores/<source>.json``; each finished cell is saved atomically to
``OUTDIR/cells/<cell>.json`` and skipped when the run is repeated (resumable). ``OUTDIR/run.json``
records the settings that every cell shares; rerunning with different settings into the same
OUTDIR is an error (cells could not be compared).

Rules (``RULE[:SOURCE]``; the default score source in brackets):
``uniform`` (none), ``owl`` [owl], ``alphapruning`` [alpha-hill], ``layerif`` [influence],
``mdl`` [kfac] -- ``mdl:diag``, ``mdl:kfac``, ``mdl:ekfac``, ``mdl:gradnorm`` ... choose the
estimator of zeta^2. Every rule's ratios are weighted by each block's *prunable* weights and meet
the target sparsity exactly within the same box [min_ratio, max_ratio].
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from layercap.errors import LayercapError
from layercap.evaluate import EvalResult, evaluate_model
from layercap.io import atomic_write_csv, atomic_write_json, atomic_write_text, sha256_json
from layercap.programs.rules import PRUNING_RULES, RULE_SOURCES

SCHEMA = "layercap.comparison/v1"
CELL_SCHEMA = "layercap.comparison_cell/v1"
# rule -> the score source it reads by default: baselines their own (programs.rules), mdl K-FAC zeta^2
DEFAULT_SOURCE = {rule: None if rule == "uniform" else RULE_SOURCES.get(rule, "kfac") for rule in PRUNING_RULES}
PRUNERS = ("wanda", "sparsegpt", "magnitude")


@dataclass(frozen=True)
class RuleSpec:
    """A ratio rule and the score source it reads (None for uniform)."""

    rule: str
    source: str | None

    @property
    def label(self) -> str:
        if self.rule == "mdl" or (self.source and self.source != DEFAULT_SOURCE.get(self.rule)):
            return f"{self.rule}:{self.source}"
        return self.rule


def parse_rule(spec: str) -> RuleSpec:
    """``RULE[:SOURCE]`` -> RuleSpec, checked against the known rules and score methods."""
    from layercap.scores import available_methods

    rule, _, source = spec.partition(":")
    rule = rule.strip().lower()
    if rule not in DEFAULT_SOURCE:
        raise LayercapError(f"rule {spec!r} is unknown; use one of {', '.join(DEFAULT_SOURCE)} (mdl as mdl:SOURCE, e.g. mdl:kfac).")
    if rule == "uniform":
        if source:
            raise LayercapError(f"rule {spec!r}: uniform reads no scores; write just 'uniform'.")
        return RuleSpec("uniform", None)
    source = source.strip() or DEFAULT_SOURCE[rule]
    methods = available_methods()
    if source not in methods:
        raise LayercapError(f"rule {spec!r}: score source {source!r} is not available; choose one of {', '.join(methods)}.")
    return RuleSpec(rule, source)


def cell_id(rule: RuleSpec, method: str, sparsity: float) -> str:
    """File-name-safe id of a cell, e.g. ``mdl-kfac_wanda_s0.50``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{rule.label}_{method}_s{sparsity:.2f}")


@dataclass
class CellResult:
    """One (rule, pruner, sparsity) cell: the per-block ratios applied, the achieved sparsity
    of the pruned Linear weights, the evaluation, and wall times (s)."""

    rule: str
    source: str | None
    method: str
    sparsity: float
    achieved: float
    ratios: dict[str, float]
    eval: EvalResult
    prune_seconds: float = 0.0
    eval_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return RuleSpec(self.rule, self.source).label

    def to_dict(self) -> dict:
        return {
            "schema": CELL_SCHEMA,
            "rule": self.rule,
            "source": self.source,
            "method": self.method,
            "sparsity": self.sparsity,
            "achieved": self.achieved,
            "ratios": dict(self.ratios),
            "eval": self.eval.to_dict(),
            "prune_seconds": self.prune_seconds,
            "eval_seconds": self.eval_seconds,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CellResult":
        if d.get("schema") != CELL_SCHEMA:
            raise LayercapError(f"not a comparison cell (schema {d.get('schema')!r}).")
        return cls(
            d["rule"], d.get("source"), d["method"], float(d["sparsity"]), float(d["achieved"]),
            {k: float(v) for k, v in d["ratios"].items()}, EvalResult.from_dict(d["eval"]),
            float(d.get("prune_seconds", 0.0)), float(d.get("eval_seconds", 0.0)), list(d.get("warnings", [])),
        )


@dataclass
class Comparison:
    """The whole table: shared ``settings``, the ``dense`` reference and the ``cells``."""

    settings: dict
    dense: EvalResult
    cells: list[CellResult]

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "settings": dict(self.settings),
            "dense": self.dense.to_dict(),
            "cells": [c.to_dict() for c in self.cells],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Comparison":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not a comparison (schema {d.get('schema')!r}, expected {SCHEMA!r}).")
        return cls(dict(d["settings"]), EvalResult.from_dict(d["dense"]), [CellResult.from_dict(c) for c in d["cells"]])

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Comparison":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise LayercapError(f"cannot read comparison {path}: {exc}.") from exc

    # ---- tables -----------------------------------------------------------------------------
    def columns(self) -> tuple[list[str], list[str]]:
        return list(self.dense.ppl), list(self.dense.tasks)

    def rows(self) -> list[dict]:
        """One flat row per model (dense first): ppl per text, acc per task, the means."""
        ppl_keys, task_keys = self.columns()

        def row(label, method, sparsity, achieved, ev: EvalResult) -> dict:
            r = {"rule": label, "method": method, "sparsity": sparsity, "achieved": achieved}
            r.update({f"ppl:{k}": ev.ppl[k].ppl if k in ev.ppl else None for k in ppl_keys})
            r.update({f"acc:{k}": ev.tasks[k].acc if k in ev.tasks else None for k in task_keys})
            r["mean_acc"] = ev.mean_acc
            r["mean_acc_above_chance"] = ev.mean_acc_above_chance
            return r

        out = [row("dense", "-", 0.0, 0.0, self.dense)]
        out += [row(c.label, c.method, c.sparsity, c.achieved, c.eval) for c in self.cells]
        return out

    def write_csv(self, path: str | Path) -> Path:
        rows = self.rows()
        header = list(rows[0])
        return atomic_write_csv(path, header, [[r[h] for h in header] for r in rows])

    def markdown(self) -> str:
        """Markdown table per (pruner, sparsity) block of rows; best value per block in bold."""
        ppl_keys, task_keys = self.columns()
        above = self.dense.above_chance
        head = ["rule", "pruner", "sparsity"] + [f"ppl {k}" for k in ppl_keys] + [f"{k} acc" for k in task_keys]
        head += [f"mean acc (above chance: {', '.join(above) or 'none'})", "mean acc (all)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def fmt(v, digits):
            return "n/a" if v is None else f"{v:.{digits}f}"

        d = self.dense
        lines.append(
            "| " + " | ".join(["dense", "-", "0"] + [fmt(d.ppl[k].ppl, 2) for k in ppl_keys] + [fmt(d.tasks[k].acc, 3) for k in task_keys]
                              + [fmt(d.mean_acc_above_chance, 4), fmt(d.mean_acc, 4)]) + " |"
        )
        groups: dict[tuple[str, float], list[CellResult]] = {}
        for c in self.cells:
            groups.setdefault((c.method, c.sparsity), []).append(c)
        for (method, s), cells in groups.items():
            best_ppl = {k: min((c.eval.ppl[k].ppl for c in cells if k in c.eval.ppl), default=None) for k in ppl_keys}
            accs = [c.eval.mean_acc_above_chance for c in cells if c.eval.mean_acc_above_chance is not None]
            best_acc = max(accs) if accs else None
            for c in cells:
                vals = []
                for k in ppl_keys:
                    v = c.eval.ppl[k].ppl if k in c.eval.ppl else None
                    vals.append(f"**{fmt(v, 2)}**" if v is not None and v == best_ppl[k] and len(cells) > 1 else fmt(v, 2))
                vals += [fmt(c.eval.tasks[k].acc if k in c.eval.tasks else None, 3) for k in task_keys]
                m = c.eval.mean_acc_above_chance
                vals.append(f"**{fmt(m, 4)}**" if m is not None and m == best_acc and len(cells) > 1 else fmt(m, 4))
                vals.append(fmt(c.eval.mean_acc, 4))
                lines.append("| " + " | ".join([c.label, method, f"{s:g}"] + vals) + " |")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# running


def _prunable_scores(scores, blocks):
    """The same scores with ``params`` = prunable Linear weights per block (the N_k of SPEC 3)."""
    from layercap.scorefile import LayerScore, LayerScores

    n = {b.name: b.num_prunable for b in blocks}
    missing = [name for name in scores.names if name not in n]
    if missing:
        raise LayercapError(f"scores name blocks the model does not have (e.g. {missing[0]}); rescore with block granularity.")
    layers = [LayerScore(l.name, l.zeta2, int(n[l.name])) for l in scores.layers]
    return LayerScores(layers, scores.method, dict(scores.metadata))


def _scores(model, source: str, calib, validation, outdir: Path, batch_size: int, seed: int, progress: bool):
    """Layer scores of the dense model by ``source``, cached in OUTDIR/scores/<source>.json."""
    from layercap.scorefile import LayerScores
    from layercap.scores import ScoreOptions, score_model

    path = outdir / "scores" / f"{source}.json"
    if path.is_file():
        return LayerScores.load(path)
    extra = {"validation": validation} if source == "influence" else {}
    options = ScoreOptions(batch_size=batch_size, seed=seed, progress=progress, extra=extra)
    scores = score_model(model, source, calib, options=options)
    path.parent.mkdir(parents=True, exist_ok=True)
    scores.save(path)
    return scores


def write_outputs(result: Comparison, outdir: str | Path) -> None:
    """comparison.json, .csv, .md and .png in ``outdir``."""
    from layercap.report.compare_plot import plot_comparison

    outdir = Path(outdir)
    result.save(outdir / "comparison.json")
    result.write_csv(outdir / "comparison.csv")
    atomic_write_text(outdir / "comparison.md", result.markdown())
    plot_comparison(result, outdir / "comparison.png")


def collect(outdir: str | Path) -> Comparison:
    """The comparison of every finished cell in ``outdir`` (no model work), ordered by sparsity,
    pruner, then rule (uniform, owl, alphapruning, layerif, mdl); reports a run stopped early."""
    outdir = Path(outdir)
    run_file, dense_file = outdir / "run.json", outdir / "cells" / "dense.json"
    if not run_file.is_file() or not dense_file.is_file():
        raise LayercapError(f"{outdir} holds no comparison run (run.json and cells/dense.json missing); run compare-pruning first.")
    cells = [CellResult.from_dict(json.loads(f.read_text())) for f in sorted((outdir / "cells").glob("*.json")) if f.name != "dense.json"]
    pruner_order = {m: i for i, m in enumerate(PRUNERS)}
    cells.sort(key=lambda c: (c.sparsity, pruner_order.get(c.method, 99), _RULE_ORDER.get(c.rule, 99), c.label))
    return Comparison(json.loads(run_file.read_text())["settings"], EvalResult.load(dense_file), cells)


_RULE_ORDER = {"uniform": 0, "owl": 1, "alphapruning": 2, "layerif": 3, "mdl": 4}


def run_comparison(
    model_spec: str,
    rules: list[str],
    methods: list[str],
    sparsities: list[float],
    outdir: str | Path,
    *,
    data: str | Path,
    nsamples: int = 128,
    seqlen: int = 512,
    ppl: list[str | Path] = (),
    tasks: list[str | Path] = (),
    limit: int | None = None,
    eval_seqlen: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 8,
    min_ratio: float = 0.0,
    max_ratio: float = 0.9,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    log=print,
) -> Comparison:
    """Run (or resume) every cell; write OUTDIR/comparison.{json,csv,md,png}; return the table."""
    from tqdm.auto import tqdm

    from layercap.apply.prune import prune_model
    from layercap.data.calibration import calibration_set
    from layercap.data.tasks import load_task
    from layercap.models import find_blocks, load_model
    from layercap.programs.rules import ratios_by_rule

    specs = [parse_rule(r) for r in rules]
    if len({s.label for s in specs}) != len(specs):
        raise LayercapError(f"--rules lists a rule twice: {rules}.")
    for m in methods:
        if m not in PRUNERS:
            raise LayercapError(f"pruner {m!r} is unknown; use {', '.join(PRUNERS)}.")
    for s in sparsities:
        if not (min_ratio <= s <= max_ratio and 0.0 < s < 1.0):
            raise LayercapError(f"--sparsity {s} must lie in (0, 1) and in [--min-ratio {min_ratio}, --max-ratio {max_ratio}].")
    if not ppl and not tasks:
        raise LayercapError("nothing to compare on: pass --ppl TEXT and/or --tasks PATH.")
    if not Path(data).exists():
        raise LayercapError(f"--data {str(data)!r} does not exist; pass calibration text (file or directory).")
    for p in ppl:
        if not Path(p).is_file():
            raise LayercapError(f"--ppl {str(p)!r} is not a file.")
    task_hashes = [load_task(t, limit=limit, seed=seed).sha256 for t in tasks]  # parse errors before any work
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise LayercapError(f"-o {outdir} is a file; pass a directory.")

    model, tokenizer = load_model(model_spec, dtype=dtype, device=device)
    calib = calibration_set(tokenizer, data, nsamples=nsamples, seqlen=seqlen, seed=seed)
    settings = {
        "model": str(model_spec), "dtype": dtype, "data": str(data), "calibration_sha256": calib.sha256,
        "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "ppl": [str(p) for p in ppl],
        "tasks": [str(t) for t in tasks], "task_sha256": task_hashes, "limit": limit, "eval_seqlen": eval_seqlen,
        "max_tokens": max_tokens, "min_ratio": min_ratio, "max_ratio": max_ratio,
    }
    run_file = outdir / "run.json"
    if run_file.is_file():
        old = json.loads(run_file.read_text())
        if old.get("settings_sha256") != sha256_json(settings):
            diff = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
            raise LayercapError(f"{outdir} holds a comparison with other settings ({', '.join(diff)}); use a new -o OUTDIR.")
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, {"settings": settings, "settings_sha256": sha256_json(settings)})

    eval_kw = dict(ppl=ppl, tasks=tasks, limit=limit, seqlen=eval_seqlen, max_tokens=max_tokens, batch_size=batch_size, seed=seed, progress=progress)
    dense_file = outdir / "cells" / "dense.json"
    if dense_file.is_file():
        dense = EvalResult.load(dense_file)
    else:
        dense = evaluate_model(model, tokenizer, model_name=f"{model_spec} (dense)", **eval_kw)
        dense_file.parent.mkdir(parents=True, exist_ok=True)
        dense.save(dense_file)
    log(dense.table())

    blocks = find_blocks(model)
    validation = None
    if any(s.source == "influence" for s in specs):
        # LayerIF scores influence on held-out data: other windows of the same text
        validation = calibration_set(tokenizer, data, nsamples=max(2, nsamples // 2), seqlen=seqlen, seed=seed + 1)
    scores = {}
    for s in specs:
        if s.source and s.source not in scores:
            t0 = time.perf_counter()
            scores[s.source] = _prunable_scores(_scores(model, s.source, calib, validation, outdir, batch_size, seed, progress), blocks)
            log(f"scores {s.source}: {time.perf_counter() - t0:.1f} s")

    todo = [(s, m, sp) for sp in sparsities for m in methods for s in specs]
    cells: list[CellResult] = []
    bar = tqdm(todo, desc="cells", unit="cell", disable=not progress)
    for spec, method, sparsity in bar:
        path = outdir / "cells" / f"{cell_id(spec, method, sparsity)}.json"
        if path.is_file():
            cells.append(CellResult.from_dict(json.loads(path.read_text())))
            continue
        bar.set_postfix_str(cell_id(spec, method, sparsity))
        if spec.source is None:
            from layercap.programs.records import PruningRatios

            ratios = PruningRatios.uniform([b.name for b in blocks], [b.num_prunable for b in blocks], sparsity)
        else:
            ratios = ratios_by_rule(spec.rule, scores[spec.source], sparsity, min_ratio=min_ratio, max_ratio=max_ratio)
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = prune_model(pruned, ratios.ratios(), method=method, calib=calib, batch_size=batch_size, progress=False)
        t1 = time.perf_counter()
        ev = evaluate_model(pruned, tokenizer, model_name=f"{model_spec} {spec.label} {method} {sparsity:g}", reference=dense, **eval_kw)
        cell = CellResult(spec.rule, spec.source, method, float(sparsity), float(report.achieved), ratios.ratios(), ev,
                          t1 - t0, time.perf_counter() - t1, list(getattr(ratios, "warnings", []) or []))
        atomic_write_json(path, cell.to_dict())
        cells.append(cell)
        del pruned
        log(f"{cell_id(spec, method, sparsity)}: ppl {', '.join(f'{v.ppl:.2f}' for v in ev.ppl.values())}; "
            f"mean acc above chance {ev.mean_acc_above_chance}; prune {t1 - t0:.0f} s, eval {cell.eval_seconds:.0f} s")

    result = Comparison(settings, dense, cells)
    write_outputs(result, outdir)
    return result
