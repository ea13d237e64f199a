"""Allocation and pruning rules on the same budget: the MDL programs and the baselines (SPEC 5).

Public entry points build the records other stages consume:

    allocation_by_rule(rule, scores, budget, ...) -> Allocation
    ratios_by_rule(rule, scores, sparsity, ...)   -> PruningRatios

Every rule reads its per-layer input from ``scores.zeta2`` (curvature gain for mdl/proportional/
layerif, the heavy-tail exponent for alphalora/alphapruning, the outlier ratio for owl); a
warning (not an error) is recorded when ``scores.method`` does not match the rule's usual source.

Allocation baselines share one rounding scheme ("scale, floor, largest remainder"): a weight
w_k per layer is scaled to the budget, n_k = clip(lambda w_k, l_k, u_k) with lambda solved
exactly so that sum c_k n_k = B (bounds respected, e.g. at least 1 expert), then (integer) each
n_k is floored and the leftover budget goes one unit at a time to the largest fractional parts
(ties: shallower layer first), skipping a layer whose unit no longer fits or that is at u_k.

- uniform: w_k = 1.                 - proportional: w_k = q_k.
- layerif: w_k = q_k^beta.          - alphalora: w_k = (heavy-tail exponent)_k^beta.
- mola-2468 / mola-8642 / mola-5555: w_k = the pattern value of layer k's depth quarter, quarter
  = floor(4 k / K) for k = 0..K-1 (K not divisible by 4: the first quarters are the shorter
  ones). With K = 32, B = 160, the lower bound 1: mola-2468 gives 2,4,6,8 experts per layer in
  the four quarters exactly (8 x (2+4+6+8) = 160); other budgets scale the pattern.
- mdl: the program (integer.py / allocation.py).

Pruning baselines, all rescaled so that the parameter-weighted mean ratio equals the target
exactly (sum N_k rho_k = s sum N_k, after clipping to [min_ratio, max_ratio]):

- uniform: rho_k = s.
- owl: outlier ratio D_k min-max normalised to [0, 2 lambda] (lambda = 0.08); more outliers ->
  lower sparsity: rho_k = s + shift - d_k, with the shift solved so the weighted mean is s
  (OWL centres on the unweighted mean; equal with equal block sizes).
- alphapruning: exponent min-max normalised m_k in [0, 1], mapped to [s - eps, s + eps]
  (eps = 0.3), then scaled multiplicatively (AlphaPruning's rescaling) so the weighted mean is s;
  higher alpha (less well trained) -> pruned more. Negative values (s < eps) are floored at 0.
- layerif: scores min-max normalised, smoothed with a Savitzky-Golay filter (window 7, order 3;
  a shorter odd window when K < 7, no smoothing when K <= 3), then the AlphaPruning map.
- mdl: the pruning program (pruning.py), modes exact / at-least.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from layercap.errors import LayercapError
from layercap.programs._solve import clipped_linear_root, dot, polish_root
from layercap.programs.allocation import _water_fill, prepare
from layercap.programs.integer import _whole, allocate_integer
from layercap.programs.pruning import pruning_ratios, validate
from layercap.programs.records import AllocatedLayer, Allocation, PruningRatios, RatioLayer
from layercap.scorefile import LayerScores

ALLOCATION_RULES: tuple[str, ...] = ("mdl", "uniform", "proportional", "mola-2468", "mola-8642", "mola-5555", "layerif", "alphalora")
PRUNING_RULES: tuple[str, ...] = ("mdl", "uniform", "owl", "alphapruning", "layerif")
MOLA_PATTERNS = {"mola-2468": (2, 4, 6, 8), "mola-8642": (8, 6, 4, 2), "mola-5555": (5, 5, 5, 5)}
OWL_LAMBDA = 0.08
ALPHA_EPS = 0.3

# the score source each baseline rule reads (scores.method); rules not named here read
# curvature scores (zeta^2: mdl, proportional) or none (uniform, the MoLA patterns)
RULE_SOURCES = {"alphalora": "alpha-hill", "alphapruning": "alpha-hill", "owl": "owl", "layerif": "influence"}
_BASELINE_SOURCES = ("alpha-hill", "owl")


def _source_warning(rule: str, scores: LayerScores) -> list[str]:
    want = RULE_SOURCES.get(rule)
    got = scores.method
    if want is not None and got != want:
        return [f"rule {rule!r} expects scores from method {want!r} but the scores file says {got!r}; "
                f"the rule ran on those values anyway (score with --method {want} for the published baseline)."]
    if want is None and rule in ("mdl", "proportional") and got in _BASELINE_SOURCES:
        return [f"rule {rule!r} expects curvature scores (zeta^2) but the scores file holds {got!r} values."]
    return []


def mola_weights(pattern: str, K: int) -> np.ndarray:
    """Per-layer pattern value by depth quarter: quarter(k) = floor(4 k / K)."""
    values = MOLA_PATTERNS[pattern]
    quarter = (4 * np.arange(K)) // K
    return np.asarray(values, dtype=np.float64)[quarter]


def resolve_costs(costs, scores: LayerScores) -> np.ndarray:
    """costs: None (the file's cost column, else 1), "count" (1), "params" (N_k) or an array (K,)."""
    K = len(scores)
    if costs is None:
        c = scores.costs()
        return np.ones(K) if c is None else c
    if isinstance(costs, str):
        if costs == "count":
            return np.ones(K)
        if costs == "params":
            return scores.params.astype(np.float64)
        raise LayercapError(f"cost {costs!r} is unknown; use count, params, or a per-layer array/file.")
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (K,):
        raise LayercapError(f"costs has shape {c.shape}; need one cost per layer ({K}).")
    return c


def scale_round(weights, budget, costs, lower, upper, integer: bool) -> np.ndarray:
    """The baselines' rounding: n = clip(lambda w, l, u) with sum c n = B, then floor + largest remainder."""
    w = np.asarray(weights, dtype=np.float64)
    c, l, u = costs, lower, upper
    lam = clipped_linear_root(w, np.zeros_like(w), l, u, c, budget, side="left")
    if np.isfinite(lam):
        lam = polish_root(lam, w, np.zeros_like(w), l, u, c, budget)
        n = np.clip(lam * w, l, u)
    else:  # the budget cannot be spent: everything that can grow at its upper bound
        n = np.where(w > 0, u, l)
    if not integer:
        return n
    base = np.floor(n + 1e-9)
    frac = n - base
    rem = budget - dot(c, base)
    for k in np.argsort(-frac, kind="stable"):
        if frac[k] > 1e-12 and base[k] + 1 <= u[k] and c[k] <= rem * (1 + 1e-12) + 1e-12:
            base[k] += 1
            rem -= c[k]
    return base


def allocation_by_rule(rule: str, scores: LayerScores, budget: float, *, costs=None, beta: float = 0.9,
                       alpha="auto", lower=1, upper=None, integer: bool = True, unit: str = "experts") -> Allocation:
    """Allocate `budget` (in cost units) across the layers of `scores` by `rule`.

    costs: None / "count" / "params" / array (K,). lower/upper: per-layer bounds (scalar or (K,);
    upper None = unbounded). integer: whole units (experts, rank units). Returns Allocation with
    per-layer n, q, cost; mu/binds/spent; gap (integer mdl) and metadata (rule parameters,
    objective, warnings).
    """
    if rule not in ALLOCATION_RULES:
        raise LayercapError(f"allocation rule {rule!r} is unknown; use one of: {', '.join(ALLOCATION_RULES)}.")
    if unit not in ("experts", "rank", "units"):
        raise LayercapError(f"unit {unit!r} is unknown; use experts, rank or units.")
    c = resolve_costs(costs, scores)
    K = len(scores)
    if integer:
        lower = _whole(lower, "lower bound(s)")
        if upper is not None:
            upper = _whole(upper, "upper bound(s)")
    q, w, c, l, u, budget, alpha = prepare(scores.zeta2, budget, c, beta, alpha, lower, upper)
    warnings = _source_warning(rule, scores)
    meta: dict = {"beta": beta, "alpha": alpha, "lower": _jsonable(lower), "upper": _jsonable(upper),
                  "cost": costs if isinstance(costs, str) else ("array" if costs is not None
                                                                 else ("file" if scores.costs() is not None else "count")),
                  "scores_method": scores.method}
    gap = None
    if rule == "mdl":
        if integer:
            sol = allocate_integer(scores.zeta2, budget, costs=c, beta=beta, alpha=alpha, lower=lower, upper=upper)
            n, mu, binds, spent, gap = sol.n, sol.mu, sol.binds, sol.spent, sol.gap
            meta.update(objective=sol.objective, relaxed_objective=sol.relaxed_objective,
                        relaxation_gap=sol.relaxation_gap, optimal=sol.optimal, alpha_used=sol.alpha, threshold=sol.threshold)
        else:
            sol = _water_fill(w, c, l, u, budget, alpha)
            n, mu, binds, spent = sol.n, sol.mu, sol.binds, sol.spent
            meta.update(objective=sol.objective, alpha_used=sol.alpha, level=sol.level)
        if not binds:
            warnings.append(f"the budget does not bind: MDL spends {spent:g} of {budget:g} "
                            + ("(every layer is at its upper bound)." if alpha == "auto" else "(further units cost more than they gain at this alpha)."))
    else:
        if rule == "uniform":
            wr = np.ones(K)
        elif rule == "proportional":
            wr = q
        elif rule in MOLA_PATTERNS:
            wr = mola_weights(rule, K)
        else:  # layerif, alphalora: the score to the power beta
            wr = q ** beta
        n = scale_round(wr, budget, c, l, u, integer)
        mu = None
        spent = dot(c, n)
        binds = bool(spent >= budget * (1 - 1e-9) or np.all((n >= u) | (c > budget - spent + 1e-9)))
    n = np.asarray(n)
    counts = [int(round(x)) for x in n] if integer else [float(x) for x in n]
    layers = [AllocatedLayer(name, counts[k], float(c[k]), float(q[k])) for k, name in enumerate(scores.names)]
    meta["warnings"] = warnings
    return Allocation(rule=rule, budget=float(budget), unit=unit, integer=bool(integer), layers=layers,
                      mu=None if mu is None else float(mu), binds=bool(binds), spent=float(dot(c, n)), gap=gap, metadata=meta)


def _jsonable(x):
    if x is None:
        return None
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        v = float(a)
        return int(v) if v.is_integer() else v
    return [int(v) if float(v).is_integer() else float(v) for v in a]


# ---- pruning ------------------------------------------------------------------------------
def minmax(x) -> np.ndarray:
    """(x - min) / (max - min); all zeros when x is constant."""
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min()
    return np.zeros_like(x) if span <= 0 else (x - x.min()) / span


def savgol_smooth(x, window: int = 7, order: int = 3) -> np.ndarray:
    """Savitzky-Golay smoothing over depth; shorter odd window for short models (K < window)."""
    from scipy.signal import savgol_filter

    x = np.asarray(x, dtype=np.float64)
    K = x.size
    win = min(window, K if K % 2 == 1 else K - 1)
    if win <= order:
        return x.copy()
    return savgol_filter(x, win, order)


def meet_target_shift(base, N, s, lo, hi) -> np.ndarray:
    """rho = clip(base + delta) with delta solved so that sum N rho = s sum N (exact)."""
    ones = np.ones_like(base)
    target = s * float(N.sum())
    lo_v, hi_v = np.full(base.shape, lo), np.full(base.shape, hi)
    d = clipped_linear_root(ones, base, lo_v, hi_v, N, target, side="left")
    d = polish_root(d, ones, base, lo_v, hi_v, N, target)
    return np.clip(base + d, lo, hi)


def meet_target_scale(base, N, s, lo, hi) -> np.ndarray:
    """rho = clip(lambda base) with lambda >= 0 solved so that sum N rho = s sum N (exact).

    Falls back to an additive shift when the base is all zero or cannot reach the target
    (e.g. min_ratio > 0 with zero entries).
    """
    base = np.maximum(np.asarray(base, dtype=np.float64), 0.0)
    target = s * float(N.sum())
    zeros = np.zeros_like(base)
    lo_v, hi_v = np.full(base.shape, lo), np.full(base.shape, hi)
    if base.max() > 0:
        lam = clipped_linear_root(base, zeros, lo_v, hi_v, N, target, side="left")
        if np.isfinite(lam):
            lam = polish_root(lam, base, zeros, lo_v, hi_v, N, target)
            rho = np.clip(lam * base, lo, hi)
            if abs(dot(N, rho) - target) <= 1e-10 * max(target, 1.0):
                return rho
    return meet_target_shift(base, N, s, lo, hi)


def alphapruning_map(values, N, s, lo, hi, eps: float = ALPHA_EPS) -> np.ndarray:
    m = minmax(values)
    return meet_target_scale((s - eps) + 2.0 * eps * m, N, s, lo, hi)


def ratios_by_rule(rule: str, scores: LayerScores, sparsity: float, *, mode: str = "exact", eta: float = 1.0,
                   p: float = 2.0, gamma: float = 1.0, bits: float = 16, min_ratio: float = 0.0,
                   max_ratio: float = 1.0) -> PruningRatios:
    """Per-layer pruning ratios by `rule`, meeting the parameter-weighted `sparsity` exactly
    (except mdl in mode "at-least", the paper's literal program, which may prune more)."""
    if rule not in PRUNING_RULES:
        raise LayercapError(f"pruning rule {rule!r} is unknown; use one of: {', '.join(PRUNING_RULES)}.")
    q, N = validate(scores.zeta2, scores.params, sparsity, mode=mode, eta=eta, p=p, gamma=gamma, bits=bits,
                    min_ratio=min_ratio, max_ratio=max_ratio)
    lo, hi, s = float(min_ratio), float(max_ratio), float(sparsity)
    warnings = _source_warning(rule, scores)
    meta: dict = {"min_ratio": lo, "max_ratio": hi, "scores_method": scores.method}
    nu = None
    out_mode = "rule"
    if rule == "mdl":
        sol = pruning_ratios(scores.zeta2, N, s, mode=mode, eta=eta, p=p, gamma=gamma, bits=bits,
                             min_ratio=lo, max_ratio=hi)
        rho, nu, out_mode = sol.rho, sol.nu, mode
        warnings += sol.warnings
        meta.update(eta=eta, p=p, gamma=gamma, bits=bits, objective=sol.objective, binds=sol.binds)
    elif rule == "uniform":
        rho = np.full(q.shape, s)
        rho = meet_target_shift(rho, N, s, lo, hi)
    elif rule == "owl":
        d = minmax(scores.zeta2) * 2.0 * OWL_LAMBDA
        rho = meet_target_shift(-d, N, s, lo, hi)
        meta["lambda"] = OWL_LAMBDA
    elif rule == "alphapruning":
        rho = alphapruning_map(scores.zeta2, N, s, lo, hi)
        meta["epsilon"] = ALPHA_EPS
    else:  # layerif
        smooth = savgol_smooth(minmax(scores.zeta2))
        rho = alphapruning_map(smooth, N, s, lo, hi)
        meta.update(epsilon=ALPHA_EPS, savgol_window=7, savgol_order=3)
    rho = np.asarray(rho, dtype=np.float64)
    achieved = dot(N, rho) / float(N.sum())
    clipped = int(np.sum((rho <= lo + 1e-12) | (rho >= hi - 1e-12)))
    layers = [RatioLayer(name, float(rho[k]), int(N[k])) for k, name in enumerate(scores.names)]
    return PruningRatios(rule=rule, sparsity=s, mode=out_mode, layers=layers, achieved=float(min(max(achieved, 0.0), 1.0)),
                         nu=nu, clipped=clipped, warnings=warnings, metadata=meta)


def uniform_ratios(names: Sequence[str], params: Sequence[int], sparsity: float) -> PruningRatios:
    """Alias of PruningRatios.uniform (no scores needed)."""
    return PruningRatios.uniform(names, params, sparsity)


def load_costs(path: str, names: Sequence[str]) -> np.ndarray:
    """Per-layer costs from a file: CSV with columns name,cost; JSON {name: cost}; or JSON list (K,)."""
    import csv
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise LayercapError(f"--cost {path!r}: no such file. Use count, params, or a CSV (name,cost) / JSON {{name: cost}} file.")
    by_name: dict | None = None
    if file.suffix.lower() == ".csv":
        with open(file, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "name" not in reader.fieldnames or "cost" not in reader.fieldnames:
                raise LayercapError(f"--cost {path}: CSV needs a header with columns 'name' and 'cost'.")
            try:
                by_name = {row["name"]: float(row["cost"]) for row in reader}
            except (TypeError, ValueError) as exc:
                raise LayercapError(f"--cost {path}: every cost must be a number ({exc}).") from exc
    else:
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LayercapError(f"--cost {path}: not valid JSON ({exc}); expected {{name: cost}} or a list of costs.") from exc
        if isinstance(doc, dict) and isinstance(doc.get("layers"), list):  # a scores/allocation file with costs
            try:
                by_name = {item["name"]: item["cost"] for item in doc["layers"]}
            except (KeyError, TypeError) as exc:
                raise LayercapError(f"--cost {path}: layers[] entries need 'name' and 'cost'.") from exc
        elif isinstance(doc, dict):
            by_name = doc
        elif isinstance(doc, list):
            if len(doc) != len(names):
                raise LayercapError(f"--cost {path}: list has {len(doc)} costs for {len(names)} layers.")
            by_name = dict(zip(names, doc))
        else:
            raise LayercapError(f"--cost {path}: expected {{name: cost}} or a list of costs.")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise LayercapError(f"--cost {path}: no cost for layer(s) {missing[:3]}{'...' if len(missing) > 3 else ''}; give one per layer of the scores file.")
    vals = []
    for n in names:
        v = by_name[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise LayercapError(f"--cost {path}: cost of {n!r} is {v!r}; costs must be finite numbers > 0.")
        vals.append(float(v))
    return np.array(vals)
