"""The damage program against cvxpy and brute force; envelopes; ATP and mdl-paper (issue 13)."""

from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np
import pytest

from layercap.errors import LayercapError
from layercap.programs.atp import atp_ratios, atp_rho, mdl_paper_ratios
from layercap.programs.damage import (
    DamageTable,
    lower_envelope,
    ratios_from_damage,
    solve_damage_program,
    spearman,
)
from layercap.scorefile import LayerScore, LayerScores

pytestmark = pytest.mark.filterwarnings("ignore:Solution may be inaccurate:UserWarning")


def _instance(rng, K, L, negative=False):
    levels = np.sort(rng.choice(np.arange(1, 20) / 20.0, size=L, replace=False))
    # damage grows faster than linearly on average, with noise (so envelopes drop points)
    a = rng.uniform(0.1, 3.0, size=(K, 1))
    p = rng.uniform(1.0, 4.0, size=(K, 1))
    D = a * levels[None, :] ** p * rng.uniform(0.6, 1.4, size=(K, L))
    if negative:
        D -= rng.uniform(0, 0.02, size=(K, L))
    N = rng.integers(1, 6, size=K) * 1000
    return D, levels, N


def _cvxpy_value(D, levels, N, s, lo, hi, at_least=False, w=0.0):
    """Independent reference: the envelope as convex combinations of the measured points."""
    K, L = D.shape
    x = np.concatenate([[0.0], levels])
    Y = np.concatenate([np.zeros((K, 1)), D], axis=1)
    lam = cp.Variable((K, L + 1), nonneg=True)
    rho = lam @ x
    cons = [cp.sum(lam, axis=1) == 1, rho >= lo, rho <= hi]
    cons.append(N @ rho >= s * N.sum() if at_least else N @ rho == s * N.sum())
    obj = cp.sum(cp.multiply(lam, Y)) + w * (N @ (1 - rho))
    prob = cp.Problem(cp.Minimize(obj), cons)
    prob.solve(solver="CLARABEL")
    assert prob.status in ("optimal", "optimal_inaccurate")
    return prob.value


