"""Search refinement (issue 13): budget always exact, never worse than the start, KL fitness, ATP's slope."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layercap.apply.prune.search import CONFIRM, SCREEN, KLFitness, UnitGrid, atp_search, evolve, evolve_ratios
from layercap.data.calibration import CalibrationSet
from layercap.errors import LayercapError
from layercap.models import find_blocks
from layercap.models.tiny import build_tiny
from layercap.programs.atp import atp_rho
from layercap.programs.records import PruningRatios

torch.set_num_threads(1)


def _toy(N, target_sum, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.5, 3.0, size=len(N))
    calls = []

    def fitness(rho, stage):
        calls.append(stage)
        # every configuration the search asks about meets the budget exactly
        assert float(np.dot(N, rho)) == pytest.approx(target_sum, rel=1e-12)
        noise = 0.01 * np.sin(37 * rho).sum() if stage == SCREEN else 0.0  # the screen is a noisy proxy
        return float(np.sum(c * rho**2) + noise)

    return fitness, calls, c


@pytest.mark.parametrize("seed", range(5))
def test_evolve_keeps_the_budget_and_never_gets_worse(seed):
    rng = np.random.default_rng(seed)
    N = rng.integers(1, 5, size=7) * 1000  # unequal blocks
    s = 0.5
    grid = UnitGrid.make(N, s, step=0.02)
    fitness, calls, c = _toy(N, s * N.sum(), seed)
    res = evolve(fitness, grid, np.full(7, s), generations=30, offspring=6, confirm=2, seed=seed)
    assert float(np.dot(N, res.rho)) == pytest.approx(s * N.sum(), rel=1e-12)
    assert res.fitness <= res.start_fitness
    assert len(res.curve) == 31 and all(b <= a for a, b in zip(res.curve, res.curve[1:]))
    assert res.evaluations["screen"] <= 30 * 6 and res.evaluations["confirm"] <= 1 + 30 * 2
    assert calls.count(SCREEN) == res.evaluations["screen"]
    # the optimum of sum c rho^2 s.t. sum N rho = T has rho ~ N / c: the search moves towards it
    assert res.fitness < res.start_fitness
    assert np.all(res.rho >= 0) and np.all(res.rho <= 0.95 + 1e-12)


def test_grid_maps_start_ratios_exactly_and_refuses_impossible_bounds():
    N = np.array([1000, 3000, 2000])
    grid = UnitGrid.make(N, 0.4, step=0.05)
    u = grid.units_of([0.3, 0.45, 0.4])
    assert u.sum() == grid.total and float(N @ grid.rho(u)) == pytest.approx(0.4 * N.sum(), rel=1e-12)
    with pytest.raises(LayercapError):
        UnitGrid.make(N, 0.6, step=0.05, max_ratio=0.5)
    with pytest.raises(LayercapError):
        evolve(lambda r, s: 0.0, grid, [0.4] * 3, confirm=5, offspring=2)


def _calib():
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(3))
    return CalibrationSet(ids, "sha", "random", 0)


@torch.no_grad()
def test_kl_fitness_partial_rerun_equals_fresh_full_run():
    model, _ = build_tiny("llama", num_layers=4, seed=4, dtype=torch.float64)
    calib = _calib()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    parent = np.array([0.5, 0.5, 0.5, 0.5])
    child = np.array([0.5, 0.5, 0.3, 0.7])
    with KLFitness(model, calib, "wanda", screen=2, batch_size=2) as fit:
        assert fit(np.zeros(4), CONFIRM) == pytest.approx(0.0, abs=1e-12)
        fit.set_parent(parent)
        cached = fit(child, CONFIRM)  # reruns blocks 2..3 only
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense[k])  # restored
    with KLFitness(model, calib, "wanda", screen=2, batch_size=2) as fresh:
        full = fresh(child, CONFIRM)
    assert cached == pytest.approx(full, rel=1e-9) and full > 0


def test_evolve_ratios_on_a_tiny_model():
    model, _ = build_tiny("llama", num_layers=4, seed=5)
    blocks = find_blocks(model)
    start = PruningRatios.uniform([b.name for b in blocks], [b.num_prunable for b in blocks], 0.5)
    out = evolve_ratios(model, _calib(), start, step=0.05, screen=2, generations=4, offspring=3, confirm=1, progress=False)
    assert out.rule == "evopress" and out.achieved == pytest.approx(0.5, rel=1e-12)
    assert out.metadata["fitness"] <= out.metadata["start_fitness"]
    assert len(out.metadata["curve"]) == 5


def test_atp_search_finds_the_slope_of_a_hand_example():
    N = [10] * 6
    want = atp_rho(N, 0.5, 0.04)  # 0.4, 0.44, ..., 0.6

    def fitness(rho, stage):
        return float(np.sum((rho - want) ** 2))

    r = atp_search(fitness, [f"b{k}" for k in range(6)], N, 0.5, steps=[0.0, 0.02, 0.04, 0.06, 0.08])
    assert r.metadata["step"] == pytest.approx(0.04) and r.metadata["fitness"] == pytest.approx(0.0, abs=1e-20)
    np.testing.assert_allclose(r.rho, want)
    assert r.achieved == pytest.approx(0.5)


def _context_table(K=6, L=9, seed=0):
    from layercap.programs.damage import DamageTable

    rng = np.random.default_rng(seed)
    levels = [round(0.1 * (j + 1), 2) for j in range(L)]
    D = np.cumsum(rng.uniform(0.0, 1.0, (K, L)) * np.linspace(0.1, 2.0, L), axis=1) * rng.uniform(0.2, 3.0, (K, 1))
    names = [f"model.layers.{k}" for k in range(K)]
    return DamageTable(model="m", method="wanda", blocks=names, params=[100] * K, levels=levels, kl=D.tolist(),
                       dnll=D.tolist(), metadata={"context": {"ratios": {n: 0.5 for n in names}}})


def test_trust_region_search_takes_the_radius_of_lowest_calibration_fitness():
    """Every radius is tried once, the chosen one has the lowest fitness, its region holds, the
    budget is exact; a radius that cannot meet the target is skipped; a dense-context table is refused."""
    from layercap.apply.prune.search import trust_region_search
    from layercap.programs.damage import DamageTable, ratios_from_damage

    table = _context_table()
    target = ratios_from_damage(table, 0.5, max_ratio=0.9, radius=0.1).rho  # the fitness favours radius 0.1

    def fitness(rho, stage):
        return float(np.sum((rho - target) ** 2))

    out = trust_region_search(fitness, table, 0.5, radii=(0.05, 0.1, 0.2, None), max_ratio=0.9)
    assert out.metadata["radius"] == 0.1 and [r for r, _ in out.metadata["search"]] == [0.05, 0.1, 0.2, None]
    assert out.metadata["fitness"] == min(v for _, v in out.metadata["search"]) == pytest.approx(0.0)
    assert np.all(np.abs(out.rho - 0.5) <= 0.1 + 1e-12) and np.dot([100] * 6, out.rho) == pytest.approx(300.0)
    # a region around 0.5 of radius 0.05 cannot meet 0.6 (every block <= 0.55): skipped, not an error
    far = trust_region_search(fitness, table, 0.6, radii=(0.05, 0.2), max_ratio=0.9)
    assert [r for r, _ in far.metadata["search"]] == [0.2]
    with pytest.raises(LayercapError, match="no trust radius"):
        trust_region_search(fitness, table, 0.6, radii=(0.05,), max_ratio=0.9)
    dense = DamageTable(model="m", method="wanda", blocks=table.blocks, params=table.params, levels=table.levels,
                        kl=table.kl, dnll=table.dnll)
    with pytest.raises(LayercapError, match="in context"):
        trust_region_search(fitness, dense, 0.5)
