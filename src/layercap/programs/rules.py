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
- adversarial: the benchmark's control, a deliberately bad allocation: every unit above the
  lower bounds goes to the ADVERSARIAL_BLOCKS layers with the lowest gain q_k (w_k = 1 there,
  0 elsewhere, the shared rounding), so it spends the same budget as every other rule.
- mdl:measured: the program with measured concave utilities (utility.py), given a utility table.

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

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from layercap.errors import LayercapError
from layercap.programs._solve import clipped_linear_root, dot, polish_root
from layercap.programs.allocation import _water_fill, prepare
from layercap.programs.integer import _whole, allocate_integer
from layercap.programs.pruning import pruning_ratios, validate
from layercap.programs.records import AllocatedLayer, Allocation, PruningRatios, RatioLayer, jsonable as _jsonable
from layercap.scorefile import LayerScores

MOLA_PATTERNS = {"mola-2468": (2, 4, 6, 8), "mola-8642": (8, 6, 4, 2), "mola-5555": (5, 5, 5, 5)}
OWL_LAMBDA = 0.08
ALPHA_EPS = 0.3
ADVERSARIAL_BLOCKS = 3
# a rule's `source`: None (reads no scores: the decision scores give only the layer names and
# sizes), CURVATURE (the zeta^2 estimator the user picks, e.g. mdl:kfac), or a score method name
CURVATURE = "curvature"
DEFAULT_CURVATURE = "kfac"
# rules decided by measuring the pruned model on calibration tokens (a search), not by a program
# over a scores file: the orchestration layer runs them (layercap.apply.prune.search)
MEASURED = "measured"
# sources of the convex-damage program (mdl:damage, mdl:obd, mdl:context): damage tables measured
# per pruner (layercap.apply.prune.damage), not scores files. `context` is measured at the operating
# point (every other block pruned at the uniform target), so its table belongs to one sparsity.
DAMAGE_SOURCES = ("damage", "obd", "context")
# the table column each damage source's program reads
DAMAGE_COLUMNS = {"damage": "kl", "obd": "obd-diag", "context": "kl"}
# per-Linear variants of the measured sources (mdl:damage-linear, mdl:obd-linear): a table row and a
# ratio per Linear, EvoPress's granularity, on the same budget (compare-pruning and the main job).
LINEAR = "-linear"
LINEAR_SOURCES = ("damage" + LINEAR, "obd" + LINEAR)
DAMAGE_COLUMNS.update({k + LINEAR: DAMAGE_COLUMNS[k] for k in ("damage", "obd")})
# a damage source with this suffix (mdl:damage+refine): the program's ratios are the start of the
# EvoPress-style search on calibration KL (the sweep runs it; layercap.apply.prune.search)
REFINE = "+refine"


def is_refined(source: str | None) -> bool:
    """True for ``damage+refine`` / ``obd+refine``: the program's ratios, then the search from them."""
    return bool(source) and source.endswith(REFINE)


def damage_kind(source: str | None) -> str | None:
    """The damage table a source reads ("damage" for ``damage`` and ``damage+refine``), or None."""
    base = source[: -len(REFINE)] if is_refined(source) else source
    return base if base in DAMAGE_SOURCES + LINEAR_SOURCES else None


def table_units(kind: str) -> tuple[str, str]:
    """(the damage kind a table is measured as, its units): ``obd-linear`` -> (``obd``, ``linear``)."""
    return (kind[: -len(LINEAR)], "linear") if kind.endswith(LINEAR) else (kind, "block")


# the source of the concave-utility allocation program (mdl:measured): a utility table measured by
# adapting each block alone (layercap.apply.utility, schema layercap.utility/v1), not a scores file
UTILITY_SOURCES = ("measured",)
UTILITY_RULES = tuple(f"mdl:{k}" for k in UTILITY_SOURCES)


@dataclass(frozen=True)
class AllocationRule:
    """An allocation rule: ``solve(scores, q, w, costs, lower, upper, budget, alpha, beta, integer)
    -> (n, mu, binds, spent, gap, meta)`` (see :func:`allocation_by_rule`)."""

    name: str
    solve: Callable[..., tuple]
    source: str | None
    description: str = ""


@dataclass(frozen=True)
class PruningRule:
    """A pruning-ratio rule: ``solve(scores, N, s, lo, hi, options) -> (rho, nu, mode, meta, warnings)``
    with rho (K,) meeting sum N rho = s sum N within [lo, hi] (see :func:`ratios_by_rule`)."""

    name: str
    solve: Callable[..., tuple]
    source: str | None
    description: str = ""


