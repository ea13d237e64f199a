"""The programs against cvxpy (CLARABEL) on random instances, plus direct KKT checks.

220 instances per program (allocation: fixed and auto alpha; pruning: exact and at-least),
K from 2 to 512, random costs, bounds, beta, eta, p. On every instance our objective must never
be worse than cvxpy's by more than 1e-7 (relative) and the KKT conditions must hold; it must
agree with cvxpy within 1e-7 on at least 90% of each chunk (where it does not, ours is the
better one: CLARABEL stopped early; measured: 220/220 allocation and 208/220 pruning agree).
"""

import cvxpy as cp  # a test dependency (pyproject [test]); no skip: a missing cvxpy must fail loudly
import numpy as np
import pytest

from layercap.programs.allocation import water_fill
from layercap.programs.pruning import pruning_ratios

pytestmark = pytest.mark.filterwarnings("ignore:Solution may be inaccurate:UserWarning")

REL = 1e-7
CHUNKS = 10
PER_CHUNK = 22  # 220 instances per program


def _solve(prob):
    """CLARABEL with tight tolerances, falling back to its defaults when those fail to converge."""
    try:
        prob.solve(solver="CLARABEL", tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, max_iter=400)
        if prob.status == "optimal":
            return
    except cp.error.SolverError:
        pass
    prob.solve(solver="CLARABEL")
    assert prob.status in ("optimal", "optimal_inaccurate"), prob.status


class Agreement:
    """Our objective may beat cvxpy's by more than REL where CLARABEL stops early (our KKT
    conditions are checked separately, which certifies optimality); it must never be worse by
    more than REL, and it must agree within REL on the great majority of instances."""

    def __init__(self):
        self.total = self.agree = 0

    def check(self, ours, ref, scale, better, info):
        tol = REL * scale + 1e-10
        assert (ours <= ref + tol) if better == "lower" else (ours >= ref - tol), ("worse than cvxpy", info, ours, ref)
        self.total += 1
        self.agree += abs(ours - ref) <= tol

    def done(self):
        assert self.agree >= 0.9 * self.total, f"only {self.agree}/{self.total} instances agree with cvxpy within {REL}"


def _K(rng, i):
    # mostly small instances (cvxpy is fast there), a few large ones
    return int(rng.choice([256, 512])) if i % 40 == 39 else int(rng.integers(2, 65))


def _alloc_instance(seed, i):
    rng = np.random.default_rng([seed, i])
    K = _K(rng, i)
    # scores spread over ~2 decades (CLARABEL itself becomes unreliable when q^beta spans ~1e-12;
    # such extremes are covered by the KKT property tests, which need no reference solver)
    z = 0.01 + rng.random(K) ** rng.uniform(0.5, 2)
    if rng.random() < 0.2:
        z[rng.integers(0, K)] = 0.0
    costs = rng.uniform(0.2, 5.0, K) if rng.random() < 0.7 else np.ones(K)
    lower = rng.integers(0, 3, K).astype(float) if rng.random() < 0.5 else 0.0
    upper = (np.asarray(lower) + rng.uniform(1, 20, K)) if rng.random() < 0.5 else None
    beta = float(rng.uniform(0, 2))
    floor = float(np.sum(costs * np.broadcast_to(lower, (K,))))
    budget = floor + float(rng.uniform(0.5, 10)) * float(costs.sum())
    alpha = "auto" if rng.random() < 0.5 else float(rng.uniform(1, 200))
    return z, costs, lower, upper, beta, budget, alpha


def _check_alloc_kkt(sol, w, c, l, u, B, alpha):
    n = sol.n
    assert np.all(n >= l - 1e-12) and np.all(n <= u + 1e-9)
    assert c @ n <= B * (1 + 1e-12)
    a = sol.alpha
    mu = sol.mu
    grad = a * w / (1 + n) - (1 + mu) * c   # d(-F - mu(c n - B))/dn; 0 inside, <= 0 at l, >= 0 at u
    interior = (n > l + 1e-9) & (n < u - 1e-9)
    scale = np.maximum(a * w / (1 + n), c) * 1e-8 + 1e-12
    assert np.all(np.abs(grad[interior]) <= scale[interior])
    at_l = n <= l + 1e-9
    assert np.all(grad[at_l & ~(n >= u - 1e-9)] <= scale[at_l & ~(n >= u - 1e-9)])
    at_u = n >= u - 1e-9
    assert np.all(grad[at_u & ~at_l] >= -scale[at_u & ~at_l])
    assert mu >= 0 and mu * (B - c @ n) <= 1e-8 * B * (1 + mu)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_allocation_matches_cvxpy(chunk):
    agreement = Agreement()
    for i in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        z, c, lower, upper, beta, B, alpha = _alloc_instance(7, i)
        K = z.size
        sol = water_fill(z, B, costs=c, beta=beta, alpha=alpha, lower=lower, upper=upper)
        q = z / z.sum()
        w = q ** beta
        l = np.broadcast_to(np.asarray(lower, float), (K,))
        u = np.full(K, np.inf) if upper is None else upper
        _check_alloc_kkt(sol, w, c, l, u, B, alpha)
        n = cp.Variable(K)
        cons = [c @ n <= B, n >= l]
        if upper is not None:
            cons.append(n <= u)
        gain = cp.sum(cp.multiply(w, cp.log1p(n)))
        if alpha == "auto":
            # alpha absorbed: the allocation maximises the gain term under the budget
            ours0 = float(w @ np.log1p(sol.n))
            # scale the objective to ~1 (same maximiser): CLARABEL's tolerances are absolute-ish
            _solve(cp.Problem(cp.Maximize(gain / max(ours0, 1e-3 * float(w.sum()))), cons))
            ours, ref = float(w @ np.log1p(sol.n)), float(w @ np.log1p(np.maximum(n.value, l)))
            scale = abs(ref) + 1e-12
            agreement.check(ours, ref, scale, "higher", i)
            assert abs(c @ sol.n - B) <= 1e-9 * B or not sol.binds
        else:
            _solve(cp.Problem(cp.Minimize((c @ n - alpha * gain) / max(float(c @ sol.n + alpha * w @ np.log1p(sol.n)), 1e-3 * float(c.sum() + alpha * w.sum()))), cons))
            x = np.maximum(n.value, l)
            ref = float(c @ x - alpha * w @ np.log1p(x))
            ours = sol.objective
            scale = float(c @ x + alpha * w @ np.log1p(x)) + 1e-12
            agreement.check(ours, ref, scale, "lower", i)
    agreement.done()