@pytest.mark.parametrize("seed", range(40))
def test_continuous_solution_matches_cvxpy(seed):
    rng = np.random.default_rng(seed)
    K, L = int(rng.integers(2, 12)), int(rng.integers(2, 7))
    D, levels, N = _instance(rng, K, L, negative=seed % 3 == 0)
    hi = float(levels[-1])
    lo = 0.0 if seed % 2 else float(rng.uniform(0, 0.1))
    s = float(rng.uniform(lo, hi))
    sol = solve_damage_program(D, levels, N, s, min_ratio=lo, max_ratio=0.95)
    assert np.dot(N, sol.rho) == pytest.approx(s * N.sum(), rel=1e-12)
    assert np.all(sol.rho >= lo - 1e-12) and np.all(sol.rho <= hi + 1e-12)
    ref = _cvxpy_value(D, levels, N, s, lo, hi)
    assert sol.objective == pytest.approx(ref, rel=1e-6, abs=1e-7)
    # the at-least variant with a size reward
    w = float(rng.uniform(0, 1e-3))
    sol2 = solve_damage_program(D, levels, N, s, min_ratio=lo, max_ratio=0.95, size_weight=w, mode="at-least")
    assert np.dot(N, sol2.rho) >= s * N.sum() * (1 - 1e-12)
    assert sol2.objective == pytest.approx(_cvxpy_value(D, levels, N, s, lo, hi, at_least=True, w=w), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("seed", range(20))
def test_trust_region_matches_cvxpy(seed):
    """|rho_k - c_k| <= r on top of the box: per-block bounds, the same exact segment search."""
    rng = np.random.default_rng(500 + seed)
    K, L = int(rng.integers(2, 12)), int(rng.integers(3, 7))
    D, levels, N = _instance(rng, K, L, negative=seed % 3 == 0)
    hi = float(levels[-1])
    s = float(rng.uniform(0.2, 0.8)) * hi
    c, r = np.full(K, s), float(rng.uniform(0.02, 0.3))
    sol = solve_damage_program(D, levels, N, s, max_ratio=0.95, around=c, radius=r)
    los, his = np.maximum(0.0, c - r), np.minimum(hi, c + r)
    assert np.dot(N, sol.rho) == pytest.approx(s * N.sum(), rel=1e-12)
    assert np.all(sol.rho >= los - 1e-12) and np.all(sol.rho <= his + 1e-12)
    assert sol.objective == pytest.approx(_cvxpy_value(D, levels, N, s, los, his), rel=1e-6, abs=1e-7)
    wide = solve_damage_program(D, levels, N, s, max_ratio=0.95)
    assert sol.objective >= wide.objective - 1e-12  # a restriction never helps the model's objective
    with pytest.raises(LayercapError, match="cannot meet"):
        solve_damage_program(D, levels, N, s, max_ratio=0.95, around=np.full(K, 0.0), radius=0.01)


@pytest.mark.parametrize("seed", range(30))
def test_discrete_solution_and_its_certified_gap_against_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    K, L = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    D, levels, N = _instance(rng, K, L)
    s = float(rng.uniform(0.05, levels[-1]))
    sol = solve_damage_program(D, levels, N, s, max_ratio=0.95)
    grid = np.concatenate([[0.0], levels])
    vals = np.concatenate([np.zeros((K, 1)), D], axis=1)
    best = np.inf
    for choice in itertools.product(range(L + 1), repeat=K):
        rho = grid[list(choice)]
        if N @ rho >= s * N.sum() - 1e-9:
            best = min(best, sum(vals[k, c] for k, c in enumerate(choice)))
    # the discrete solution is feasible, uses measured levels, and is within the certified gap
    assert N @ sol.rho_discrete >= s * N.sum() * (1 - 1e-12)
    assert all(np.isclose(grid, r).any() for r in sol.rho_discrete)
    disc_val = sum(vals[k, int(np.argmin(np.abs(grid - r)))] for k, r in enumerate(sol.rho_discrete))
    assert disc_val == pytest.approx(sol.objective_discrete, rel=1e-9)
    assert sol.objective <= best + 1e-12  # a relaxation
    assert best <= sol.objective_discrete + 1e-12
    assert sol.objective_discrete - best <= sol.gap + 1e-12


def test_envelope_is_the_lower_convex_hull():
    xs, ys = lower_envelope([0.2, 0.4, 0.6, 0.8], [0.1, 0.05, 0.3, 1.0])
    # (0.2, 0.1) lies above the chord from (0, 0) to (0.4, 0.05): dropped
    np.testing.assert_allclose(xs, [0.0, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(ys, [0.0, 0.05, 0.3, 1.0])
    slopes = np.diff(ys) / np.diff(xs)
    assert np.all(np.diff(slopes) >= 0)


def test_equal_blocks_with_equal_curves_get_uniform_ratios():
    levels = [0.3, 0.5, 0.7, 0.9]
    D = np.tile(np.array(levels) ** 2, (4, 1))
    sol = solve_damage_program(D, levels, [100] * 4, 0.5)
    # on the envelope (chords of x^2) the split is not unique, but the objective is psi(0.5) * 4
    assert sol.objective == pytest.approx(4 * 0.25)


def test_more_damaging_block_is_pruned_less():
    levels = [0.25, 0.5, 0.75]
    D = np.array([[0.1, 0.4, 0.9], [1.0, 4.0, 9.0], [0.1, 0.4, 0.9]])
    sol = solve_damage_program(D, levels, [10, 10, 10], 0.5)
    assert sol.rho[1] < sol.rho[0] and sol.rho[1] < sol.rho[2]


def _table(K=3, levels=(0.3, 0.6, 0.9)):
    rng = np.random.default_rng(0)
    D = (np.array(levels)[None, :] ** 2) * rng.uniform(0.5, 2, size=(K, 1))
    return DamageTable(model="m", method="wanda", blocks=[f"b.{k}" for k in range(K)], params=[100] * K,
                       levels=list(levels), kl=D.tolist(), dnll=(0.5 * D).tolist(), obd={"diag": (2 * D).tolist()})


def test_ratios_from_damage_record():
    table = _table()
    r = ratios_from_damage(table, 0.5)
    assert r.rule == "mdl:damage" and r.achieved == pytest.approx(0.5) and len(r) == 3
    assert r.metadata["gap"] >= 0 and r.names == table.blocks
    r2 = ratios_from_damage(table, 0.5, source="obd-diag")
    assert r2.rule == "mdl:obd"
    np.testing.assert_allclose(r2.rho, r.rho)  # a positive multiple of the same curves
    rd = ratios_from_damage(table, 0.5, discrete=True)
    assert rd.achieved >= 0.5 - 1e-12 and set(np.round(rd.rho, 9)) <= {0.0, 0.3, 0.6, 0.9}
    with pytest.raises(LayercapError, match="outside"):
        ratios_from_damage(table, 0.95)  # above the largest measured level
    with pytest.raises(LayercapError, match="obd.kfac"):
        ratios_from_damage(table, 0.5, source="obd-kfac")
    partial = DamageTable(model="m", method="wanda", blocks=["a"], params=[1], levels=[0.5], kl=[[None]],
                          dnll=[[None]], complete=False)
    with pytest.raises(LayercapError, match="partial"):
        ratios_from_damage(partial, 0.3)


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_atp_hand_example():
    # 3 equal blocks, s = 0.5, step 0.1: 0.4, 0.5, 0.6
    np.testing.assert_allclose(atp_rho([10, 10, 10], 0.5, 0.1), [0.4, 0.5, 0.6], atol=1e-12)
    # unequal sizes: c + 0.1 k with (1 * c + 3 * (c + 0.1)) = 4 * 0.5 -> c = 0.425
    np.testing.assert_allclose(atp_rho([1, 3], 0.5, 0.1), [0.425, 0.525], atol=1e-12)
    # clipping: the offset is re-solved so the weighted mean stays on target
    rho = atp_rho([1, 1, 1], 0.8, 0.2, max_ratio=0.9)
    assert np.mean(rho) == pytest.approx(0.8) and rho.max() <= 0.9 and np.all(np.diff(rho) >= 0)
    np.testing.assert_allclose(rho, [0.65, 0.85, 0.9], atol=1e-12)
    r = atp_ratios(["a", "b", "c"], [10, 10, 10], 0.5, 0.0)
    assert r.rule == "atp" and np.allclose(r.rho, 0.5)


def test_mdl_paper_caps_at_target_plus_margin():
    rng = np.random.default_rng(0)
    scores = LayerScores([LayerScore(f"b.{k}", float(z), 1000) for k, z in enumerate(rng.uniform(0.01, 1, 8))], method="kfac")
    r = mdl_paper_ratios(scores, 0.5)
    assert r.rule == "mdl-paper" and r.rho.max() <= 0.55 + 1e-12 and r.achieved == pytest.approx(0.5)
