"""Science check: do the layer gains zeta_k^2 predict the loss actually removed by training block k?

SPEC section 1 claims zeta_k^2 / 2 is the loss reduction (nats/token, second order) reachable by
updating block k alone. For every block k this script measures two ground truths:

(a) Newton: the damped Newton step d_k = -(C_k + lambda_k I)^{-1} g_k of each curvature method
    (gradnorm: d = -g; diag; kfac, ekfac: in the Kronecker eigenbasis, non-Linear parameters
    diagonal; exact: the conjugate-gradient solution), from the library
    (``layercap.scores.trust_region.newton_steps``: the same curvature pieces as the scores, with
    the same damping rule), applied to block k alone. The true change of the mean token NLL is measured
    on the statistics windows (where zeta^2 / 2 is the prediction) and on held-out windows, for
    the full step (t = 1) and with a line search: the step is scaled by t in ``--scales``, the t
    with the largest reduction on the statistics windows is kept ("newton_ls"), and the held-out
    reduction is measured at that t. At scale t the quadratic model predicts a decrease of
    zeta^2 * t * (1 - t / 2).
(b) Optimiser: a fixed budget of ``--steps`` full-batch Adam steps (same lr for every block) on
    block k only, starting from the pretrained weights; loss reduction on the statistics windows
    and on held-out windows.

Method names take an optional Fisher flavour, ``diag:true`` or ``kfac:empirical`` (labels sampled
from the model or observed); without one, ``--fisher`` applies (default empirical, as ``layercap
score``). A suffix ``@RHO`` sets that method's relative damping (``kfac:true@10``; default
``--damping``), so one record can hold a damping sweep. It then reports the Spearman rank
correlation between each method's zeta_k^2 (gradnorm, diag, kfac, ekfac, exact), the calibrated
variants (diag-tr, kfac-tr, ekfac-tr, exact-tr: zeta^2 at the per-block trust-region lambda) and
the measured gains (gain = gain-kfac, gain-diag, ...: twice the line-searched decrease of the
accepted step), the measured ``utility`` (twice the loss reduction of ``--utility-steps`` Adam steps of a
LoRA of ``--utility-units`` units on block k alone, adapted on half the statistics windows and
measured on the other half), and each ground truth, and, for context, the baseline score sources
(alpha-hill, owl, influence) against the same ground truths. Statistics windows and held-out
windows come from disjoint halves of the corpus.

Usage (one process; GPU auto-detected with torch.cuda.is_available()):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/validate_gains.py \
        --model smollm2 --data ../shared/data/corpora/wikitext-2-raw/wiki.test.raw \
        --nsamples 8 --seqlen 128 --out benchmarks/results/validate_gains.json

Cost: scoring passes, 2 * K * (#Newton methods) forward passes and K * (steps fwd+bwd + 2 fwd) for
the optimiser budget. On a shared 2-core CPU that is hours for SmolLM2 at 8 x 128 tokens, so the
parts can run as parallel processes with the same settings (``--methods ""`` / ``--newton ""``
select the parts; each saves ``<out>.partial.json`` after every finished unit) and be combined
with ``--resume --merge A.partial.json B.partial.json --no-compute``. ``--resume`` alone restarts
an interrupted run where it stopped.

A ``gain-<base>`` score runs the ``<base>-tr`` search itself, so when both are asked for the
``-tr`` scores are taken from the gain's record (the same trust region, not run twice). The
calibrated methods' per-block r, lambdas and decreases are kept in ``score_info``.

The result record (schema ``layercap.validate_gains/v1``) holds every per-block number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from layercap.data.calibration import CalibrationSet, read_text, tokenize_text
from layercap.errors import LayercapError
from layercap.io import atomic_write_json, sha256_bytes
from layercap.scores.registry import FISHER_KINDS

SCHEMA = "layercap.validate_gains/v1"
# calibrated gains (scores/trust_region.py): zeta^2 at the trust-region lambda, and the measured gain
CALIBRATED = ("diag-tr", "kfac-tr", "ekfac-tr", "exact-tr", "gain", "gain-diag", "gain-kfac", "gain-ekfac", "gain-exact")
CURVATURE_METHODS = ("gradnorm", "diag", "kfac", "ekfac", "exact") + CALIBRATED
BASELINES = ("alpha-hill", "owl", "influence")
# the measured utility (layercap.apply.utility): the loss reduction of a short LoRA adaptation of
# block k alone at --utility-units units, adapted on half the statistics windows and measured on
# the other half (no held-out token is read)
MEASURED = ("utility",)
STEP_METHODS = ("gradnorm", "diag", "kfac", "ekfac", "exact")
# methods whose curvature depends on the Fisher flavour
FISHER_AWARE = ("diag", "kfac", "ekfac", "diag-tr", "kfac-tr", "ekfac-tr", "gain", "gain-diag", "gain-kfac", "gain-ekfac")
EXACT_LIKE = ("exact", "exact-tr", "gain-exact")  # scored on the (optional) exact subset of the windows
# per-block trust-region fields kept from the scores' method_info
TR_FIELDS = ("initial_lambda", "damping_lambda", "tr_ratio", "tr_accepted", "tr_evals", "predicted_decrease",
             "measured_decrease", "gain_scale", "gain_decrease", "base_loss", "forward_passes")
DEFAULT_SCALES = (1.0, 0.25, 0.0625, 0.015625, 0.00390625, 0.0009765625)


def tr_of_gain(spec: str) -> str | None:
    """'gain:true@10' -> 'kfac-tr:true@10', 'gain-diag' -> 'diag-tr'; None for other methods."""
    cut = min((i for i in (spec.find(":"), spec.find("@")) if i >= 0), default=len(spec))
    head, tail = spec[:cut], spec[cut:]
    head = "gain-kfac" if head == "gain" else head
    return f"{head[5:]}-tr{tail}" if head.startswith("gain-") else None


def parse_spec(spec: str, default_fisher: str, default_damping: float | None = None) -> tuple[str, str, float | None]:
    """'kfac:true@10' -> ('kfac', 'true', 10.0); 'diag' -> ('diag', default_fisher, default_damping)."""
    head, at, rho = spec.partition("@")
    base, _, fisher = head.partition(":")
    if fisher and base not in FISHER_AWARE:
        raise LayercapError(f"{spec!r}: only {', '.join(FISHER_AWARE)} take a Fisher flavour.")
    if fisher and fisher not in FISHER_KINDS:
        raise LayercapError(f"{spec!r}: the Fisher flavour is one of {', '.join(FISHER_KINDS)}.")
    damping = default_damping
    if at:
        try:
            damping = float(rho)
        except ValueError:
            raise LayercapError(f"{spec!r}: the damping after '@' must be a number (relative rho).") from None
        if not damping > 0:
            raise LayercapError(f"{spec!r}: the damping after '@' must be > 0.")
    return base, fisher or default_fisher, damping


# ---- data ---------------------------------------------------------------------------------------
def disjoint_windows(tokenizer, path: str, nsamples: int, seqlen: int, seed: int) -> tuple[CalibrationSet, CalibrationSet]:
    """(statistics, held-out): ``nsamples`` random windows each from the first / second half of the text."""
    tokens = tokenize_text(tokenizer, read_text(path))
    half = tokens.numel() // 2
    if half < seqlen + 1:
        raise LayercapError(f"{path} has {tokens.numel()} tokens; need 2 * (seqlen + 1) = {2 * (seqlen + 1)}.")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for part in (tokens[:half], tokens[half:]):
        starts = torch.randint(0, part.numel() - seqlen, (nsamples,), generator=gen)
        ids = torch.stack([part[s : s + seqlen] for s in starts.tolist()])
        out.append(CalibrationSet(ids, sha256_bytes(ids.numpy().tobytes()), str(path), seed))
    return out[0], out[1]


def mean_nll(model, calib: CalibrationSet, batch_size: int, device) -> float:
    """Mean next-token NLL over all predicted tokens (nats/token)."""
    from layercap.scores.engine import local_windows
    from layercap.scores.trust_region import mean_loss

    return mean_loss(model, local_windows(calib), batch_size, device)


# ---- Newton steps from the library (scores/trust_region.py: newton_steps) -----------------------------
def newton_step(model, groups, calib, options, kind: str) -> dict[str, Any]:
    """The damped Newton step of method ``kind`` (gradnorm, diag, kfac, ekfac, exact) for every
    group: {"steps": [{param_name: step tensor} per group], "zeta2": (K,) g^T (-d)}, the same
    pieces as the engine's scores. ``options.fisher`` sets the Fisher flavour."""
    from layercap.scores.trust_region import newton_steps

    steps, zeta2, info = newton_steps(model, groups, calib, options, kind)
    rec = {"steps": steps, "zeta2": zeta2}
    if kind == "exact":
        rec["info"] = {"cg_solves": info["cg_solves"], **({"trace_estimate": info["trace_estimate"]} if "trace_estimate" in info else {})}
    return rec


