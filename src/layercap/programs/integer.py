"""Integer capacity allocation (experts, LoRA rank units): SPEC section 2, "Integer counts".

Unit j -> j+1 at layer k gains alpha w_k (log(j+2) - log(j+1)) for cost c_k, w_k = q_k^beta.
Gains per unit cost, r_kj = w_k log1p(1/(j+1)) / c_k, decrease in j (phi is concave), so the
greedy "take the unit with the best gain per cost next" is a threshold rule: for a threshold
tau it takes, at layer k, every unit with r_kj >= tau, i.e.

    n_k(tau) = clip(floor(1 / expm1(tau c_k / w_k)), l_k, u_k).

We find the smallest tau whose spend fits the budget by bisection on log tau, started from a
narrow bracket around the continuous water level; a layer whose count is the same at both ends
of the bracket is settled, so each step only touches the undecided layers. The remaining
budget is then filled with the next-best units in exact gain order. With equal costs this is exactly the greedy, which is
optimal for a separable concave objective under one budget (gap = 0). With unequal costs it is
a good heuristic; ``relaxation_gap`` = F(integer) - F(continuous optimum) >= F(integer) -
F(integer optimum) certifies how far from optimal it can be.

Fixed alpha: a unit is worth taking only if its net gain alpha w Delta phi - c > 0, i.e.
r > 1/alpha; if those units fit the budget it does not bind (mu = 0). alpha = "auto": spend
the budget on the largest-gain units until no further unit fits (the objective is then
G(n) = sum w log(1+n), alpha being absorbed; the gap is reported in units of G).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from layercap.errors import LayercapError
from layercap.programs._solve import dot
from layercap.programs.allocation import _water_fill, objective, prepare


@dataclass(frozen=True)
class IntegerAllocation:
    """Integer solution. n: (K,) int64. gap: certified bound on suboptimality (0 = optimal)."""

    n: np.ndarray
    mu: float             # budget price implied by the marginal unit (0 when not binding / auto)
    threshold: float      # gain per unit cost of the marginal unit taken (tau)
    alpha: float          # alpha used (auto: 1/tau, the alpha at which the marginal unit breaks even)
    binds: bool           # no further unit fits the budget (auto) / budget limited the greedy
    spent: float
    objective: float      # F(n) for fixed alpha; -G(n) = -sum w log(1+n) for auto
    relaxed_objective: float  # the continuous relaxation's optimum of the same objective
    relaxation_gap: float     # objective - relaxed_objective >= 0
    gap: float                # 0 when provably optimal (equal costs), else relaxation_gap
    optimal: bool


def _whole(x, what):
    x = np.asarray(x, dtype=np.float64)
    fin = np.isfinite(x)
    if np.any(fin & (np.floor(x) != x)):
        raise LayercapError(f"{what} must be whole numbers for an integer allocation (experts, rank units), got {x[fin][np.floor(x[fin]) != x[fin]][0]!r}.")
    return x


def counts_at(tau: float, w, c, l, u) -> np.ndarray:
    """n_k(tau): how many units of each layer have gain per cost >= tau (float array, whole)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        x = tau * c / w
        m = np.floor(1.0 / np.expm1(x))
    m = np.where(w > 0, m, 0.0)
    return np.minimum(np.maximum(m, l), u)


def allocate_integer(q, budget, *, costs=None, beta=0.9, alpha="auto", lower=1, upper=None) -> IntegerAllocation:
    """Integer allocation; q: (K,) scores, budget in cost units. See module docstring."""
    lower = _whole(lower, "lower bound(s)")
    if upper is not None:
        upper = _whole(upper, "upper bound(s)")
    q, w, c, l, u, budget, alpha = prepare(q, budget, costs, beta, alpha, lower, upper)
    # no layer can hold more units than the budget left after the lower bounds pays for
    u = np.minimum(u, l + np.floor((budget - dot(c, l)) / c + 1e-9))
    auto = alpha == "auto"
    tau_min = 0.0 if auto else 1.0 / alpha

    def spend(tau):
        return float(dot(c, counts_at(tau, w, c, l, u)))

    growable = (w > 0) & (u > l)
    # the continuous relaxation with alpha absorbed: a bracket for tau and the gap certificate
    cont = _water_fill(w, c, l, u, budget, "auto")
    if not np.any(growable):
        n = l.copy()
        tau = np.inf
    elif spend(tau_min) <= budget:
        n = counts_at(tau_min, w, c, l, u)
        tau = tau_min
    else:
        # bracket [lo, hi]: spend(lo) > B >= spend(hi)
        first_gain = np.max(w[growable] * np.log1p(1.0 / (l[growable] + 1.0)) / c[growable])
        hi = first_gain * (1 + 1e-12)
        guess = 1.0 / cont.level if cont.level > 0 and np.isfinite(cont.level) else hi
        lo = max(tau_min, 0.0)
        if lo < guess < hi:
            # the integer threshold sits near the continuous one: try a narrow bracket first
            for factor in (1.0, 1.02, 1.25):
                g_lo, g_hi = max(guess / factor, lo), min(guess * factor, hi)
                if g_lo > lo and spend(g_lo) > budget:
                    lo = g_lo
                if g_hi < hi and spend(g_hi) <= budget:
                    hi = g_hi
        if lo == 0.0:
            lo = hi / 2
            while spend(lo) <= budget:
                hi, lo = lo, lo / 2
        n, tau = _bisect(w, c, l, u, budget, lo, hi)
        n, tau = _fill(n, w, c, l, u, budget, tau_min, tau)
    n = n.astype(np.int64)
    spent = float(dot(c, n))
    cheapest_next = c[(n < u) & (w > 0)]
    # every layer at its upper bound: the bounds bind, not the budget (unless it is spent exactly)
    binds = (bool(spent >= budget * (1 - 1e-12)) if cheapest_next.size == 0
             else bool(spent + cheapest_next.min() > budget * (1 + 1e-12))) and (auto or tau > tau_min)
    if auto:
        obj = -float(dot(w, np.log1p(n)))
        relaxed = -float(dot(w, np.log1p(cont.n)))
        alpha_used = 1.0 / tau if np.isfinite(tau) and tau > 0 else 0.0
        mu = 0.0
    else:
        obj = objective(n, w, c, alpha)
        # the budget binds for this alpha iff the auto level is below it: then same allocation
        relaxed = objective(cont.n, w, c, alpha) if cont.binds and cont.level <= alpha else _water_fill(w, c, l, u, budget, alpha).objective
        alpha_used = alpha
        mu = max(alpha * tau - 1.0, 0.0) if np.isfinite(tau) and tau > tau_min else 0.0
    rgap = max(obj - relaxed, 0.0)
    optimal = bool(np.all(c == c[0]))
    return IntegerAllocation(n, float(mu), float(tau) if np.isfinite(tau) else 0.0, float(alpha_used), binds, spent,
                             obj, relaxed, rgap, 0.0 if optimal else rgap, optimal)


