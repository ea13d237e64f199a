"""Exact root of a sum of clipped linear functions: the one dual search every program needs.

    f(t) = sum_k h_k * clip(a_k t + b_k, lo_k, hi_k),   a_k > 0, h_k > 0

is continuous, piecewise linear and non-decreasing in t, with at most 2K breakpoints
t = (lo_k - b_k)/a_k and (hi_k - b_k)/a_k. Water-filling (allocation: t = alpha/(1+mu)), the
exact-sparsity pruning program (t = ((b+nu)/(p gamma))^(1/(p-1))) and the baseline rules'
rescaling all reduce to f(t) = target. Sorting the breakpoints and accumulating slope and offset
gives the exact root in O(K log K) without iteration; one Newton step on the active set then
removes the round-off of the cumulative sums.
"""

from __future__ import annotations

import numpy as np


def dot(x, y) -> float:
    """Inner product without BLAS: np.dot's threaded BLAS stalls badly on busy shared CPUs
    (measured 20 ms vs 0.1 ms for K = 1e5 here), and K is never large enough to need it."""
    return float(np.multiply(x, y).sum())


def clipped_sum(t: float, a, b, lo, hi, h) -> float:
    """f(t) evaluated directly (all arrays of shape (K,))."""
    return float(dot(h, np.clip(a * t + b, lo, hi)))


def clipped_linear_root(a, b, lo, hi, h, target: float, side: str = "right", *, small: int = 128, seed: int = 0) -> float:
    """t with f(t) = target, exactly (up to the round-off of a few sums).

    side="right": the largest such t (sup of {t: f(t) <= target}); side="left": the smallest
    (inf of {t: f(t) >= target}). They differ only where f is flat at `target`. Returns +inf
    when f never exceeds target (right) / never reaches it (left); -inf when target < inf f
    (right); for side="left" with target <= inf f, the first breakpoint.
    Entries with a_k <= 0 are constants h_k clip(b_k, lo_k, hi_k); hi_k may be +inf.

    Expected O(K), like quickselect: each round evaluates f at a pivot inside the bracket
    [tl, th] that holds the root (the median of a random sample of the remaining breakpoints,
    or, once both ends are finite, the linear interpolation of f plus a probe just beyond it);
    layers whose both breakpoints fall outside the bracket become a constant or a linear term
    and leave the working set. When at most `small` layers remain, their breakpoints are
    sorted and walked. `seed` fixes the pivot sample (and so the last bits of t).
    """
    with np.errstate(over="ignore"):  # slopes spanning 1e+-300 overflow harmlessly to inf
        return _root(a, b, lo, hi, h, target, side, small, seed)