def measure_step(model, group, step: dict[str, torch.Tensor], datasets, batch_size, device, scale: float = 1.0) -> list[float]:
    """Apply ``scale * step`` to the group's parameters, measure the mean NLL on each dataset, restore."""
    from layercap.scores.trust_region import stepped

    with stepped(group, step, scale):
        return [mean_nll(model, d, batch_size, device) for d in datasets]


def line_search(model, group, step, stats_set, heldout, base: list[float], scales, batch_size, device) -> dict[str, float]:
    """Reductions (nats/token) of the step at t = 1 on both sets, the best t in ``scales`` on the
    statistics windows, and the held-out reduction at that t."""
    full = measure_step(model, group, step, [stats_set, heldout], batch_size, device)
    best_t, best = 1.0, base[0] - full[0]
    for t in scales:
        if t == 1.0:
            continue
        red = base[0] - measure_step(model, group, step, [stats_set], batch_size, device, scale=t)[0]
        if red > best:
            best_t, best = t, red
    held = full[1] if best_t == 1.0 else measure_step(model, group, step, [heldout], batch_size, device, scale=best_t)[0]
    return {"stats": base[0] - full[0], "heldout": base[1] - full[1], "ls_stats": best, "ls_heldout": base[1] - held,
            "ls_scale": best_t}


