"""Transfer regret (>= 0 always) and the Theorem-4 bound (holds on interior instances)."""

import numpy as np
import pytest

from layercap import LayerScore, LayerScores
from layercap.errors import LayercapError
from layercap.programs.allocation import water_fill
from layercap.programs.records import TransferResult
from layercap.programs.transfer import allocation_regret, pruning_regret, transfer


def _pair(rng, K, spread):
    qt = rng.random(K) + 0.2
    qs = qt * np.clip(1 + spread * rng.normal(size=K), 0.2, None)
    return qs, qt


def test_allocation_regret_nonnegative_and_bound_holds_when_interior():
    rng = np.random.default_rng(0)
    interior = 0
    for i in range(300):
        K = int(rng.integers(2, 40))
        qs, qt = _pair(rng, K, rng.uniform(0.01, 0.5))
        kw = dict(budget=float(K * rng.uniform(2, 12)), beta=float(rng.uniform(0.3, 2.0)),
                  costs=rng.uniform(0.5, 2.0, K), lower=float(rng.choice([0.0, 1.0])),
                  alpha="auto" if i % 2 else float(rng.uniform(5, 80)))
        r = allocation_regret(qs, qt, **kw)
        assert r["regret"] >= -1e-12 * max(1.0, abs(r["objective_target"]))
        # regret is the target objective at the two decisions, computed independently
        xs = water_fill(qs, **kw).n
        xt = water_fill(qt, **kw).n
        a = r["extra"]["alpha"]
        w = (qt / qt.sum()) ** kw["beta"]
        F = lambda n: kw["costs"] @ n - a * w @ np.log1p(n)  # noqa: E731
        assert r["regret"] == pytest.approx(F(xs) - F(xt), rel=1e-6, abs=1e-9)
        if r["assumptions_hold"]:
            interior += 1
            assert r["bound_holds"] and r["regret"] <= r["bound"] * (1 + 1e-9) + 1e-12
    assert interior >= 100  # the bound was exercised


def test_pruning_regret_nonnegative_and_bound_holds_when_interior():
    rng = np.random.default_rng(1)
    interior = 0
    for i in range(300):
        K = int(rng.integers(2, 40))
        qs, qt = _pair(rng, K, rng.uniform(0.01, 0.5))
        N = rng.integers(100, 5000, K)
        mode = "exact" if i % 3 else "at-least"
        kw = dict(mode=mode, eta=float(rng.uniform(0.5, 2.0)), gamma=float(10 ** rng.uniform(-1, 2)),
                  bits=16.0 if mode == "exact" else float(rng.uniform(1e-4, 1e-2)))
        s = float(rng.uniform(0.2, 0.7))
        r = pruning_regret(qs, qt, N, s, **kw)
        assert r["regret"] >= -1e-9 * max(1.0, abs(r["objective_target"]))
        if r["assumptions_hold"]:
            interior += 1
            assert r["bound_holds"], (r["regret"], r["bound"])
    assert interior >= 100


def test_identical_scores_zero_regret_and_bound():
    q = np.array([0.1, 0.2, 0.3, 0.4])
    r = allocation_regret(q, q * 3, budget=20.0)
    assert r["regret"] == pytest.approx(0.0, abs=1e-12) and r["bound"] == pytest.approx(0.0, abs=1e-20)
    p = pruning_regret(q, q, [10, 10, 10, 10], 0.5)
    assert p["regret"] == pytest.approx(0.0, abs=1e-12)


def test_assumption_failures_are_flagged():
    # beta < 1 with a zero score: L_q is infinite
    r = allocation_regret([0.0, 1.0, 1.0], [0.5, 1.0, 1.0], budget=30.0, beta=0.5, lower=0.0)
    assert not r["assumptions_hold"] and any("q_min" in n for n in r["notes"])
    # non-interior target: a layer pinned at its lower bound
    r = allocation_regret([1.0, 1.0, 1.0], [0.001, 1.0, 1.0], budget=6.0, lower=1.0)
    assert not r["assumptions_hold"] and any("not interior" in n for n in r["notes"])
    # pruning with ratios at bounds
    p = pruning_regret([1.0, 1.0], [0.01, 1.0], [10, 10], 0.5, max_ratio=0.6)
    assert not p["assumptions_hold"]


def _scores(z, names=None):
    names = names or [f"l{i}" for i in range(len(z))]
    return LayerScores([LayerScore(n, float(v), 100) for n, v in zip(names, z)], method="kfac")


def test_transfer_record_round_trip(tmp_path):
    t = transfer(_scores([1, 2, 3, 4]), _scores([2, 2, 3, 3]), "allocation", budget=24.0, lower=1)
    assert t.program == "allocation" and t.regret >= 0 and t.names == ["l0", "l1", "l2", "l3"]
    t.save(tmp_path / "t.json")
    assert TransferResult.load(tmp_path / "t.json").to_dict() == t.to_dict()
    tp = transfer(_scores([1, 2, 3, 4]), _scores([2, 2, 3, 3]), "pruning", sparsity=0.5)
    assert tp.program == "pruning" and tp.regret >= 0


def test_transfer_rejects_mismatched_layers():
    with pytest.raises(LayercapError, match="same layers"):
        transfer(_scores([1, 2]), _scores([1, 2], ["a", "b"]), "allocation", budget=4.0)
    with pytest.raises(LayercapError, match="budget"):
        transfer(_scores([1, 2]), _scores([1, 2]), "allocation")