def _prune_instance(seed, i):
    rng = np.random.default_rng([seed, i])
    K = _K(rng, i)
    z = rng.random(K) ** rng.uniform(0.5, 2) + (0.01 if rng.random() < 0.5 else 0.1)
    N = rng.integers(1, 200, K).astype(float)
    lo = float(rng.choice([0.0, rng.uniform(0, 0.3)]))
    hi = float(rng.choice([1.0, rng.uniform(0.6, 1.0)]))
    s = float(rng.uniform(lo, hi))
    mode = "exact" if rng.random() < 0.6 else "at-least"
    eta = float(rng.uniform(0, 2))
    p = float(rng.choice([2.0, rng.uniform(1.3, 4.0)]))
    gamma = float(10 ** rng.uniform(-1, 4))
    bits = float(rng.choice([16.0, rng.uniform(0.01, 4)]))
    return z, N, s, dict(mode=mode, eta=eta, p=p, gamma=gamma, bits=bits, min_ratio=lo, max_ratio=hi)


def _check_prune_kkt(sol, q, N, s, kw):
    rho, lo, hi = sol.rho, kw["min_ratio"], kw["max_ratio"]
    assert np.all(rho >= lo - 1e-12) and np.all(rho <= hi + 1e-12)
    ach = N @ rho / N.sum()
    if kw["mode"] == "exact":
        assert abs(ach - s) <= 1e-9
    else:
        assert ach >= s - 1e-9
    if sol.nu is None:
        return
    nu, b, g, p = sol.nu, kw["bits"], kw["gamma"], kw["p"]
    d = -b * N + g * p * q ** kw["eta"] * rho ** (p - 1) - nu * N  # dL/drho
    scale = (b + abs(nu)) * N * 1e-7 + 1e-9
    interior = (rho > lo + 1e-9) & (rho < hi - 1e-9)
    assert np.all(np.abs(d[interior]) <= scale[interior])
    assert np.all(d[(rho <= lo + 1e-9) & (rho < hi - 1e-9)] >= -scale[(rho <= lo + 1e-9) & (rho < hi - 1e-9)])
    assert np.all(d[(rho >= hi - 1e-9) & (rho > lo + 1e-9)] <= scale[(rho >= hi - 1e-9) & (rho > lo + 1e-9)])
    if kw["mode"] == "at-least":
        assert nu >= 0 and nu * (ach - s) <= 1e-9 * (1 + nu)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_pruning_matches_cvxpy(chunk):
    agreement = Agreement()
    for i in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        z, N, s, kw = _prune_instance(11, i)
        K = z.size
        sol = pruning_ratios(z, N, s, **kw)
        q = z / z.sum()
        _check_prune_kkt(sol, q, N, s, kw)
        rho = cp.Variable(K)
        qe = q ** kw["eta"]
        curv = kw["gamma"] * cp.sum(cp.multiply(qe, cp.power(rho, kw["p"], approx=False)))
        cons = [rho >= kw["min_ratio"], rho <= kw["max_ratio"]]
        cons.append(N @ rho == s * N.sum() if kw["mode"] == "exact" else N @ rho >= s * N.sum())
        if kw["mode"] == "exact":
            # the size term is constant on the feasible set: compare the curvature term
            cur0 = float(kw["gamma"] * qe @ sol.rho ** kw["p"])
            _solve(cp.Problem(cp.Minimize(curv / max(cur0, 1e-300)), cons))
            x = np.clip(rho.value, kw["min_ratio"], kw["max_ratio"])
            ref = float(kw["gamma"] * qe @ x ** kw["p"])
            ours = float(kw["gamma"] * qe @ sol.rho ** kw["p"])
            scale = abs(ref) + 1e-9 * kw["gamma"]
        else:
            size = kw["bits"] * N @ (1 - rho)
            _solve(cp.Problem(cp.Minimize((size + curv) / max(abs(sol.objective), 1e-300)), cons))
            x = np.clip(rho.value, kw["min_ratio"], kw["max_ratio"])
            ref = float(kw["bits"] * N @ (1 - x) + kw["gamma"] * qe @ x ** kw["p"])
            ours = sol.objective
            scale = float(kw["bits"] * N @ (1 - x) + kw["gamma"] * qe @ x ** kw["p"]) + 1e-9
        agreement.check(ours, ref, scale, "lower", (i, kw))
    agreement.done()
