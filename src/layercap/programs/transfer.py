"""Transfer regret between score sets, with the Theorem-4 bound (SPEC section 4).

Deciding with source scores q_S on a target whose scores are q_T costs

    R = F(x*(q_S); q_T) - F(x*(q_T); q_T) >= 0            (x* minimises F over the feasible set)

and, when the theorem's assumptions hold, R <= (L/2) (L_q/m)^2 ||q_T - q_S||^2.

Where the constants are taken. The proof needs (i) strong monotonicity of grad F(.; q_T) with
constant m between x_S = x*(q_S) and x_T = x*(q_T), (ii) grad_x F Lipschitz in q with constant
L_q at x_S, for q on the segment [q_S, q_T], and (iii) L-smoothness of F(.; q_T) on the segment
[x_T, x_S]; then ||x_S - x_T|| <= (L_q/m) ||q_S - q_T|| (this step holds for any convex feasible
set) and R <= <grad F_T(x_T), x_S - x_T> + (L/2)||x_S - x_T||^2. The first term vanishes when
x_T is interior (no bound active) and the resource constraint either binds for both solutions
(both spend the same) or not for the target (zero dual). We evaluate m and L over the box
spanned by the two solutions (a sub-box of the feasible box where the argument needs them; it
stays finite when an upper bound is infinite) and L_q with the SPEC formulas:

- allocation: Hessian diag alpha q_k^beta / (1 + n_k)^2; L_q = max_k alpha beta g_k / (1 + l_k),
  g_k = max of xi^(beta-1) for xi between q_S,k and q_T,k (beta >= 1: the larger; beta < 1: the
  smaller, which must be > 0: "beta < 1 needs q_min > 0").
  alpha = "auto" absorbs alpha into the budget price: both solutions spend B exactly and
  minimise F for any alpha on {spend = B}; we evaluate F and the constants with the target's
  auto alpha.
- pruning: Hessian diag gamma p (p-1) q_k^eta rho_k^(p-2) (p = 2: 2 gamma q_k^eta);
  L_q = gamma eta p max_k g_k rho_max^(p-1) with g_k the max of xi^(eta-1) on the segment
  (p = 2: 2 gamma eta max q^(eta-1) rho_max, as in SPEC). In mode "exact" the model-size term
  sum b N (1 - rho) is the same constant for every feasible rho, so it is evaluated at its exact
  value b (1 - s) sum N for both solutions (the solver meets the target to ~1e-15, but b N ~ 1e8
  would turn that round-off into spurious regret).

Assumption failures are reported in ``assumption_notes`` (and ``assumptions_hold`` = False);
the bound is then still computed where finite but need not hold.
"""

from __future__ import annotations

import numpy as np

from layercap.errors import LayercapError
from layercap.programs._solve import dot
from layercap.programs.allocation import _water_fill, prepare
from layercap.programs.pruning import pruning_ratios
from layercap.programs.records import TransferLayer, TransferResult
from layercap.scorefile import LayerScores

_INTERIOR_TOL = 1e-9


def _seg_max_pow(qs, qt, e):
    """max over xi in [min(qs,qt), max(qs,qt)] of xi^e (elementwise); inf where xi can be 0, e < 0."""
    lo, hi = np.minimum(qs, qt), np.maximum(qs, qt)
    with np.errstate(divide="ignore"):
        return hi ** e if e >= 0 else lo ** e


def _finite_or_none(x):
    x = float(x)
    return x if np.isfinite(x) else None


