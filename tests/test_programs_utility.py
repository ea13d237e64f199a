"""The concave-utility allocation program against cvxpy and brute force; the record (issue 14.3)."""

from __future__ import annotations

import itertools
import json

import cvxpy as cp
import numpy as np
import pytest

from layercap.cli import main as cli_main
from layercap.errors import LayercapError
from layercap.programs.rules import allocation_by_rule, parse_rule
from layercap.programs.utility import (
    UtilityTable,
    allocation_from_utility,
    load_for,
    solve_utility_program,
    upper_envelope,
)
from layercap.scorefile import LayerScore, LayerScores

pytestmark = pytest.mark.filterwarnings("ignore:Solution may be inaccurate:UserWarning")


def _instance(rng, K, L, dips=False):
    """Diminishing returns a log(1 + n / b) with noise (so envelopes drop points)."""
    levels = np.sort(rng.choice(np.arange(1, 13), size=L, replace=False))
    a, b = rng.uniform(0.01, 0.3, size=(K, 1)), rng.uniform(0.5, 6.0, size=(K, 1))
    U = a * np.log1p(levels[None, :] / b) * rng.uniform(0.8, 1.2, size=(K, L))
    U = np.maximum.accumulate(U, axis=1)  # nondecreasing, as validated tables are
    if dips:
        U[:, -1] -= 1e-3  # a dip within tolerance: the envelope's last segment slopes down
    return U, levels


def _cvxpy_value(U, levels, c, B, l, u, at_most=False):
    """Independent reference: the envelope as convex combinations of the measured points."""
    K, L = U.shape
    x = np.concatenate([[0.0], levels])
    Y = np.concatenate([np.zeros((K, 1)), U], axis=1)
    lam = cp.Variable((K, L + 1), nonneg=True)
    n = lam @ x
    cons = [cp.sum(lam, axis=1) == 1, n >= l, n <= u, (c @ n <= B) if at_most else (c @ n == B)]
    prob = cp.Problem(cp.Maximize(cp.sum(cp.multiply(lam, Y))), cons)
    prob.solve(solver="CLARABEL")
    assert prob.status in ("optimal", "optimal_inaccurate")
    return prob.value


def test_upper_envelope_is_the_concave_hull():
    xs, ys = upper_envelope([1, 2, 4, 8], [0.5, 0.6, 1.4, 1.5])
    # (2, .6) lies under the chord from (1, .5) to (4, 1.4)
    assert xs.tolist() == [0, 1, 4, 8] and ys.tolist() == pytest.approx([0, 0.5, 1.4, 1.5])


@pytest.mark.parametrize("seed", range(30))
def test_continuous_solution_matches_cvxpy(seed):
    rng = np.random.default_rng(seed)
    K, L = int(rng.integers(2, 10)), int(rng.integers(2, 6))
    U, levels = _instance(rng, K, L, dips=seed % 4 == 0)
    c = rng.uniform(0.5, 2.0, size=K) if seed % 2 else np.ones(K)
    top = float(levels[-1])
    l = np.where(rng.random(K) < 0.3, 1.0, 0.0)
    u = np.where(rng.random(K) < 0.3, float(rng.integers(1, top + 1)), top)
    l = np.minimum(l, u)
    B = float(rng.uniform(c @ l, c @ u))
    sol = solve_utility_program(U, levels, c, B, lower=l, upper=u)
    assert c @ sol.n == pytest.approx(B, rel=1e-12)
    assert np.all(sol.n >= l - 1e-12) and np.all(sol.n <= u + 1e-12)
    assert sol.objective == pytest.approx(_cvxpy_value(U, levels, c, B, l, u), rel=1e-6, abs=1e-7)
    at_most = solve_utility_program(U, levels, c, B, lower=l, upper=u, mode="at-most")
    assert c @ at_most.n <= B * (1 + 1e-12)
    assert at_most.objective == pytest.approx(_cvxpy_value(U, levels, c, B, l, u, at_most=True), rel=1e-6, abs=1e-7)
    # the dual price: a block strictly inside an envelope segment gains exactly lam per cost there
    for k in range(K):
        xs, ys = upper_envelope(levels, U[k])
        if l[k] + 1e-9 < sol.n[k] < u[k] - 1e-9 and not np.any(np.isclose(xs, sol.n[k], atol=1e-9)):
            i = int(np.searchsorted(xs, sol.n[k])) - 1
            assert (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) / c[k] == pytest.approx(sol.lam, rel=1e-9)