def optimiser_reduction(model, group, calib, datasets, steps: int, lr: float, optimiser: str, batch_size: int, device) -> list[float]:
    """Train the group alone for ``steps`` full-batch steps; loss on each dataset after; restore."""
    from layercap.scores.engine import logits_of, summed_nll

    params = [p for _, p in group.params]
    saved = [p.detach().clone() for p in params]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr) if optimiser == "adam" else torch.optim.SGD(params, lr=lr)
    n_tok = calib.input_ids.shape[0] * (calib.input_ids.shape[1] - 1)
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            for ids in calib.batches(batch_size):
                ids = ids.to(device)
                (summed_nll(logits_of(model, ids), ids) / n_tok).backward()
            opt.step()
        return [mean_nll(model, d, batch_size, device) for d in datasets]
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)


# ---- result record -------------------------------------------------------------------------------
@dataclass
class GainsValidation:
    """Per-block scores and measured loss reductions (nats/token), plus Spearman correlations."""

    model: str
    groups: list[str]
    base_loss: dict[str, float]  # {"stats", "heldout"}
    scores: dict[str, list[float]]  # method -> (K,) zeta2 (or baseline score)
    # method -> {"stats", "heldout": (K,) loss reduction of its full step; "ls_stats", "ls_heldout",
    # "ls_scale": line-searched reduction and the chosen t; "zeta2_of_step": g^T(-d)}
    newton: dict[str, dict[str, list[float]]]
    optimiser: dict[str, list[float]] | None  # {"stats", "heldout"} (K,) loss reduction after the step budget
    spearman: dict[str, dict[str, float]]  # method -> {truth: rho}
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time_s: dict[str, float] = field(default_factory=dict)
    schema: str = SCHEMA
    # calibrated methods -> their per-block trust-region record (TR_FIELDS: r, lambdas, decreases)
    score_info: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GainsValidation":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not a {SCHEMA} record (schema={d.get('schema')!r}).")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def save(self, path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "GainsValidation":
        return cls.from_dict(json.loads(Path(path).read_text()))


def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def correlations(scores: dict[str, list[float]], newton, optimiser) -> dict[str, dict[str, float]]:
    out = {}
    for m, z in scores.items():
        row = {} if optimiser is None else {f"optim_{split}": spearman(z, optimiser[split]) for split in ("stats", "heldout")}
        for nm, red in newton.items():
            for split in ("stats", "heldout"):  # (red also holds "zeta2_of_step")
                row[f"newton[{nm}]_{split}"] = spearman(z, red[split])
            for split in ("stats", "heldout"):
                if f"ls_{split}" in red:
                    row[f"newton_ls[{nm}]_{split}"] = spearman(z, red[f"ls_{split}"])
        out[m] = row
    return out


# ---- driver --------------------------------------------------------------------------------------------
def load(spec: str, device):
    if spec.startswith("tiny-"):
        from layercap.models.tiny import build_tiny

        model, tok = build_tiny(spec[5:])
    else:
        from layercap.models import load_model

        model, tok = load_model(spec, dtype="float32", device=str(device))
    return model.to(device), tok


OPTIM_KEYS = ("steps", "lr", "optimiser")
TR_KEYS = ("tr_max_evals", "tr_factor")  # added with the calibrated methods; older records have none


def _data_key(key: dict) -> dict:
    """What scores and Newton reductions depend on (everything but the optimiser budget)."""
    return {k: v for k, v in key.items() if k not in OPTIM_KEYS}


def same_data(a: dict, b: dict) -> bool:
    """Whether two records' units can be combined: the same data key, where the trust-region
    settings count only when both records have them (older records hold no calibrated scores)."""
    a, b = _data_key(a), _data_key(b)
    for k in TR_KEYS:
        if k not in a or k not in b:
            a.pop(k, None)
            b.pop(k, None)
    return a == b


def _optim_key(key: dict) -> dict:
    return {k: key.get(k) for k in OPTIM_KEYS}


class Progress:
    """Finished units of work (scores per method, Newton reductions per method, optimiser), saved
    atomically after each unit to ``<out>.partial.json`` so that ``--resume`` skips them. A cache
    made with other data or settings is ignored."""

    def __init__(self, path: Path, key: dict, resume: bool):
        self.path, self.key = path, key
        self.state: dict[str, Any] = {"key": key, "scores": {}, "newton": {}, "optimiser": None, "wall_time_s": {},
                                      "score_info": {}}
        if resume and path.is_file():
            saved = json.loads(path.read_text())
            if same_data(saved.get("key", {}), key):
                if _optim_key(saved["key"]) != _optim_key(key):
                    saved["optimiser"] = None  # made with another step budget
                saved["key"] = key
                self.state = saved
                saved.setdefault("score_info", {})
                print(f"resuming from {path}: {sorted(saved['scores'])} scored, newton {sorted(saved['newton'])}, "
                      f"optimiser {'done' if saved['optimiser'] else 'to do'}", file=sys.stderr)
            else:
                print(f"{path} was made with other settings; starting afresh", file=sys.stderr)

    def merge(self, paths) -> None:
        """Take finished units from other runs' partial files (same data and settings), e.g. when
        scoring, Newton steps and the optimiser budget were run as parallel processes."""
        for path in paths:
            other = json.loads(Path(path).read_text())
            if other.get("schema") == SCHEMA:  # a finished record: its settings hold the key
                other = {"key": {k: other["settings"].get(k) for k in self.key}, "scores": other["scores"],
                         "newton": other["newton"], "optimiser": other["optimiser"], "wall_time_s": other["wall_time_s"],
                         "score_info": other.get("score_info", {})}
            if not same_data(other.get("key", {}), self.key):
                raise LayercapError(f"{path} was made with other data or settings; cannot merge it.")
            if _optim_key(other["key"]) != _optim_key(self.key):
                other["optimiser"] = None
            for part in ("scores", "newton", "score_info"):
                for name, value in other.get(part, {}).items():
                    self.state[part].setdefault(name, value)
            if self.state["optimiser"] is None and other["optimiser"] is not None:
                self.state["optimiser"] = other["optimiser"]
            for name, value in other["wall_time_s"].items():
                self.state["wall_time_s"].setdefault(f"{name} ({Path(path).name})", value)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.state)