def _root(a, b, lo, hi, h, target, side, small, seed) -> float:
    """The body of clipped_linear_root (under np.errstate)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), a.shape)
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), a.shape)
    h = np.broadcast_to(np.asarray(h, dtype=np.float64), a.shape)
    const_mask = a <= 0
    if np.any(const_mask):
        cidx = np.flatnonzero(const_mask)
        const = dot(h.take(cidx), np.clip(b.take(cidx), lo.take(cidx), hi.take(cidx)))
        var = np.flatnonzero(~const_mask)
        a, b, lo, hi, h = (x.take(var) for x in (a, b, lo, hi, h))
    else:
        const = 0.0
        lo, hi, h = (np.ascontiguousarray(x) for x in (lo, hi, h))
    if a.size == 0:
        return np.inf if target >= const else -np.inf
    with np.errstate(over="ignore"):
        t_lo = (lo - b) / a
        t_hi = (hi - b) / a  # +inf where hi is +inf
    f_min = const + dot(h, lo)
    if target < f_min:
        if target < f_min - 1e-12 * abs(f_min):
            return -np.inf if side == "right" else float(t_lo.min())
        target = f_min  # the same number summed in another order
    if side == "left" and target <= f_min:
        return float(t_lo.min())
    lin_s = lin_b = 0.0  # layers linear on the whole bracket: sum h a, sum h b
    tl, th = -np.inf, np.inf
    f_tl = f_th = g_tl = g_th = np.nan  # f at the bracket ends once finite; g: Illinois-adjusted
    rng = np.random.default_rng(seed)
    rounds = 0
    while a.size > small:
        rounds += 1
        pivots = []
        if rounds == 1 and a.size > 16 * small:
            pivots = _sample_bracket(a, b, lo, hi, h, t_lo, t_hi, target - const, side, rng, seed)
        elif np.isfinite(tl) and np.isfinite(th) and g_th > g_tl and rounds % 4:
            # interpolate (regula falsi with the Illinois correction: an end that survives
            # twice has its f-value pulled halfway to the target, so both ends converge), and
            # probe a little to either side so that a good guess moves both ends at once
            guess = tl + (target - g_tl) * (th - tl) / (g_th - g_tl)
            step = 0.02 * (th - tl)
            pivots = [p for p in (guess - step, guess + step) if tl < p < th]
        if not pivots:
            n = a.size
            idx = rng.integers(0, 2 * n, 31)
            cand = np.where(idx < n, t_lo[idx % n], t_hi[idx % n])
            cand = cand[(cand > tl) & (cand < th)]
            if cand.size == 0:
                ev = np.concatenate([t_lo, t_hi])
                cand = ev[(ev > tl) & (ev < th)]
                if cand.size == 0:
                    break
                cand = cand[rng.integers(0, cand.size, 31)]
            pivots = [float(np.median(cand))]
        moved_l = moved_h = False
        for pivot in pivots:
            if not tl < pivot < th:
                continue
            fp = const + lin_s * pivot + lin_b + dot(h, np.minimum(np.maximum(a * pivot + b, lo), hi))
            if (fp > target) if side == "right" else (fp >= target):
                th, f_th, moved_h = pivot, fp, True
            else:
                tl, f_tl, moved_l = pivot, fp, True
        g_tl = f_tl if moved_l or not moved_h else target + (g_tl - target) / 2
        g_th = f_th if moved_h or not moved_l else target + (g_th - target) / 2
        # re-classify: fixed at hi, fixed at lo, linear throughout, or still undetermined.
        # (index arrays + take: boolean-mask indexing is ~4x slower on random masks)
        at_hi = np.flatnonzero(t_hi <= tl)
        at_lo = np.flatnonzero(t_lo >= th)
        linear = np.flatnonzero((t_lo <= tl) & (t_hi >= th))
        if at_hi.size + at_lo.size + linear.size == 0:
            continue
        const += dot(h.take(at_hi), hi.take(at_hi)) + dot(h.take(at_lo), lo.take(at_lo))
        lin_s += dot(h.take(linear), a.take(linear))
        lin_b += dot(h.take(linear), b.take(linear))
        keep = np.flatnonzero((t_hi > tl) & (t_lo < th) & ((t_lo > tl) | (t_hi < th)))
        a, b, lo, hi, h, t_lo, t_hi = (x.take(keep) for x in (a, b, lo, hi, h, t_lo, t_hi))

    # exact walk over the remaining breakpoints inside the bracket
    events = np.concatenate([t_lo, t_hi[np.isfinite(t_hi)]])
    events = events[(events > tl) & (events < th)]
    if np.isfinite(tl):
        start = tl
    elif events.size:
        start = float(events.min())  # f is constant (= f_min) left of it
    else:
        start = th if np.isfinite(th) else 0.0
    f_start = const + lin_s * start + lin_b + dot(h, np.minimum(np.maximum(a * start + b, lo), hi))
    points = np.concatenate([[start], np.sort(events[events > start])])
    # slope right of each point, summed over the layers active there (not a running sum of
    # +/- deltas, which cancels catastrophically when slopes span many orders of magnitude)
    ha = h * a
    active = (t_lo[None, :] <= points[:, None]) & (t_hi[None, :] > points[:, None])
    slope_after = lin_s + (active * ha[None, :]).sum(axis=1)
    return _walk(points, f_start, slope_after, target, side, th)


def _sample_bracket(a, b, lo, hi, h, t_lo, t_hi, target, side, rng, seed, m: int = 2048) -> list[float]:
    """Two pivots that bracket the root with high probability (Floyd-Rivest style).

    Solves the problem exactly on a random sample of m layers (target scaled by m/K), then
    returns the sample breakpoints about 3 standard deviations of rank on either side of the
    sample's root: one O(K) evaluation each then usually leaves a few percent of the layers.
    """
    n = a.size
    idx = rng.integers(0, n, m)
    t_est = _root(a[idx], b[idx], lo[idx], hi[idx], h[idx], target * m / n, side, 128, seed)
    if not np.isfinite(t_est):
        return []
    ev = np.concatenate([t_lo[idx], t_hi[idx]])
    ev = np.sort(ev[np.isfinite(ev)])
    pos = int(np.searchsorted(ev, t_est))
    r = int(3 * np.sqrt(ev.size)) + 1
    return sorted({float(ev[max(pos - r, 0)]), float(ev[min(pos + r, ev.size - 1)])})


def _walk(points, f_start, slope_after, target, side, th) -> float:
    """Root of a piecewise-linear f given sorted points, f(points[0]) and the slope right of each."""
    f_at = f_start + np.concatenate([[0.0], np.cumsum(slope_after[:-1] * np.diff(points))])
    j = int(np.searchsorted(f_at, target, side="right" if side == "right" else "left"))
    if j == 0:
        return float(points[0])
    if j == len(points):
        s = slope_after[-1]
        if s <= 0:
            return float(th) if np.isfinite(th) else np.inf
        return float(min(points[-1] + (target - f_at[-1]) / s, th))
    s = slope_after[j - 1]
    if s <= 0:
        return float(points[j - 1] if side == "left" else points[j])
    t = points[j - 1] + (target - f_at[j - 1]) / s
    return float(min(max(t, points[j - 1]), points[j]))


def polish_root(t: float, a, b, lo, hi, h, target: float, steps: int = 2) -> float:
    """Newton steps on the active set: removes cumulative-sum round-off from an exact root."""
    if not np.isfinite(t):
        return t
    for _ in range(steps):
        x = a * t + b
        active = (x > lo) & (x < hi) & (a > 0)
        slope = float(np.where(active, h * a, 0.0).sum())
        if slope <= 0:
            break
        r = target - dot(h, np.minimum(np.maximum(x, lo), hi))
        if r == 0:
            break
        t = t + r / slope
    return t