def _bisect(w, c, l, u, budget, lo, hi):
    """Counts at the smallest threshold whose spend fits, given spend(lo) > B >= spend(hi).

    Bisection on log tau over a shrinking working set: a layer whose count is the same at both
    ends of the bracket is settled (its spend becomes a constant), so each step costs O(layers
    still undecided) rather than O(K).
    """
    n_hi = counts_at(hi, w, c, l, u)
    n_lo = counts_at(lo, w, c, l, u)
    out = n_hi.copy()
    idx = np.flatnonzero(n_lo != n_hi)
    fixed = dot(c, n_hi) - dot(c.take(idx), n_hi.take(idx))  # spend of the settled layers
    wa, ca, la, ua, nla, nha = (x.take(idx) for x in (w, c, l, u, n_lo, n_hi))
    for _ in range(200):
        # stop at one undecided unit, or when what is left is tied to 1e-10 relative: _fill then
        # takes those units in exact gain order (one per layer, as ties cannot stack in a layer)
        if float(np.sum(nla - nha)) <= 1 or hi <= lo * (1 + 1e-10):
            break
        mid = np.sqrt(lo * hi)
        if not (lo < mid < hi):
            break
        n_mid = counts_at(mid, wa, ca, la, ua)
        if fixed + dot(ca, n_mid) <= budget:
            hi, nha = mid, n_mid
        else:
            lo, nla = mid, n_mid
        same = nla == nha
        if same.any():
            done = np.flatnonzero(same)
            out[idx.take(done)] = nha.take(done)
            fixed += dot(ca.take(done), nha.take(done))
            keep = np.flatnonzero(~same)
            idx = idx.take(keep)
            wa, ca, la, ua, nla, nha = (x.take(keep) for x in (wa, ca, la, ua, nla, nha))
    out[idx] = nha
    return out, hi


def _fill(n, w, c, l, u, budget, tau_min, tau):
    """Spend what is left on the next-best units, best gain per cost first.

    One round offers every layer's next unit; the best-first prefix that fits is taken at once
    (vectorised: with equal costs and ties this is the whole remainder), then later candidates
    that still fit one by one. Rounds repeat while something was taken (a layer may need more
    than one extra unit when many units are tied).
    """
    n = n.copy()
    rem = budget - dot(c, n)
    for _ in range(10_000):
        ok = (n < u) & (w > 0) & (c <= rem * (1 + 1e-12))
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            break
        gain = w[idx] * np.log1p(1.0 / (n[idx] + 1.0)) / c[idx]
        keep = gain > tau_min if tau_min > 0 else gain > 0
        idx, gain = idx[keep], gain[keep]
        if idx.size == 0:
            break
        order = np.argsort(-gain, kind="stable")
        idx, gain = idx[order], gain[order]
        cost = c[idx]
        spend = np.cumsum(cost)
        k = int(np.searchsorted(spend, rem * (1 + 1e-12), side="right"))
        took = k
        if k:
            n[idx[:k]] += 1
            rem -= float(spend[k - 1])
            tau = min(tau, float(gain[k - 1]))
        rest, rest_gain, rest_cost = idx[k:], gain[k:], cost[k:]
        while rest.size:
            fits = np.flatnonzero(rest_cost <= rem * (1 + 1e-12))
            if fits.size == 0:
                break
            j = int(fits[0])
            n[rest[j]] += 1
            rem -= float(rest_cost[j])
            tau = min(tau, float(rest_gain[j]))
            took += 1
            rest, rest_gain, rest_cost = rest[j + 1:], rest_gain[j + 1:], rest_cost[j + 1:]
        if not took:
            break
    return n, tau