ALLOCATION_RULES: dict[str, AllocationRule] = {}
PRUNING_RULES: dict[str, PruningRule] = {}


def register_allocation_rule(name: str, solve: Callable[..., tuple], source: str | None, description: str = "") -> AllocationRule:
    """Add allocation rule ``name`` (one line per rule; see the README's Architecture section)."""
    ALLOCATION_RULES[name] = rule = AllocationRule(name, solve, source, description)
    return rule


def register_pruning_rule(name: str, solve: Callable[..., tuple], source: str | None, description: str = "") -> PruningRule:
    """Add pruning-ratio rule ``name``."""
    PRUNING_RULES[name] = rule = PruningRule(name, solve, source, description)
    return rule


def rule_registry(program: str) -> dict:
    if program not in ("allocation", "pruning"):
        raise LayercapError(f"program {program!r} is unknown; use allocation or pruning.")
    return ALLOCATION_RULES if program == "allocation" else PRUNING_RULES


@dataclass(frozen=True)
class RuleSpec:
    """A rule and the score method it reads (None: the rule reads no scores)."""

    rule: str
    source: str | None
    program: str = "pruning"

    @property
    def label(self) -> str:
        """``rule``, or ``rule:source`` for curvature rules and for a baseline read from another source."""
        declared = rule_registry(self.program)[self.rule].source
        if self.source and (declared == CURVATURE or self.source != declared):
            return f"{self.rule}:{self.source}"
        return self.rule

    @property
    def dirname(self) -> str:
        return self.label.replace(":", "-")


def parse_rule(text: str, program: str, curvature: str = DEFAULT_CURVATURE, known_sources=None) -> RuleSpec:
    """``RULE[:SOURCE]`` -> RuleSpec for ``program`` ("allocation" or "pruning").

    A curvature rule without SOURCE reads ``curvature``; a baseline its own source.
    ``known_sources``: the score methods that exist (checked when given).
    """
    registry = rule_registry(program)
    rule, _, source = str(text).partition(":")
    rule, source = rule.strip().lower(), source.strip()
    if rule not in registry:
        raise LayercapError(f"{program} rule {text!r} is unknown; use one of {', '.join(registry)} "
                            f"(curvature rules as RULE:METHOD, e.g. mdl:kfac).")
    declared = registry[rule].source
    if declared is None or declared == MEASURED:
        if source:
            raise LayercapError(f"rule {text!r}: {rule} reads no scores; write just {rule!r}.")
        return RuleSpec(rule, declared, program)
    source = source or (curvature if declared == CURVATURE else declared)
    if known_sources is not None and source not in known_sources:
        raise LayercapError(f"rule {text!r}: score method {source!r} is not available; choose one of {', '.join(sorted(known_sources))}.")
    return RuleSpec(rule, source, program)


def rule_file(rule: str) -> str:
    """A rule's name as used in file names (``mdl:obd`` -> ``mdl-obd``)."""
    return str(rule).replace(":", "-")


def rule_sources() -> dict[str, str]:
    """rule -> the score method a baseline rule reads (curvature and score-free rules excluded)."""
    return {r.name: r.source for reg in (ALLOCATION_RULES, PRUNING_RULES) for r in reg.values()
            if r.source not in (None, CURVATURE)}


_BASELINE_SOURCES = ("alpha-hill", "owl")


def _source_warning(rule: str, scores: LayerScores) -> list[str]:
    want = rule_sources().get(rule)
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


