"""Integer allocation against exhaustive dynamic programming on small instances."""

import numpy as np
import pytest

from layercap.errors import LayercapError
from layercap.programs.integer import allocate_integer


def _dp(w, c, l, u, B, alpha):
    """Exact integer optimum by DP over the (integer) budget. alpha="auto": max sum w log(1+n)."""
    K = len(w)
    best = {0: (0.0, ())}  # spent -> (value to maximise, counts)
    for k in range(K):
        nxt = {}
        for spent, (val, ns) in best.items():
            for n in range(int(l[k]), int(u[k]) + 1):
                s2 = spent + int(c[k]) * n
                if s2 > B:
                    break
                gain = w[k] * np.log1p(n) if alpha == "auto" else alpha * w[k] * np.log1p(n) - c[k] * n
                v2 = val + gain
                if s2 not in nxt or v2 > nxt[s2][0]:
                    nxt[s2] = (v2, ns + (n,))
        best = nxt
    val, ns = max(best.values(), key=lambda t: t[0])
    return val, np.array(ns)


def _instances(seed, equal):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        K = int(rng.integers(1, 6))
        z = rng.random(K) ** 2
        if rng.random() < 0.2:
            z[0] = 0.0
        if z.sum() == 0:
            z[-1] = 1.0
        c = np.ones(K, int) if equal else rng.integers(1, 5, K)
        l = rng.integers(0, 3, K)
        u = l + rng.integers(0, 8, K)
        B = int(c @ l + rng.integers(0, 25))
        beta = float(rng.uniform(0, 2))
        alpha = "auto" if rng.random() < 0.5 else float(rng.uniform(0.5, 60))
        yield z, c, l, u, B, beta, alpha


@pytest.mark.parametrize("equal", [True, False])
def test_integer_against_dp(equal):
    for z, c, l, u, B, beta, alpha in _instances(3 if equal else 4, equal):
        sol = allocate_integer(z, B, costs=c, beta=beta, alpha=alpha, lower=l, upper=u)
        w = (z / z.sum()) ** beta
        n = sol.n
        assert np.all(n >= l) and np.all(n <= u) and c @ n <= B
        ours = w @ np.log1p(n) if alpha == "auto" else alpha * w @ np.log1p(n) - c @ n
        opt, _ = _dp(w, c, l, u, B, alpha)
        assert ours <= opt + 1e-9
        if equal:
            assert ours >= opt - 1e-9, (z, c, l, u, B, beta, alpha, n)   # greedy is optimal
            assert sol.gap == 0.0 and sol.optimal
        else:
            # the certificate bounds the true suboptimality (objectives are minimised: -value)
            assert opt - ours <= sol.relaxation_gap + 1e-9
            if np.all(c == c[0]):  # costs drawn equal by chance: proven optimal
                assert sol.gap == 0.0 and ours >= opt - 1e-9
            else:
                assert sol.gap == pytest.approx(sol.relaxation_gap)


def test_typical_160_experts_over_32_layers():
    rng = np.random.default_rng(0)
    z = rng.random(32)
    sol = allocate_integer(z, 160, beta=0.9, lower=1)
    assert sol.n.sum() == 160 and sol.n.min() >= 1 and sol.optimal and sol.binds
    # higher score, at least as many experts (equal costs, concave gains)
    order = np.argsort(z)
    assert np.all(np.diff(sol.n[order]) >= 0)


def test_fixed_alpha_stops_when_units_do_not_pay():
    # alpha w (log(n+2) - log(n+1)) > c  <=> unit pays. w = 0.5 each, alpha = 10: 5 log((n+2)/(n+1)) > 1
    # n=0: 3.47, n=1: 2.03, n=2: 1.44, n=3: 1.12, n=4: 0.91 -> 4 units per layer
    sol = allocate_integer([1.0, 1.0], 100, alpha=10.0, beta=1.0, lower=0)
    assert sol.n.tolist() == [4, 4] and not sol.binds and sol.mu == 0.0
    tight = allocate_integer([1.0, 1.0], 5, alpha=10.0, beta=1.0, lower=0)
    assert sorted(tight.n.tolist()) == [2, 3] and tight.binds and tight.mu > 0


def test_integer_rejects_fractional_bounds():
    with pytest.raises(LayercapError, match="whole"):
        allocate_integer([1.0, 2.0], 10, lower=0.5)