def allocation_regret(q_source, q_target, budget, *, costs=None, beta=0.9, alpha="auto", lower=0.0, upper=None):
    """Regret, bound and diagnostics for the continuous allocation program.

    Returns dict with regret, bound, constants, notes, x_source, x_target, objectives.
    """
    qs, ws, c, l, u, budget, alpha = prepare(q_source, budget, costs, beta, alpha, lower, upper)
    qt, wt, *_ = prepare(q_target, budget, costs, beta, alpha, lower, upper)
    if qs.shape != qt.shape:
        raise LayercapError(f"source has {qs.size} layers, target {qt.size}: transfer needs the same layers in the same order.")
    sol_s = _water_fill(ws, c, l, u, budget, alpha)
    sol_t = _water_fill(wt, c, l, u, budget, alpha)
    a = sol_t.alpha  # auto: the target's alpha (see module docstring)
    xs, xt = sol_s.n, sol_t.n
    # F_T(x_S) - F_T(x_T), evaluated as a difference term by term (log1p of the ratio) for accuracy
    regret = dot(c, xs - xt) - a * dot(wt, np.log1p((xs - xt) / (1.0 + xt)))
    notes: list[str] = []
    lo_box, hi_box = np.minimum(xs, xt), np.maximum(xs, xt)
    hess_min = a * wt / (1.0 + hi_box) ** 2
    hess_max = a * wt / (1.0 + lo_box) ** 2
    m, L = float(hess_min.min()), float(hess_max.max())
    g = _seg_max_pow(qs, qt, beta - 1.0)
    L_q = float(np.max(a * beta * g / (1.0 + l)))
    if beta < 1 and np.any(np.minimum(qs, qt) <= 0):
        notes.append("beta < 1 with a zero score: grad F is not Lipschitz in q near q = 0 (needs q_min > 0).")
    if m <= 0:
        notes.append("a target score is 0, so F is not strongly convex in that layer (m = 0).")
    at_bound = (np.abs(xt - l) <= _INTERIOR_TOL * (1 + l)) | (np.isfinite(u) & (np.abs(xt - u) <= _INTERIOR_TOL * (1 + np.abs(u))))
    if np.any(at_bound):
        notes.append(f"target solution not interior: {int(at_bound.sum())} layer(s) at a bound (--min/--max).")
    if sol_t.mu > 0 and abs(sol_s.spent - sol_t.spent) > 1e-9 * budget:
        notes.append("the budget binds for the target but the two solutions spend different amounts.")
    if alpha == "auto" and not (sol_s.binds and sol_t.binds):
        notes.append("alpha = auto but the budget cannot be spent (all layers at their upper bounds).")
    return _finish("allocation", regret, m, L, L_q, qs, qt, xs, xt, notes,
                   obj_s=sol_t.objective + regret, obj_t=sol_t.objective,
                   extra={"mu_source": sol_s.mu, "mu_target": sol_t.mu, "alpha": a, "beta": beta, "budget": budget})


def pruning_regret(q_source, q_target, params, sparsity, *, mode="exact", eta=1.0, p=2.0, gamma=1.0, bits=16.0,
                   min_ratio=0.0, max_ratio=1.0):
    kw = dict(mode=mode, eta=eta, p=p, gamma=gamma, bits=bits, min_ratio=min_ratio, max_ratio=max_ratio)
    sol_s = pruning_ratios(q_source, params, sparsity, **kw)
    sol_t = pruning_ratios(q_target, params, sparsity, **kw)
    qs = np.asarray(q_source, dtype=np.float64); qs = qs / qs.sum()
    qt = np.asarray(q_target, dtype=np.float64); qt = qt / qt.sum()
    N = np.asarray(params, dtype=np.float64)
    xs, xt = sol_s.rho, sol_t.rho
    qe = qt ** eta
    curv = gamma * dot(qe, xs ** p - xt ** p)
    size = 0.0 if mode == "exact" else -bits * dot(N, xs - xt)
    regret = size + curv
    notes: list[str] = []
    lo_box, hi_box = np.minimum(xs, xt), np.maximum(xs, xt)
    with np.errstate(divide="ignore", invalid="ignore"):
        if p == 2:
            hmin = hmax = 2.0 * gamma * qe
        elif p < 2:
            hmin = gamma * p * (p - 1) * qe * hi_box ** (p - 2)
            hmax = gamma * p * (p - 1) * qe * lo_box ** (p - 2)
        else:
            hmin = gamma * p * (p - 1) * qe * lo_box ** (p - 2)
            hmax = gamma * p * (p - 1) * qe * hi_box ** (p - 2)
    m, L = float(np.min(hmin)), float(np.max(hmax))
    if p != 2:
        notes.append(f"p = {p} != 2: the bound's constants use the Hessian over the box between the two solutions (an extension).")
    g = _seg_max_pow(qs, qt, eta - 1.0)
    L_q = float(gamma * eta * p * np.max(g) * max_ratio ** (p - 1))
    if eta < 1 and eta > 0 and np.any(np.minimum(qs, qt) <= 0):
        notes.append("eta < 1 with a zero score: grad F is not Lipschitz in q near q = 0 (needs q_min > 0).")
    if not m > 0:
        notes.append("F is not strongly convex over the region (a zero score, or rho = 0 with p > 2): m = 0.")
    at_bound = (xt <= min_ratio + _INTERIOR_TOL) | (xt >= max_ratio - _INTERIOR_TOL)
    if np.any(at_bound):
        notes.append(f"target solution not interior: {int(at_bound.sum())} layer(s) at a ratio bound.")
    if mode == "at-least" and not sol_t.binds:
        notes.append("at-least mode: the sparsity constraint does not bind for the target (degenerate program).")
    if mode == "at-least" and sol_t.binds and abs(sol_s.achieved - sol_t.achieved) > 1e-9:
        notes.append("at-least mode: the constraint binds for the target but the two solutions prune different amounts.")
    obj_t = (bits * (1.0 - sparsity) * float(N.sum()) + gamma * dot(qe, xt ** p)) if mode == "exact" else sol_t.objective
    return _finish("pruning", regret, m, L, L_q, qs, qt, xs, xt, notes, obj_s=obj_t + regret, obj_t=obj_t,
                   extra={"nu_source": sol_s.nu, "nu_target": sol_t.nu, "mode": mode, "eta": eta, "p": p,
                          "gamma": gamma, "bits": bits, "sparsity": sparsity})


