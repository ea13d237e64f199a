"""Per-layer pruning ratios under a global sparsity target (SPEC section 3).

    minimise   F(rho) = sum_k b N_k (1 - rho_k) + gamma sum_k q_k^eta rho_k^p
    subject to sum_k N_k rho_k >= s sum_k N_k        (mode "at-least", the paper's program)
               sum_k N_k rho_k  = s sum_k N_k        (mode "exact", the default)
               rho_min <= rho_k <= rho_max

Stationarity: rho_k = clip(t a_k, rho_min, rho_max) with a_k = (N_k / q_k^eta)^(1/(p-1)) and
t = ((b + nu) / (p gamma))^(1/(p-1)). The achieved sparsity is piecewise linear and
non-decreasing in t, so t is found exactly by sorting breakpoints (_solve), then polished so
the target is met to round-off (|achieved - s| <= 1e-12 in practice; tests assert 1e-9).

- exact: nu ranges over [-b, inf); t is set by the target alone, so the ratios do not depend
  on b or gamma: low-gain (small q) and large blocks are pruned hardest.
- at-least: nu >= 0, i.e. t >= t0 = (b / (p gamma))^(1/(p-1)). With raw parameter counts t0 a_k
  is usually far above 1, every block ends at rho_max and the achieved sparsity exceeds s: the
  constraint does not bind (nu = 0). We report the achieved sparsity, the clipped count, and
  warn when it does not bind or when every block sits at a bound (degenerate).

Layers with q_k = 0 (and eta > 0) have no gain to protect: a_k = inf, so they are pruned
first, to rho_max. If the target is below what those layers alone reach at rho_max (others at
rho_min), they share the target in proportion to their size (a common ratio) instead.
Computations are in log space, so tiny q or p close to 1 do not overflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from layercap.errors import LayercapError
from layercap.programs._solve import clipped_linear_root, dot, polish_root

MODES = ("exact", "at-least")


@dataclass(frozen=True)
class RatioSolution:
    """rho: (K,) ratios in [rho_min, rho_max]; achieved = sum N rho / sum N."""

    rho: np.ndarray
    nu: float | None      # sparsity dual (None when infinite / undefined)
    achieved: float
    clipped: int          # layers at rho_min or rho_max
    binds: bool
    objective: float      # F(rho)
    warnings: list[str] = field(default_factory=list)


def validate(q, params, sparsity, *, mode="exact", eta=1.0, p=2.0, gamma=1.0, bits=16.0,
             min_ratio=0.0, max_ratio=1.0):
    q = np.asarray(q, dtype=np.float64)
    N = np.asarray(params, dtype=np.float64)
    if q.ndim != 1 or q.size == 0 or N.shape != q.shape:
        raise LayercapError("scores and params must be 1-D arrays of the same non-zero length (one per layer).")
    if not np.all(np.isfinite(q)) or np.any(q < 0) or not q.max() > 0:
        raise LayercapError("scores must be finite, >= 0 and not all 0; re-run scoring.")
    q = q / q.max()  # scale first: the sum of huge scores (1e308 each) would overflow to inf
    if not np.all(np.isfinite(N)) or np.any(N < 1):
        raise LayercapError("params must be >= 1 for every layer (prunable weights per block).")
    if mode not in MODES:
        raise LayercapError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)} (--mode exact is the default).")
    if not (np.isfinite(p) and p > 1):
        raise LayercapError(f"p = {p!r} must be > 1 (psi(rho) = rho^p must be strictly convex; the paper uses 2).")
    if not (np.isfinite(eta) and eta >= 0):
        raise LayercapError(f"eta = {eta!r} must be >= 0 (0 ignores the scores; paper: 1).")
    if not (np.isfinite(gamma) and gamma > 0):
        raise LayercapError(f"gamma = {gamma!r} must be > 0.")
    if not (np.isfinite(bits) and bits > 0):
        raise LayercapError(f"bits = {bits!r} must be > 0 (bits per retained weight, 16 for fp16).")
    if not (0.0 <= min_ratio <= max_ratio <= 1.0):
        raise LayercapError(f"need 0 <= --min-ratio ({min_ratio}) <= --max-ratio ({max_ratio}) <= 1.")
    if not (np.isfinite(sparsity) and min_ratio <= sparsity <= max_ratio):
        raise LayercapError(
            f"sparsity {sparsity!r} is outside [min_ratio, max_ratio] = [{min_ratio}, {max_ratio}]: "
            "no ratios in those bounds reach it. Change --sparsity or the ratio bounds."
        )
    return q / q.sum(), N


def objective(rho, q, N, *, eta=1.0, p=2.0, gamma=1.0, bits=16.0) -> float:
    """F(rho) = sum b N (1 - rho) + gamma sum q^eta rho^p (bits)."""
    qe = q if eta == 1 else q ** eta  # float powers cost ~10x a product at K = 1e5
    rp = rho * rho if p == 2 else rho ** p
    return float(bits * dot(N, 1.0 - rho) + gamma * dot(qe, rp))


def _log_a(q, N, eta, p):
    """log a_k; +inf where q_k = 0 and eta > 0."""
    with np.errstate(divide="ignore"):
        return (np.log(N) - eta * np.log(q)) / (p - 1.0) if eta > 0 else np.log(N) / (p - 1.0)


def _exact_rho(log_a, N, target, lo, hi):
    """rho_k = clip(t a_k) with sum N rho = target; returns (rho, log t or None).

    a may span any dynamic range: layers are solved in scale groups (separated by gaps of more
    than e^40 in a). The group with the largest a is solved first with the others held at lo
    (they move by less than 1e-17 relative while the group is unsaturated); if the whole group
    saturates at hi before the target is met, it is fixed at hi and the next group solved.
    Zero-score layers (log a = +inf) come first, at a common ratio (see module docstring).
    """
    rho = np.full(log_a.shape, lo)
    zero = ~np.isfinite(log_a)
    if np.any(zero):
        need = target - lo * float(N[~zero].sum())
        if need <= hi * float(N[zero].sum()):
            rho[zero] = np.clip(need / float(N[zero].sum()), lo, hi)
            return rho, None
        rho[zero] = hi
    todo = ~zero
    fixed = float(dot(N[zero], rho[zero]))
    while np.any(todo):
        # next scale group: the largest log a, down to the first gap > 40 (e^40 ~ 2e17, so the
        # layers below stay at lo to round-off while the group moves) or a span of 600 (exp
        # must neither underflow nor t overflow)
        vals = log_a[todo]
        shift, floor_val = float(vals.max()), float(vals.min())
        if shift - floor_val > 40:  # only then can there be a gap (sorting is the costly part)
            vals = np.sort(vals)[::-1]
            cut = np.flatnonzero((vals[0] - vals > 600) | (np.concatenate([[0.0], -np.diff(vals)]) > 40))
            floor_val = vals[cut[0] - 1] if cut.size else vals[-1]
        group = todo & (log_a >= floor_val)
        rest = todo & ~group
        a = np.where(group, np.exp(np.where(group, log_a, shift) - shift), 0.0)
        goal = target - fixed - lo * float(N[rest].sum())
        ag, Ng = a[group], N[group]
        lo_v, hi_v, zeros = np.full(ag.shape, lo), np.full(ag.shape, hi), np.zeros(ag.shape)
        if goal < hi * float(Ng.sum()) or not np.any(rest):
            t = clipped_linear_root(ag, zeros, lo_v, hi_v, Ng, goal, side="left")
            t = polish_root(t, ag, zeros, lo_v, hi_v, Ng, goal)
            if not np.isfinite(t) or t <= 0:
                rho[group] = hi if t == np.inf else lo
                return rho, None
            rho[group] = np.clip(t * ag, lo, hi)
            return rho, float(np.log(t) - shift)
        rho[group] = hi
        fixed += hi * float(Ng.sum())
        todo = rest
    return rho, None


def _rho(log_t, log_a, lo, hi):
    with np.errstate(over="ignore", invalid="ignore"):
        return np.clip(np.exp(log_t + log_a), lo, hi)


def pruning_ratios(q, params, sparsity, *, mode="exact", eta=1.0, p=2.0, gamma=1.0, bits=16.0,
                   min_ratio=0.0, max_ratio=1.0) -> RatioSolution:
    """Solve the pruning program. q: (K,) scores, params: (K,) prunable weights N_k."""
    q, N = validate(q, params, sparsity, mode=mode, eta=eta, p=p, gamma=gamma, bits=bits,
                    min_ratio=min_ratio, max_ratio=max_ratio)
    lo, hi, s = float(min_ratio), float(max_ratio), float(sparsity)
    target = s * float(N.sum())
    log_a = _log_a(q, N, eta, p)
    warnings: list[str] = []
    log_t0 = np.log(bits / (p * gamma)) / (p - 1.0)  # nu = 0

    def nu_of(log_t):
        with np.errstate(over="ignore"):
            val = p * gamma * np.exp((p - 1.0) * log_t) - bits
        return float(val) if np.isfinite(val) else None

    rho0 = _rho(log_t0, log_a, lo, hi) if mode == "at-least" else None
    if mode == "at-least" and float(dot(N, rho0)) >= target * (1 - 1e-12):
        rho, nu, binds = rho0, 0.0, False
        ach = float(dot(N, rho)) / N.sum()
        warnings.append(
            f"the sparsity constraint does not bind: the literal (at-least) program prunes to {ach:.4f} > target {s:.4f} "
            "(the model-size term rewards pruning). Use --mode exact to meet the target, or lower --max-ratio."
        )
    else:
        rho, log_t = _exact_rho(log_a, N, target, lo, hi)
        nu = nu_of(log_t) if log_t is not None else None
        if mode == "at-least" and nu is not None:
            nu = max(nu, 0.0)
        binds = True
    tol = 1e-12
    at_bound = (rho <= lo + tol) | (rho >= hi - tol)
    clipped = int(at_bound.sum())
    if clipped == rho.size and rho.size > 1:
        warnings.append(
            f"degenerate solution: every layer ({clipped}) sits at a ratio bound [{lo}, {hi}], so the ratios "
            "carry no score information." + (" Try --mode exact." if mode == "at-least" else " Widen --min-ratio/--max-ratio.")
        )
    achieved = float(dot(N, rho) / N.sum())
    obj = objective(rho, q, N, eta=eta, p=p, gamma=gamma, bits=bits)
    return RatioSolution(rho, nu, achieved, clipped, binds, obj, warnings)
