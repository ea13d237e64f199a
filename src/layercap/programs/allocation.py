"""Continuous capacity allocation: curvature-weighted water-filling (SPEC section 2).

    minimise   F(n) = sum_k c_k n_k - alpha sum_k w_k log(1 + n_k),   w_k = q_k^beta
    subject to sum_k c_k n_k <= B,  l_k <= n_k <= u_k

KKT: n_k(mu) = clip(alpha w_k / ((1 + mu) c_k) - 1, l_k, u_k). Only the water level
s = alpha / (1 + mu) enters, and the spend S(s) = sum_k c_k n_k is piecewise linear and
non-decreasing in s, so the root S(s) = B is found exactly by sorting breakpoints (_solve).

Fixed alpha: if S(alpha) <= B the budget does not bind (mu = 0, MDL spends less than B).
Otherwise s* < alpha is the root and mu = alpha / s* - 1 > 0.

alpha = "auto": every alpha >= s* gives the same allocation (the budget binds and mu absorbs
alpha: mu = alpha/s* - 1), so the allocation is determined by the budget alone and equals the
maximiser of sum w_k log(1 + n_k) subject to the budget. We report the smallest such alpha,
alpha = s*, for which mu = 0 and the budget binds exactly (spent = B). If even every layer at
its upper bound costs less than B, B cannot be spent (binds = False, spent < B).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from layercap.errors import LayercapError
from layercap.programs._solve import clipped_linear_root, dot, polish_root


@dataclass(frozen=True)
class WaterFilling:
    """Solution of the continuous program. Arrays have shape (K,); units of n: capacity units."""

    n: np.ndarray
    mu: float            # budget dual price (>= 0); 0 when not binding or alpha="auto"
    level: float         # water level s = alpha / (1 + mu)
    alpha: float         # the alpha used (the smallest binding alpha when alpha="auto")
    binds: bool          # sum c n == B (to round-off)
    spent: float         # sum c n, same unit as the budget
    objective: float     # F(n) with this alpha


def prepare(q, budget, costs=None, beta=0.9, alpha="auto", lower=0.0, upper=None):
    """Validate inputs and broadcast to float arrays (w, c, l, u). Raises LayercapError."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 1 or q.size == 0:
        raise LayercapError("scores must be a non-empty 1-D array (one per layer).")
    if not np.all(np.isfinite(q)) or np.any(q < 0):
        raise LayercapError("scores must be finite and >= 0; re-run scoring (NaN usually means a diverged model).")
    if not q.max() > 0:
        raise LayercapError("every score is 0, so q is undefined; check the calibration data and scoring method.")
    q = q / q.max()  # scale first: the sum of huge scores (1e308 each) would overflow to inf
    q = q / q.sum()
    K = q.size
    if not (isinstance(budget, (int, float, np.number)) and np.isfinite(budget) and budget > 0):
        raise LayercapError(f"budget = {budget!r} must be a finite number > 0 (e.g. --budget 160).")
    if not (np.isfinite(beta) and beta >= 0):
        raise LayercapError(f"beta = {beta!r} must be >= 0 (0 ignores curvature, 1 is proportional; paper: 0.9).")
    if not (isinstance(alpha, str) and alpha == "auto"):
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise LayercapError(f"alpha = {alpha!r} must be 'auto' or a number > 0.") from None
        if not (np.isfinite(alpha) and alpha > 0):
            raise LayercapError(f"alpha = {alpha!r} must be 'auto' or a finite number > 0.")
    c = np.ones(K) if costs is None else np.broadcast_to(np.asarray(costs, dtype=np.float64), (K,)).copy()
    if not np.all(np.isfinite(c)) or np.any(c <= 0):
        raise LayercapError("costs must be finite and > 0 for every layer (use --cost count for 1 per unit).")
    l = np.broadcast_to(np.asarray(lower, dtype=np.float64), (K,)).copy()
    u = np.full(K, np.inf) if upper is None else np.broadcast_to(np.asarray(upper, dtype=np.float64), (K,)).copy()
    if not np.all(np.isfinite(l)) or np.any(l < 0):
        raise LayercapError(f"lower bound(s) must be finite and >= 0, got {lower!r}.")
    if np.any(np.isnan(u)) or np.any(u < l):
        raise LayercapError(f"upper bound(s) {upper!r} must be >= the lower bound(s) {lower!r} (--max >= --min).")
    floor_spend = float(dot(c, l))
    if floor_spend > budget * (1 + 1e-12):
        raise LayercapError(
            f"infeasible: the lower bounds alone cost {floor_spend:g} > budget {budget:g}. "
            "Raise --budget or lower --min."
        )
    with np.errstate(under="ignore"):
        w = q ** beta
    if not np.any(w > 0):
        raise LayercapError(f"beta = {beta:g} makes every weight q^beta underflow to 0 (the largest q is {q.max():.3g}); "
                            "use a smaller --beta (0 ignores curvature, 1 is proportional; paper: 0.9).")
    return q, w, c, l, u, float(budget), alpha


def objective(n, w, c, alpha) -> float:
    """F(n) = sum c n - alpha sum w log(1+n)."""
    return float(dot(c, n) - alpha * dot(w, np.log1p(n)))


def _solve_level(w, c, l, u, budget, side="right") -> float:
    """Water level s with spend(s) = budget; +inf when the budget cannot be spent."""
    a, b = w / c, -np.ones_like(w)
    s = clipped_linear_root(a, b, l, u, c, budget, side=side)
    return polish_root(s, a, b, l, u, c, budget)


def water_fill(q, budget, *, costs=None, beta=0.9, alpha="auto", lower=0.0, upper=None) -> WaterFilling:
    """Solve the continuous allocation program exactly. q: (K,) scores (normalised here)."""
    q, w, c, l, u, budget, alpha = prepare(q, budget, costs, beta, alpha, lower, upper)
    return _water_fill(w, c, l, u, budget, alpha)


def _water_fill(w, c, l, u, budget, alpha) -> WaterFilling:
    def at(s):
        return np.clip(s * w / c - 1.0, l, u)

    if alpha == "auto":
        s = _solve_level(w, c, l, u, budget)
        if s == np.inf:
            # B cannot be spent: every layer that can grow is at its upper bound
            grow = w > 0
            n = np.where(grow, u, l)
            s_eff = float(np.max(c[grow] * (1 + u[grow]) / w[grow]))
            spent = float(dot(c, n))
            return WaterFilling(n, 0.0, s_eff, s_eff, False, spent, objective(n, w, c, s_eff))
        s = max(s, 0.0)
        n = at(s)
        spent = float(dot(c, n))
        return WaterFilling(n, 0.0, s, s, True, spent, objective(n, w, c, s))
    n0 = at(alpha)
    spent0 = float(dot(c, n0))
    if spent0 <= budget:
        binds = spent0 >= budget * (1 - 1e-12)
        return WaterFilling(n0, 0.0, alpha, alpha, binds, spent0, objective(n0, w, c, alpha))
    s = min(max(_solve_level(w, c, l, u, budget), 0.0), alpha)
    n = at(s)
    mu = alpha / s - 1.0 if s > 0 else np.inf
    return WaterFilling(n, float(mu), s, alpha, True, float(dot(c, n)), objective(n, w, c, alpha))