def run(args) -> GainsValidation:
    from tqdm.auto import tqdm

    from layercap.scores import ScoreOptions, param_groups, score_model

    device = torch.device("cuda" if torch.cuda.is_available() and args.device == "auto" else ("cpu" if args.device == "auto" else args.device))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = load(args.model, device)
    stats_set, heldout = disjoint_windows(tok, args.data, args.nsamples, args.seqlen, args.seed)
    groups = param_groups(model, "block")
    names = [g.name for g in groups]
    datasets = [stats_set, heldout]
    base = [mean_nll(model, d, args.batch_size, device) for d in datasets]
    timings["setup"] = time.perf_counter() - t0

    def options_for(spec: str) -> ScoreOptions:
        _, fisher, damping = parse_spec(spec, args.fisher, args.damping)
        return ScoreOptions(batch_size=args.batch_size, damping=damping, seed=args.seed, device=str(device),
                            fisher=fisher, cg_max_iter=args.cg_max_iter, cg_tol=args.cg_tol,
                            tr_max_evals=args.tr_max_evals, tr_factor=args.tr_factor)

    # exact is matrix-free CG (every iteration a pass over the data): optionally on a subset
    exact_ids = stats_set.input_ids[: args.exact_nsamples or None, : args.exact_seqlen or None]
    exact_calib = CalibrationSet(exact_ids, sha256_bytes(exact_ids.numpy().tobytes()), stats_set.source, stats_set.seed)

    key = {k: getattr(args, k) for k in ("model", "nsamples", "seqlen", "seed", "damping", "fisher", "scales", "exact_nsamples",
                                         "exact_seqlen", "cg_max_iter", "cg_tol", "influence_aggregate", "steps", "lr", "optimiser",
                                         "tr_max_evals", "tr_factor")}
    key.update({"stats_sha256": stats_set.sha256, "heldout_sha256": heldout.sha256})
    progress = Progress(Path(str(args.out) + ".partial.json"), key, args.resume)
    if args.merge:
        progress.merge(args.merge)
    state = progress.state
    timings.update(state["wall_time_s"])
    scores: dict[str, list[float]] = state["scores"]
    # a gain's trust region is the <base>-tr search itself: score gains first and take <base>-tr from them
    for spec in sorted(args.methods, key=lambda m: not parse_spec(m, args.fisher)[0].startswith("gain")):
        method = parse_spec(spec, args.fisher)[0]
        if method == "utility" and spec in scores and state["score_info"].get(spec, {}).get("units") != args.utility_units:
            scores.pop(spec)  # measured at another level: measure again
        if spec in scores or args.no_compute or (method == "exact" and "exact" in args.newton):
            continue  # (exact with its Newton step: scored once, in the Newton phase below)
        t = time.perf_counter()
        if method == "utility":
            from layercap.apply.utility import measure_utility

            print(f"measuring utility at {args.utility_units} units ...", file=sys.stderr, flush=True)
            adapt, measure = stats_set.halves()  # adapt on half the statistics windows, measure on the other half
            table = measure_utility(model, adapt, measure, [0, args.utility_units], steps=args.utility_steps,
                                    lr=args.utility_lr, batch_size=args.batch_size, seed=args.seed, progress=True)
            scores[spec] = [2.0 * float(row[-1]) for row in table.reduction]  # on zeta^2's scale: score / 2 = nats removed
            state["score_info"][spec] = {"cost": table.cost, "units": args.utility_units, "steps": args.utility_steps,
                                         "lr": args.utility_lr}
            timings[f"score:{spec}"] = time.perf_counter() - t
            state["wall_time_s"] = timings
            progress.save()
            continue
        opts = options_for(spec)
        calib = exact_calib if method in EXACT_LIKE else stats_set
        if method == "influence":
            opts.extra = {"validation": heldout, "aggregate": args.influence_aggregate}
        print(f"scoring {spec} ...", file=sys.stderr, flush=True)
        result = score_model(model, method, calib, options=opts)
        scores[spec] = result.zeta2.tolist()
        info = result.metadata.get("method_info", {})
        if "tr_ratio" in info:
            state["score_info"][spec] = {k: info[k] for k in TR_FIELDS if k in info}
        tr_spec = tr_of_gain(spec)
        if tr_spec is not None and tr_spec in args.methods and tr_spec not in scores:
            scores[tr_spec] = [2.0 * p for p in info["predicted_decrease"]]  # zeta2 at the accepted lambda
            state["score_info"][tr_spec] = {k: info[k] for k in TR_FIELDS if k in info and not k.startswith("gain")}
            state["score_info"][tr_spec]["forward_passes"] = 1 + sum(info["tr_evals"])  # without the line search
            timings[f"score:{tr_spec}"] = time.perf_counter() - t - info["timing"]["gain_line_search_s"]
        timings[f"score:{spec}"] = time.perf_counter() - t
        state["wall_time_s"] = timings
        progress.save()

    newton: dict[str, dict[str, list[float]]] = state["newton"]
    for spec in [m for m in args.newton if m not in newton and not args.no_compute]:
        kind = parse_spec(spec, args.fisher)[0]
        t = time.perf_counter()
        rec = newton_step(model, groups, exact_calib if kind == "exact" else stats_set, options_for(spec), kind)
        timings[f"newton:{spec}:statistics"] = time.perf_counter() - t
        t = time.perf_counter()
        red: dict[str, list[float]] = {}
        for grp, step in tqdm(list(zip(groups, rec["steps"])), desc=f"newton step {spec}", unit="block", file=sys.stderr):
            for name, value in line_search(model, grp, step, stats_set, heldout, base, args.scales, args.batch_size, device).items():
                red.setdefault(name, []).append(value)
        red["zeta2_of_step"] = rec["zeta2"]  # g^T(-d): equals the engine's zeta2 (self-check)
        if "info" in rec:
            red["info"] = rec["info"]
        newton[spec] = red
        if kind == "exact" and spec in args.methods:
            scores.setdefault(spec, rec["zeta2"])
        elif spec in scores:
            ref, mine = np.asarray(scores[spec]), np.asarray(rec["zeta2"])
            print(f"self-check {spec}: max rel diff of g^T(-d) vs engine zeta2 = "
                  f"{np.max(np.abs(mine - ref) / np.maximum(ref, 1e-30)):.2e}", file=sys.stderr)
        del rec
        timings[f"newton:{spec}:measure"] = time.perf_counter() - t
        state["wall_time_s"] = timings
        progress.save()

    if state["optimiser"] is None and args.steps > 0 and not args.no_compute:
        t = time.perf_counter()
        optim = {"stats": [], "heldout": []}
        for grp in tqdm(groups, desc=f"{args.steps} {args.optimiser} steps per block", unit="block", file=sys.stderr):
            after = optimiser_reduction(model, grp, stats_set, datasets, args.steps, args.lr, args.optimiser, args.batch_size, device)
            optim["stats"].append(base[0] - after[0])
            optim["heldout"].append(base[1] - after[1])
        timings["optimiser"] = time.perf_counter() - t
        state["optimiser"] = optim
        state["wall_time_s"] = timings
        progress.save()
    optim = state["optimiser"]
    timings["total_this_run"] = time.perf_counter() - t0

    scores = {**{m: scores[m] for m in args.methods if m in scores}, **scores}  # table rows in --methods order
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "no_compute", "merge")}
    settings.update({"device": str(device), "stats_sha256": stats_set.sha256, "heldout_sha256": heldout.sha256,
                     "torch": torch.__version__, "threads": torch.get_num_threads()})
    return GainsValidation(args.model, names, {"stats": base[0], "heldout": base[1]}, scores, newton, optim,
                           correlations(scores, newton, optim), settings, timings,
                           score_info={m: state["score_info"][m] for m in scores if m in state["score_info"]})