def _brute_force(U, levels, c, B, l, u, count=None):
    """Best sum of envelope values over whole units (sum c n <= B, or sum n == count)."""
    envs = [upper_envelope(levels, U[k]) for k in range(len(c))]
    best = -np.inf
    for n in itertools.product(*[range(int(l[k]), int(u[k]) + 1) for k in range(len(c))]):
        n = np.array(n, dtype=float)
        if (count is not None and n.sum() != count) or c @ n > B + 1e-9:
            continue
        best = max(best, sum(np.interp(n[k], *envs[k]) for k in range(len(c))))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_integer_greedy_is_optimal_with_equal_costs(seed):
    rng = np.random.default_rng(200 + seed)
    K, L = int(rng.integers(2, 5)), int(rng.integers(2, 4))
    U, levels = _instance(rng, K, L, dips=seed % 3 == 0)
    cost = float(rng.choice([1.0, 2.5]))
    c = np.full(K, cost)
    top = int(levels[-1])
    l = np.where(rng.random(K) < 0.3, 1.0, 0.0)
    u = np.full(K, float(top))
    B = cost * int(rng.integers(int(l.sum()) + 1, K * top + 1))
    sol = solve_utility_program(U, levels, c, B, lower=l, upper=u)
    assert sol.optimal and sol.gap == 0.0
    assert np.all(sol.n_integer == np.round(sol.n_integer))
    units = round(B / cost)
    assert sol.n_integer.sum() == units  # exact mode spends the budget
    assert sol.objective_integer == pytest.approx(_brute_force(U, levels, c, B, l, u, count=units), abs=1e-12)
    # at-most: never worse than any allocation within the budget
    sol2 = solve_utility_program(U, levels, c, B, lower=l, upper=u, mode="at-most")
    assert sol2.objective_integer == pytest.approx(_brute_force(U, levels, c, B, l, u), abs=1e-12)
    # the continuous optimum bounds the integer one from above
    assert sol.objective >= sol.objective_integer - 1e-12


@pytest.mark.parametrize("seed", range(15))
def test_integer_gap_certifies_unequal_costs(seed):
    rng = np.random.default_rng(400 + seed)
    K, L = int(rng.integers(2, 5)), int(rng.integers(2, 4))
    U, levels = _instance(rng, K, L)
    c = rng.choice([1.0, 2.0, 3.0], size=K)
    top = int(levels[-1])
    l, u = np.zeros(K), np.full(K, float(top))
    B = float(rng.integers(1, int(c @ u) + 1))
    sol = solve_utility_program(U, levels, c, B, lower=l, upper=u)
    assert c @ sol.n_integer <= B + 1e-9
    best = _brute_force(U, levels, c, B, l, u)
    assert sol.objective_integer <= best + 1e-12
    assert best - sol.objective_integer <= sol.gap + 1e-9  # the certificate holds


def _table(K=3, levels=(0, 1, 2, 4), model="tiny-llama", **kw):
    rng = np.random.default_rng(0)
    U, _ = _instance(rng, K, len(levels) - 1)
    rows = [[0.0] + [float(v) for v in U[k]] for k in range(K)]
    doc = dict(model=model, blocks=[f"model.layers.{k}" for k in range(K)], costs=[1024.0] * K, levels=list(levels),
               reduction=rows, fingerprint={"params": 10, "sha256": "ab"})
    doc.update(kw)
    return UtilityTable(**doc)


def test_record_round_trip_and_rule(tmp_path):
    table = _table()
    path = table.save(tmp_path / "u.json")
    back = UtilityTable.load(path)
    assert back.to_dict() == table.to_dict()
    alloc = allocation_from_utility(back, 6, lower=0)
    assert alloc.rule == "mdl:measured" and sum(alloc.counts().values()) == 6 and alloc.gap == 0.0
    spec = parse_rule("mdl:measured", "allocation")
    assert (spec.rule, spec.source, spec.label) == ("mdl", "measured", "mdl:measured")
    scores = LayerScores([LayerScore(n, 1.0, 10) for n in table.blocks], method="none")
    same = allocation_by_rule("mdl:measured", scores, 6, lower=0, utility=back)
    assert same.counts() == alloc.counts()
    cont = allocation_from_utility(back, 6.5, lower=0, integer=False)
    assert cont.spent == pytest.approx(6.5)