def allocation_by_rule(rule: str, scores: LayerScores | None, budget: float, *, costs=None, beta: float = 0.9,
                       alpha="auto", lower=1, upper=None, integer: bool = True, unit: str = "experts",
                       utility=None) -> Allocation:
    """Allocate `budget` (in cost units) across the layers of `scores` by `rule`.

    costs: None / "count" / "params" / array (K,). lower/upper: per-layer bounds (scalar or (K,);
    upper None = unbounded). integer: whole units (experts, rank units). Returns Allocation with
    per-layer n, q, cost; mu/binds/spent; gap (integer mdl) and metadata (rule parameters,
    objective, warnings). ``utility``: the UtilityTable that rule ``mdl:measured`` (or ``mdl``
    given a table) reads instead of scores; ``scores`` may then be None or name the same blocks.
    """
    if rule in UTILITY_RULES or (rule == "mdl" and utility is not None):
        from layercap.programs.utility import allocation_from_utility

        if utility is None:
            raise LayercapError(f"rule {rule!r} reads a utility table (`layercap utility MODEL ... -o utility.json`); "
                                "pass it (--utility FILE).")
        if scores is not None:
            utility.check_compatible(scores.names)
        return allocation_from_utility(utility, budget, lower=lower, upper=upper, integer=integer,
                                       costs=costs, unit=unit, rule=UTILITY_RULES[0])
    if rule not in ALLOCATION_RULES:
        raise LayercapError(f"allocation rule {rule!r} is unknown; use one of: {', '.join(ALLOCATION_RULES)}.")
    if unit not in ("experts", "rank", "units"):
        raise LayercapError(f"unit {unit!r} is unknown; use experts, rank or units.")
    c = resolve_costs(costs, scores)
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
    n, mu, binds, spent, gap, extra = ALLOCATION_RULES[rule].solve(
        scores=scores, q=q, w=w, costs=c, lower=l, upper=u, budget=budget, alpha=alpha, beta=beta, integer=integer,
        raw_lower=lower, raw_upper=upper)
    meta.update(extra.pop("meta", {}))
    warnings += extra.pop("warnings", [])
    n = np.asarray(n)
    counts = [int(round(x)) for x in n] if integer else [float(x) for x in n]
    layers = [AllocatedLayer(name, counts[k], float(c[k]), float(q[k])) for k, name in enumerate(scores.names)]
    meta["warnings"] = warnings
    return Allocation(rule=rule, budget=float(budget), unit=unit, integer=bool(integer), layers=layers,
                      mu=None if mu is None else float(mu), binds=bool(binds), spent=float(dot(c, n)), gap=gap, metadata=meta)


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
    options = {"mode": mode, "eta": eta, "p": p, "gamma": gamma, "bits": bits}
    rho, nu, out_mode, extra_meta, extra_warnings = PRUNING_RULES[rule].solve(scores, N, s, lo, hi, options)
    meta.update(extra_meta)
    warnings += extra_warnings
    rho = np.asarray(rho, dtype=np.float64)
    achieved = dot(N, rho) / float(N.sum())
    clipped = int(np.sum((rho <= lo + 1e-12) | (rho >= hi - 1e-12)))
    layers = [RatioLayer(name, float(rho[k]), int(N[k])) for k, name in enumerate(scores.names)]
    return PruningRatios(rule=rule, sparsity=s, mode=out_mode, layers=layers, achieved=float(min(max(achieved, 0.0), 1.0)),
                         nu=nu, clipped=clipped, warnings=warnings, metadata=meta)


def uniform_ratios(names: Sequence[str], params: Sequence[int], sparsity: float) -> PruningRatios:
    """Alias of PruningRatios.uniform (no scores needed)."""
    return PruningRatios.uniform(names, params, sparsity)


# ---- the rules ------------------------------------------------------------------------------
def _allocate_mdl(*, scores, q, w, costs, lower, upper, budget, alpha, beta, integer, raw_lower, raw_upper):
    """The MDL allocation program (SPEC 2): exact integer solution, or the continuous water fill."""
    meta: dict = {}
    if integer:
        sol = allocate_integer(scores.zeta2, budget, costs=costs, beta=beta, alpha=alpha, lower=raw_lower, upper=raw_upper)
        n, mu, binds, spent, gap = sol.n, sol.mu, sol.binds, sol.spent, sol.gap
        meta.update(objective=sol.objective, relaxed_objective=sol.relaxed_objective,
                    relaxation_gap=sol.relaxation_gap, optimal=sol.optimal, alpha_used=sol.alpha, threshold=sol.threshold)
    else:
        sol = _water_fill(w, costs, lower, upper, budget, alpha)
        n, mu, binds, spent, gap = sol.n, sol.mu, sol.binds, sol.spent, None
        meta.update(objective=sol.objective, alpha_used=sol.alpha, level=sol.level)
    warnings = []
    if not binds:
        warnings.append(f"the budget does not bind: MDL spends {spent:g} of {budget:g} "
                        + ("(every layer is at its upper bound)." if alpha == "auto" else "(further units cost more than they gain at this alpha)."))
    return n, mu, binds, spent, gap, {"meta": meta, "warnings": warnings}


def _scaled(weight_fn):
    """An allocation baseline: weights w_k scaled to the budget with the shared rounding."""
    def solve(*, scores, q, w, costs, lower, upper, budget, alpha, beta, integer, raw_lower, raw_upper):
        n = scale_round(weight_fn(q, beta), budget, costs, lower, upper, integer)
        spent = dot(costs, n)
        binds = bool(spent >= budget * (1 - 1e-9) or np.all((n >= upper) | (costs > budget - spent + 1e-9)))
        return n, None, binds, spent, None, {}
    return solve