def table(result: GainsValidation) -> str:
    cols = (["optim_stats", "optim_heldout"] if result.optimiser else []) + [
        f"newton{ls}[{m}]_{s}" for m in result.newton for ls in ("", "_ls") for s in ("stats", "heldout")
        if ls == "" or "ls_stats" in result.newton[m]]
    lines = ["| score | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for m, row in result.spearman.items():
        lines.append(f"| {m} | " + " | ".join(f"{row.get(c, float('nan')):+.2f}" for c in cols) + " |")
    return "\n".join(lines)


def quadratic_check(result: GainsValidation) -> str:
    """Predicted zeta^2/2 vs measured Newton-step reduction on the statistics windows (sums over blocks)."""
    lines = ["| step | sum zeta2/2 (pred., t = 1) | sum measured, t = 1 (stats / held-out) | blocks where t = 1 raised the stats loss "
             "| line search: median t | sum predicted at t | sum measured at t (stats / held-out) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, red in result.newton.items():
        z = np.asarray(red["zeta2_of_step"], float)
        row = (f"| {m} | {0.5 * z.sum():.4g} | {np.sum(red['stats']):.4g} / {np.sum(red['heldout']):.4g} | "
               f"{int(np.sum(np.asarray(red['stats']) < 0))}/{len(red['stats'])} |")
        if "ls_scale" in red:
            t = np.asarray(red["ls_scale"], float)
            row += (f" {np.median(t):.3g} | {np.sum(z * t * (1 - t / 2)):.4g} | "
                    f"{np.sum(red['ls_stats']):.4g} / {np.sum(red['ls_heldout']):.4g} |")
        lines.append(row)
    return "\n".join(lines)


def calibration_table(result: GainsValidation, low: float = 0.25, high: float = 0.75) -> str:
    """Per calibrated method: how often the trust region landed in the band, and what it cost."""
    lines = ["| method | blocks with r in [1/4, 3/4] | accepted | median r | median lambda / initial | "
             "sum predicted / sum measured (nats/token) | forward passes | wall s |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for m, info in result.score_info.items():
        if "tr_ratio" not in info:
            continue  # the measured utility has no trust region
        r = np.asarray(info["tr_ratio"], float)
        grow = np.asarray(info["damping_lambda"], float) / np.maximum(np.asarray(info["initial_lambda"], float), 1e-300)
        measured = info.get("gain_decrease", info["measured_decrease"])
        wall = next((v for k, v in result.wall_time_s.items() if k == f"score:{m}" or k.startswith(f"score:{m} (")), float("nan"))
        lines.append(f"| {m} | {int(np.sum((r >= low) & (r <= high)))}/{len(r)} | {int(np.sum(info['tr_accepted']))}/{len(r)} | "
                     f"{np.median(r):.3g} | {np.median(grow):.3g} | {np.sum(info['predicted_decrease']):.4g} / "
                     f"{np.sum(measured):.4g} | {info['forward_passes']} | {wall:.0f} |")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, a save_pretrained dir, a .gguf, or tiny-<family>")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/corpora/wikitext-2-raw/wiki.test.raw"))
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--damping", type=float, default=0.1, help="relative damping rho (SPEC default 0.1)")
    p.add_argument("--fisher", choices=FISHER_KINDS, default="empirical",
                   help="Fisher flavour of diag/kfac/ekfac when a method name has no ':true' / ':empirical' suffix")
    p.add_argument("--methods", default=",".join(CURVATURE_METHODS + BASELINES),
                   help="scores to correlate, comma-separated; diag/kfac/ekfac take ':true' or ':empirical', any curvature "
                   "method '@RHO' (its own relative damping), e.g. kfac:true@10")
    p.add_argument("--newton", default=",".join(STEP_METHODS), help="methods whose Newton step is measured (same syntax)")
    p.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES),
                   help="line-search scales t of each Newton step (the best on the statistics windows is kept)")
    p.add_argument("--exact-nsamples", type=int, default=None, help="windows used by the (slow) exact method (default: all)")
    p.add_argument("--exact-seqlen", type=int, default=None, help="tokens per window for the exact method (default: --seqlen)")
    p.add_argument("--cg-max-iter", type=int, default=10)
    p.add_argument("--cg-tol", type=float, default=1e-3)
    p.add_argument("--influence-aggregate", default="all")
    p.add_argument("--tr-max-evals", type=int, default=6, help="calibrated methods: trust-region forward passes per block")
    p.add_argument("--tr-factor", type=float, default=30.0, help="calibrated methods: lambda grows / shrinks by this factor")
    p.add_argument("--utility-units", type=int, default=2, help="utility: LoRA units (rank 4 each) of the adaptation")
    p.add_argument("--utility-steps", type=int, default=5, help="utility: Adam steps of the adaptation")
    p.add_argument("--utility-lr", type=float, default=1e-3, help="utility: learning rate of the adaptation")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimiser", choices=("adam", "sgd"), default="adam")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/validate_gains.json")
    p.add_argument("--resume", action="store_true", help="reuse finished parts from <out>.partial.json")
    p.add_argument("--merge", nargs="*", default=[], metavar="PARTIAL",
                   help="merge finished parts of other runs' <out>.partial.json files (same settings) first")
    p.add_argument("--no-compute", action="store_true",
                   help="with --resume: report only what <out>.partial.json holds (for parts computed by separate runs)")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.newton = [m for m in args.newton.split(",") if m]
    try:
        unknown = [m for m in args.methods if parse_spec(m, args.fisher)[0] not in CURVATURE_METHODS + BASELINES + MEASURED]
        unknown += [m for m in args.newton if parse_spec(m, args.fisher)[0] not in STEP_METHODS]
    except LayercapError as exc:
        p.error(str(exc))
    if unknown:
        p.error(f"unknown method(s) {unknown}; scores: {CURVATURE_METHODS + BASELINES}, steps: {STEP_METHODS}")
    if any(not 0 < t <= 1 for t in args.scales):
        p.error("--scales must lie in (0, 1].")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:
        result = run(args)
    except LayercapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.save(args.out)
    print(f"model {result.model}, {len(result.groups)} blocks, base loss stats {result.base_loss['stats']:.4f} "
          f"held-out {result.base_loss['heldout']:.4f} nats/token")
    print("\nSpearman rho of each score with the measured loss reduction:\n")
    print(table(result))
    if any("tr_ratio" in info for info in result.score_info.values()):
        print("\nTrust region of the calibrated methods (r = measured decrease / (zeta^2/2) at the accepted lambda; "
              "the gain columns use the line-searched decrease):\n")
        print(calibration_table(result))
    if result.newton:
        print("\nQuadratic-model check (Newton step of each method on its own statistics):\n")
        print(quadratic_check(result))
    print("\nwall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.wall_time_s.items()))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