@pytest.mark.parametrize("case, message", [
    ("nan", "finite"),
    ("decreasing", "decreases with the level"),
    ("level0", "level 0"),
    ("schema", "schema"),
    ("rows", "one value per level"),
])
def test_bad_tables_are_refused(tmp_path, case, message):
    doc = _table().to_dict()
    if case == "nan":
        doc["reduction"][1][2] = float("nan")
    elif case == "decreasing":
        doc["reduction"][2][3] = doc["reduction"][2][2] - 0.05
    elif case == "level0":
        doc["reduction"][0][0] = 0.1
    elif case == "schema":
        doc["schema"] = "layercap.damage/v1"
    else:
        doc["reduction"][0] = doc["reduction"][0][:2]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc, allow_nan=True))
    with pytest.raises(LayercapError, match=message) as err:
        UtilityTable.load(path)
    assert str(path) in str(err.value)
    if case == "decreasing":  # names the block and the level; a partial table is not yet a curve
        assert "model.layers.2" in str(err.value) and "4 units" in str(err.value)
        doc["complete"] = False
        path.write_text(json.dumps(doc))
        assert not UtilityTable.load(path).complete


def test_table_from_another_model_is_refused(tmp_path):
    path = _table(K=3).save(tmp_path / "u.json")
    with pytest.raises(LayercapError, match="another model"):
        load_for(path, [f"model.layers.{k}" for k in range(4)])
    with pytest.raises(LayercapError, match="other weights"):
        load_for(path, [f"model.layers.{k}" for k in range(3)], fingerprint={"params": 11, "sha256": "cd"})
    scores = LayerScores([LayerScore(f"h.{k}", 1.0, 10) for k in range(3)], method="none")
    with pytest.raises(LayercapError, match="another model"):
        allocation_by_rule("mdl:measured", scores, 4, utility=UtilityTable.load(path))
    with pytest.raises(LayercapError, match="utility table"):
        allocation_by_rule("mdl:measured", scores, 4)


def test_program_bad_input():
    U, levels = np.array([[0.1, 0.2]]), [1, 2]
    with pytest.raises(LayercapError, match="not extrapolated"):
        solve_utility_program(U, levels, [1.0], 3)
    with pytest.raises(LayercapError, match="lower bounds alone"):
        solve_utility_program(U, levels, [1.0], 1, lower=2)
    with pytest.raises(LayercapError, match="finite"):
        solve_utility_program(np.array([[0.1, np.inf]]), levels, [1.0], 1)
    with pytest.raises(LayercapError, match="increasing"):
        solve_utility_program(U, [2, 1], [1.0], 1)


def test_allocate_command_reads_a_utility_table(tmp_path, capsys):
    table = _table()
    path = table.save(tmp_path / "u.json")
    out = tmp_path / "alloc.json"
    assert cli_main(["allocate", "--rule", "mdl:measured", "--utility", str(path), "--budget", "6", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["rule"] == "mdl:measured" and sum(l["n"] for l in doc["layers"]) == 6
    # bad input: nothing written
    bad = table.to_dict()
    bad["reduction"][1][3] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    out2 = tmp_path / "alloc2.json"
    assert cli_main(["allocate", "--rule", "mdl:measured", "--utility", str(tmp_path / "bad.json"), "--budget", "6",
                     "-o", str(out2)]) == 2
    assert "decreases with the level" in capsys.readouterr().err and not out2.exists()
    scores = LayerScores([LayerScore(f"h.{k}", 1.0, 10) for k in range(4)], method="none")
    scores.save(tmp_path / "s.json")
    assert cli_main(["allocate", str(tmp_path / "s.json"), "--rule", "mdl:measured", "--utility", str(path),
                     "--budget", "6", "-o", str(out2)]) == 2
    assert "another model" in capsys.readouterr().err and not out2.exists()
    assert cli_main(["allocate", "--rule", "mdl:measured", "--budget", "6", "-o", str(out2)]) == 2
    assert "--utility" in capsys.readouterr().err and not out2.exists()
