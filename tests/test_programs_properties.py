"""Property tests (hypothesis) of the allocation and pruning programs: monotonicity, scale
invariance, bounds, budget and exact sparsity."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from layercap.errors import LayercapError
from layercap.programs.allocation import water_fill
from layercap.programs.integer import allocate_integer
from layercap.programs.pruning import pruning_ratios

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# scores 0 or in [1e-8, 10] (dynamic range 1e9, zeros included); subnormals would make the
# scale-invariance properties fail in the test itself (z * 0.5 underflows to 0)
score = st.one_of(st.just(0.0), st.floats(1e-8, 10.0))
scores = st.lists(score, min_size=2, max_size=40).filter(lambda z: sum(z) > 1e-3)
alphas = st.one_of(st.just("auto"), st.floats(0.5, 500.0))


@SETTINGS
@given(z=scores, b1=st.floats(1.0, 200.0), extra=st.floats(0.0, 200.0), beta=st.floats(0.0, 2.0),
       alpha=alphas, lower=st.sampled_from([0.0, 1.0]))
def test_allocation_monotone_in_budget_and_budget_met(z, b1, extra, beta, alpha, lower):
    z = np.array(z)
    K = z.size
    b1 = b1 + lower * K
    s1 = water_fill(z, b1, beta=beta, alpha=alpha, lower=lower)
    s2 = water_fill(z, b1 + extra, beta=beta, alpha=alpha, lower=lower)
    assert np.all(s2.n >= s1.n - 1e-9 * (1 + s1.n))
    for s, b in ((s1, b1), (s2, b1 + extra)):
        assert np.all(s.n >= lower - 1e-12)
        assert s.spent <= b * (1 + 1e-12)
        if alpha == "auto":
            assert s.binds and abs(s.spent - b) <= 1e-9 * b
        elif s.mu > 0:
            assert abs(s.spent - b) <= 1e-9 * b


@SETTINGS
@given(z=scores, k=st.integers(0, 39), factor=st.floats(1.0, 20.0), budget=st.floats(5.0, 300.0),
       beta=st.floats(0.0, 2.0), alpha=alphas)
def test_allocation_monotone_in_own_score(z, k, factor, budget, beta, alpha):
    z = np.array(z)
    k = k % z.size
    z2 = z.copy()
    z2[k] = z[k] * factor + (0.1 if z[k] == 0 else 0.0)
    s1 = water_fill(z, budget, beta=beta, alpha=alpha, lower=0.0)
    s2 = water_fill(z2, budget, beta=beta, alpha=alpha, lower=0.0)
    assert s2.n[k] >= s1.n[k] - 1e-9 * (1 + s1.n[k])


@SETTINGS
@given(z=scores, scale=st.floats(1e-6, 1e6), budget=st.floats(5.0, 300.0), beta=st.floats(0.0, 2.0), alpha=alphas)
def test_allocation_invariant_to_zeta_scale(z, scale, budget, beta, alpha):
    z = np.array(z)
    a = water_fill(z, budget, beta=beta, alpha=alpha, lower=1.0 if budget > z.size else 0.0)
    b = water_fill(z * scale, budget, beta=beta, alpha=alpha, lower=1.0 if budget > z.size else 0.0)
    np.testing.assert_allclose(a.n, b.n, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(z=scores, data=st.data(), beta=st.floats(0.0, 2.0))
def test_allocation_respects_bounds(z, data, beta):
    z = np.array(z)
    K = z.size
    lower = np.array(data.draw(st.lists(st.integers(0, 3), min_size=K, max_size=K)), float)
    upper = lower + np.array(data.draw(st.lists(st.integers(0, 6), min_size=K, max_size=K)), float)
    costs = np.array(data.draw(st.lists(st.floats(0.1, 5.0), min_size=K, max_size=K)))
    budget = float(costs @ lower) + data.draw(st.floats(0.0, 100.0))
    assume(budget > 0)
    for solve in (water_fill, allocate_integer):
        s = solve(z, budget, costs=costs, beta=beta, lower=lower, upper=upper)
        n = np.asarray(s.n, float)
        assert np.all(n >= lower - 1e-12) and np.all(n <= upper + 1e-9)
        assert costs @ n <= budget * (1 + 1e-12) + 1e-12


@SETTINGS
@given(z=scores, b1=st.integers(0, 100), extra=st.integers(0, 100), beta=st.floats(0.0, 2.0))
def test_integer_equal_costs_monotone_and_spends_budget(z, b1, extra, beta):
    z = np.array(z)
    K = z.size
    s1 = allocate_integer(z, K + b1, beta=beta, lower=1)
    s2 = allocate_integer(z, K + b1 + extra, beta=beta, lower=1)
    assert s1.n.sum() == K + b1 and s2.n.sum() == K + b1 + extra  # alpha auto spends every unit
    assert np.all(s2.n >= s1.n) or not np.all(z > 0)  # zero-score layers never grow; ties may reorder
    assert s1.gap == 0.0 and s1.optimal


# ---- pruning --------------------------------------------------------------------------------
params = st.integers(1, 10_000)


@SETTINGS
@given(z=scores, data=st.data(), s=st.floats(0.0, 1.0), eta=st.floats(0.0, 2.0), p=st.floats(1.1, 4.0),
       lo=st.floats(0.0, 0.4), hi=st.floats(0.6, 1.0))
def test_exact_sparsity_met_and_bounds(z, data, s, eta, p, lo, hi):
    z = np.array(z)
    N = np.array(data.draw(st.lists(params, min_size=z.size, max_size=z.size)), float)
    s = lo + s * (hi - lo)
    sol = pruning_ratios(z, N, s, eta=eta, p=p, min_ratio=lo, max_ratio=hi)
    assert abs(N @ sol.rho / N.sum() - s) <= 1e-9
    assert abs(sol.achieved - s) <= 1e-9
    assert np.all(sol.rho >= lo - 1e-15) and np.all(sol.rho <= hi + 1e-15)


@SETTINGS
@given(z=scores, data=st.data(), s=st.floats(0.05, 0.95), eta=st.floats(0.0, 2.0), p=st.floats(1.1, 4.0),
       k=st.integers(0, 39), factor=st.floats(1.0, 50.0), mode=st.sampled_from(["exact", "at-least"]))
def test_pruning_monotone_in_own_score(z, data, s, eta, p, k, factor, mode):
    z = np.array(z)
    N = np.array(data.draw(st.lists(params, min_size=z.size, max_size=z.size)), float)
    k = k % z.size
    z2 = z.copy()
    z2[k] = z[k] * factor + (0.1 if z[k] == 0 else 0.0)
    kw = dict(eta=eta, p=p, mode=mode, bits=0.01, gamma=1.0)
    a = pruning_ratios(z, N, s, **kw)
    b = pruning_ratios(z2, N, s, **kw)
    assert b.rho[k] <= a.rho[k] + 1e-9  # a higher score protects the layer


@SETTINGS
@given(z=scores, data=st.data(), s=st.floats(0.0, 1.0), scale=st.floats(1e-6, 1e6), eta=st.floats(0.0, 2.0))
def test_pruning_invariant_to_zeta_scale(z, data, s, scale, eta):
    z = np.array(z)
    N = np.array(data.draw(st.lists(params, min_size=z.size, max_size=z.size)), float)
    a = pruning_ratios(z, N, s, eta=eta)
    b = pruning_ratios(z * scale, N, s, eta=eta)
    np.testing.assert_allclose(a.rho, b.rho, rtol=1e-8, atol=1e-10)


@SETTINGS
@given(z=scores, data=st.data(), s=st.floats(0.05, 0.95), g=st.floats(0.01, 100.0), b=st.floats(0.1, 64.0))
def test_exact_mode_independent_of_bits_and_gamma(z, data, s, g, b):
    z = np.array(z)
    N = np.array(data.draw(st.lists(params, min_size=z.size, max_size=z.size)), float)
    ref = pruning_ratios(z, N, s)
    other = pruning_ratios(z, N, s, gamma=g, bits=b)
    np.testing.assert_allclose(ref.rho, other.rho, rtol=1e-12, atol=1e-14)


def test_pruning_hand_example():
    # q = (1/3, 2/3), equal N, p = 2, eta = 1: rho ∝ 1/q = (3, 1.5); mean 0.5 -> (2/3, 1/3)
    sol = pruning_ratios([1.0, 2.0], [100, 100], 0.5)
    np.testing.assert_allclose(sol.rho, [2 / 3, 1 / 3], rtol=1e-14)
    # nu = p gamma t^(p-1) - b with t = rho_k q_k^eta / N_k = (2/3)(1/3)/100
    np.testing.assert_allclose(sol.nu, 2 * (2 / 900) - 16, rtol=1e-12)


def test_zero_score_layers_pruned_first():
    sol = pruning_ratios([0.0, 1.0, 1.0], [100, 100, 100], 0.5, max_ratio=0.9)
    assert sol.rho[0] == pytest.approx(0.9)
    np.testing.assert_allclose(sol.rho[1:], [0.3, 0.3])
    low = pruning_ratios([0.0, 1.0, 1.0], [100, 100, 100], 0.1, max_ratio=0.9)
    np.testing.assert_allclose(low.rho, [0.3, 0.0, 0.0], atol=1e-15)


def test_at_least_degenerate_warns():
    # raw parameter counts: the size term wins, every block at rho_max, constraint slack
    sol = pruning_ratios([1.0, 2.0, 3.0], [10**6] * 3, 0.5, mode="at-least", max_ratio=0.55)
    assert np.all(sol.rho == 0.55) and sol.nu == 0.0 and not sol.binds and sol.clipped == 3
    assert any("does not bind" in w for w in sol.warnings) and any("degenerate" in w for w in sol.warnings)
    # with a strong curvature term it binds and meets the target exactly
    tight = pruning_ratios([1.0, 2.0, 3.0], [10, 10, 10], 0.5, mode="at-least", bits=0.001, gamma=1.0)
    assert tight.binds and tight.nu > 0 and abs(tight.achieved - 0.5) < 1e-12


def test_allocation_not_binding_reported():
    s = water_fill([1.0, 1.0], 1000.0, alpha=4.0, beta=1.0)  # n = 4*0.5 - 1 = 1 each
    np.testing.assert_allclose(s.n, [1.0, 1.0])
    assert s.mu == 0 and not s.binds and s.spent == pytest.approx(2.0)
    tight = water_fill([1.0, 1.0], 1.0, alpha=4.0, beta=1.0)
    np.testing.assert_allclose(tight.n, [0.5, 0.5])
    assert tight.binds and tight.mu == pytest.approx(4 * 0.5 / 1.5 - 1)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(q=[1.0, float("nan")], budget=4), "finite"),
        (dict(q=[1.0, -1.0], budget=4), ">= 0"),
        (dict(q=[0.0, 0.0], budget=4), "every score is 0"),
        (dict(q=[1.0, 1.0], budget=4, costs=[1.0, 0.0]), "costs"),
        (dict(q=[1.0, 1.0], budget=1, lower=1), "infeasible"),
        (dict(q=[1.0, 1.0], budget=4, lower=2, upper=1), "upper"),
        (dict(q=[1.0, 1.0], budget=4, alpha=-1.0), "alpha"),
        (dict(q=[1.0, 1.0], budget=-4), "budget"),
    ],
)
def test_allocation_bad_input(kwargs, fragment):
    with pytest.raises(LayercapError, match=fragment):
        water_fill(**kwargs)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(sparsity=0.7, max_ratio=0.6), "outside"),
        (dict(sparsity=0.5, p=1.0), "p ="),
        (dict(sparsity=0.5, mode="most"), "mode"),
        (dict(sparsity=0.5, min_ratio=0.6, max_ratio=0.5), "min-ratio"),
        (dict(sparsity=0.5, eta=-1.0), "eta"),
    ],
)
def test_pruning_bad_input(kwargs, fragment):
    with pytest.raises(LayercapError, match=fragment):
        pruning_ratios([1.0, 2.0], [10, 10], **kwargs)