def _finish(program, regret, m, L, L_q, qs, qt, xs, xt, notes, obj_s, obj_t, extra):
    d2 = float(np.sum((qt - qs) ** 2))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bound = 0.5 * L * (L_q / m) ** 2 * d2 if m > 0 else np.inf
    if d2 == 0:
        bound = 0.0
    bound = _finite_or_none(bound)
    if bound is None and not any("L_q" in n or "Lipschitz" in n or "m = 0" in n for n in notes):
        notes.append("a bound constant is infinite or undefined (m = 0, L or L_q infinite).")
    holds = None if bound is None else bool(regret <= bound * (1 + 1e-9) + 1e-12 * max(1.0, abs(obj_t)))
    return {
        "program": program, "regret": float(regret), "bound": bound, "bound_holds": holds,
        "assumptions_hold": not notes, "notes": notes,
        "constants": {"m": _finite_or_none(m), "L": _finite_or_none(L), "L_q": _finite_or_none(L_q)},
        "q_distance2": d2, "objective_source": float(obj_s), "objective_target": float(obj_t),
        "q_source": qs, "q_target": qt, "x_source": xs, "x_target": xt, "extra": extra,
    }


def transfer(source: LayerScores, target: LayerScores, program: str = "allocation", **options) -> TransferResult:
    """Regret of using `source` scores on `target` (same layer names, same order).

    program="allocation": options of water_fill (budget required, costs, beta, alpha, lower,
    upper); costs default to the target file's costs, else 1. program="pruning": options of
    pruning_ratios (sparsity required, mode, eta, p, gamma, bits, min_ratio, max_ratio); N_k is
    the target's params.
    """
    if source.names != target.names:
        diff = next((f"{a!r} vs {b!r}" for a, b in zip(source.names, target.names) if a != b), f"{len(source)} vs {len(target)} layers")
        raise LayercapError(f"source and target scores must list the same layers in the same order ({diff}). "
                            "Score both models with the same --blocks granularity.")
    if program == "allocation":
        if "budget" not in options:
            raise LayercapError("transfer --program allocation needs --budget.")
        opts = dict(options)
        if opts.get("costs") is None:
            opts["costs"] = target.costs()
        r = allocation_regret(source.zeta2, target.zeta2, **opts)
    elif program == "pruning":
        if "sparsity" not in options:
            raise LayercapError("transfer --program pruning needs --sparsity.")
        opts = dict(options)
        r = pruning_regret(source.zeta2, target.zeta2, target.params, opts.pop("sparsity"), **opts)
    else:
        raise LayercapError(f"unknown program {program!r}; use allocation or pruning.")
    layers = [TransferLayer(n, a, b, x, y) for n, a, b, x, y in
              zip(target.names, r["q_source"], r["q_target"], r["x_source"], r["x_target"])]
    extra = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r["extra"].items()}
    return TransferResult(
        program=program, regret=r["regret"], bound=r["bound"], bound_holds=r["bound_holds"],
        assumptions_hold=r["assumptions_hold"], assumption_notes=r["notes"], constants=r["constants"],
        q_distance2=r["q_distance2"], objective_source=r["objective_source"], objective_target=r["objective_target"],
        layers=layers, metadata={"source_method": source.method, "target_method": target.method, **extra},
    )