register_allocation_rule("mdl", _allocate_mdl, CURVATURE, "the MDL capacity program on zeta^2")
register_allocation_rule("uniform", _scaled(lambda q, beta: np.ones(len(q))), None, "the same units in every layer")
register_allocation_rule("proportional", _scaled(lambda q, beta: q), CURVATURE, "units proportional to q_k")
for _pattern in MOLA_PATTERNS:
    register_allocation_rule(_pattern, _scaled(lambda q, beta, _p=_pattern: mola_weights(_p, len(q))), None,
                             f"MoLA depth-quarter pattern {MOLA_PATTERNS[_pattern]}")
def _adversarial_weights(q, beta):
    w = np.zeros(len(q))
    w[np.argsort(q, kind="stable")[:ADVERSARIAL_BLOCKS]] = 1.0
    return w


register_allocation_rule("adversarial", _scaled(_adversarial_weights), CURVATURE,
                         f"control: the budget in the {ADVERSARIAL_BLOCKS} layers of lowest zeta^2")
register_allocation_rule("layerif", _scaled(lambda q, beta: q ** beta), "influence", "LayerIF influence^beta")
register_allocation_rule("alphalora", _scaled(lambda q, beta: q ** beta), "alpha-hill", "AlphaLoRA heavy-tail alpha^beta")


def _prune_mdl(scores, N, s, lo, hi, options):
    sol = pruning_ratios(scores.zeta2, N, s, min_ratio=lo, max_ratio=hi, **options)
    meta = {k: options[k] for k in ("eta", "p", "gamma", "bits")}
    meta.update(objective=sol.objective, binds=sol.binds)
    return sol.rho, sol.nu, options["mode"], meta, list(sol.warnings)


def _prune_uniform(scores, N, s, lo, hi, options):
    return meet_target_shift(np.full(len(N), s), N, s, lo, hi), None, "rule", {}, []


def _prune_owl(scores, N, s, lo, hi, options):
    d = minmax(scores.zeta2) * 2.0 * OWL_LAMBDA
    return meet_target_shift(-d, N, s, lo, hi), None, "rule", {"lambda": OWL_LAMBDA}, []


def _prune_alphapruning(scores, N, s, lo, hi, options):
    return alphapruning_map(scores.zeta2, N, s, lo, hi), None, "rule", {"epsilon": ALPHA_EPS}, []


def _prune_layerif(scores, N, s, lo, hi, options):
    rho = alphapruning_map(savgol_smooth(minmax(scores.zeta2)), N, s, lo, hi)
    return rho, None, "rule", {"epsilon": ALPHA_EPS, "savgol_window": 7, "savgol_order": 3}, []


register_pruning_rule("mdl", _prune_mdl, CURVATURE, "the paper's MDL pruning program on zeta^2")
register_pruning_rule("uniform", _prune_uniform, None, "the target sparsity in every layer")
register_pruning_rule("owl", _prune_owl, "owl", "OWL outlier-weighted ratios")
register_pruning_rule("alphapruning", _prune_alphapruning, "alpha-hill", "AlphaPruning heavy-tail map")
register_pruning_rule("layerif", _prune_layerif, "influence", "LayerIF influence, smoothed, AlphaPruning map")


def _prune_mdl_paper(scores, N, s, lo, hi, options):
    from layercap.programs.atp import mdl_paper_ratios

    rec = mdl_paper_ratios(scores, s, min_ratio=lo, max_ratio=hi, eta=options["eta"], p=options["p"])
    return rec.rho, rec.nu, rec.mode, dict(rec.metadata), list(rec.warnings)


def _measured(name: str):
    def solve(scores, N, s, lo, hi, options):
        raise LayercapError(f"rule {name!r} is decided by pruning the model and measuring it on calibration tokens; "
                            "run it through compare-pruning or the main job (layercap run), not from a scores file.")
    return solve


register_pruning_rule("mdl-paper", _prune_mdl_paper, CURVATURE, "the paper's protocol: zeta^2 program, ratios capped at s + 0.05")
register_pruning_rule("atp", _measured("atp"), MEASURED, "ATP: arithmetic progression over depth, slope by calibration KL")
register_pruning_rule("evopress", _measured("evopress"), MEASURED, "EvoPress: (1+lambda) level-switch search on calibration KL")

# rule -> the score method each baseline reads (kept for callers that need the plain mapping)
RULE_SOURCES = rule_sources()
