"""Baseline score sources: heavy-tail alpha (AlphaPruning), OWL outlier ratio, LayerIF influence."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from layercap import LayercapError
from layercap.data.calibration import CalibrationSet
from layercap.models import find_blocks, linear_weight
from layercap.models.tiny import FAMILIES, build_tiny
from layercap.scores.heavytail import HeavyTailScores, esd, heavytail_scores, pl_alpha_hill
from layercap.scores.influence import (
    InfluenceResult,
    aggregate_influence,
    datainf_damping,
    datainf_ihvp,
    layer_influences,
    make_projections,
    per_sample_gradients,
    per_sample_nll,
)
from layercap.scores.owl import input_norms, outlier_ratio, owl_scores, wanda_metric


def windows(n=6, seqlen=16, seed=0) -> CalibrationSet:
    ids = torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, f"sha-{seed}", "random", seed)


# ---- heavy-tail alpha -------------------------------------------------------------------------
def _reference_ks_alpha(e: np.ndarray) -> float:
    """Plain loop over every xmin candidate (fix_fingers=None), as in AlphaPruning's estimator."""
    e = np.sort(e)
    N = len(e)
    best = (np.inf, None)
    for i in range(N - 1):
        n = N - i
        alpha = 1 + n / (np.sum(np.log(e[i:])) - n * np.log(e[i]))
        if alpha > 1:
            D = max(abs(1 - (e[i + j] / e[i]) ** (1 - alpha) - j / n) for j in range(n))
            if D < best[0]:
                best = (D, alpha)
    return best[1]


def test_hill_matches_hand_formula_on_small_vector():
    e = np.array([16.0, 1.0, 4.0, 2.0, 8.0])
    fit = pl_alpha_hill(e, fix_fingers="xmin_mid")
    # tail = [4, 8, 16], xmin = 4: alpha = 1 + 3 / (log 1 + log 2 + log 4) = 1 + 1 / ln 2
    assert fit.alpha == pytest.approx(1 + 1 / math.log(2), rel=1e-12)
    assert fit.xmin == 4.0 and fit.n_tail == 3 and fit.n == 5
    # KS: max(|1-1-0|, |1-e^-1-1/3|, |1-e^-2-2/3|)
    assert fit.D == pytest.approx(1 - math.exp(-1) - 1 / 3, rel=1e-12)
    ref = _reference_ks_alpha(e)
    assert pl_alpha_hill(e, fix_fingers=None).alpha == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("alpha", [2.5, 4.0])
@pytest.mark.parametrize("fix_fingers", ["xmin_mid", "xmin_peak", None])
def test_hill_recovers_power_law_exponent(alpha, fix_fingers):
    rng = np.random.default_rng(0)
    u = rng.random(4000)
    samples = 0.5 * (1 - u) ** (-1 / (alpha - 1))  # Pareto, pdf ~ x^-alpha for x >= 0.5
    fit = pl_alpha_hill(samples, fix_fingers=fix_fingers)
    assert fit.alpha == pytest.approx(alpha, abs=0.25)


def test_hill_random_search_matches_loop_reference():
    rng = np.random.default_rng(1)
    e = np.exp(rng.normal(size=60))
    assert pl_alpha_hill(e, fix_fingers=None).alpha == pytest.approx(_reference_ks_alpha(e), rel=1e-10)


def test_hill_xmin_peak_matches_loop_reference_with_torch_histc():
    rng = np.random.default_rng(2)
    e = np.sort(np.exp(rng.normal(size=200)) * 0.01)  # eigenvalues below 1, as in LLM weights
    log10 = torch.log10(torch.tensor(e))
    counts = torch.histc(log10, 100, min=float(log10.min()), max=float(log10.max()))
    edges = torch.linspace(float(log10.min()), float(log10.max()), 101)
    xmin2 = float(10 ** edges[int(torch.argmax(counts))])
    lo, hi = math.log10(0.95 * xmin2), 1.5 * xmin2  # AlphaPruning's (log-valued) lower bound
    best = (np.inf, None)
    for i in range(len(e) - 1):
        if e[i] < lo:
            continue
        if e[i] > hi:
            break
        n = len(e) - i
        alpha = 1 + n / (np.sum(np.log(e[i:])) - n * np.log(e[i]))
        if alpha > 1:
            D = max(abs(1 - (e[i + j] / e[i]) ** (1 - alpha) - j / n) for j in range(n))
            if D < best[0]:
                best = (D, alpha)
    assert pl_alpha_hill(e, fix_fingers="xmin_peak").alpha == pytest.approx(best[1], rel=1e-9)


def test_esd_is_squared_singular_values():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    ref = np.sort(torch.linalg.svdvals(w.double()).numpy() ** 2)
    np.testing.assert_allclose(esd(w), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(esd(w.T), ref, rtol=1e-10, atol=1e-12)


def test_heavytail_block_score_is_mean_of_matrices(tmp_path):
    model, _ = build_tiny("gpt2")  # Conv1D: linear_weight transposes
    blocks = find_blocks(model)
    result = heavytail_scores(blocks, fix_fingers="xmin_mid")
    for block, a in zip(blocks, result.alpha):
        per = [pl_alpha_hill(esd(linear_weight(m)), fix_fingers="xmin_mid").alpha for m in block.linears.values()]
        assert a == pytest.approx(np.mean(per), rel=1e-12)
    path = result.save(tmp_path / "alpha.json")
    assert HeavyTailScores.load(path) == result


def test_heavytail_bad_inputs():
    with pytest.raises(LayercapError, match="fix_fingers"):
        pl_alpha_hill([1.0, 2.0, 3.0], fix_fingers="xmin_bogus")
    with pytest.raises(LayercapError, match="at least 2 positive"):
        pl_alpha_hill([0.0, 0.0, 5.0])
    with pytest.raises(LayercapError, match="no Linear"):
        heavytail_scores([{}])


# ---- OWL ----------------------------------------------------------------------------------------
def test_owl_ratio_hand_count():
    lin = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    metric = wanda_metric(lin, torch.tensor([1.0, 10.0]))
    assert torch.equal(metric, torch.tensor([[1.0, 20.0], [3.0, 40.0]]))
    # mean 16: with M = 2 only 40 > 32 -> 1/4; with M = 1, 20 and 40 > 16 -> 2/4
    assert outlier_ratio(metric, m=2.0) == 0.25
    assert outlier_ratio(metric, m=1.0) == 0.5
    # strictly greater: an entry equal to the threshold is not an outlier
    assert outlier_ratio(torch.tensor([0.0, 0.0, 0.0, 4.0]), m=4.0) == 0.0


def test_owl_pools_a_blocks_linears():
    a = torch.tensor([1.0, 1.0, 1.0, 9.0])  # alone (M=2): 9 > 5 -> 1/4
    b = torch.tensor([100.0, 100.0])  # alone: 0/2
    assert outlier_ratio(a, 2.0) == 0.25 and outlier_ratio(b, 2.0) == 0.0
    # pooled: mean 212/6 = 35.3, threshold 70.7 -> the two 100s -> 2/6 (the mean of ratios would be 1/8)
    assert outlier_ratio([a, b], 2.0) == pytest.approx(2 / 6)


def test_owl_input_norms_match_a_manual_forward():
    model, _ = build_tiny("llama")
    calib = windows(4)
    block = model.model.layers[0]
    norms = input_norms(model, [block.self_attn.q_proj], calib, batch_size=3)
    with torch.no_grad():
        x = block.input_layernorm(model.model.embed_tokens(calib.input_ids))
    ref = x.reshape(-1, x.shape[-1]).norm(dim=0)
    torch.testing.assert_close(norms[block.self_attn.q_proj], ref, rtol=1e-5, atol=1e-6)
    ratios = owl_scores(model, find_blocks(model), calib)
    assert ratios.shape == (4,) and np.all((ratios >= 0) & (ratios <= 1))


# ---- DataInf / LayerIF -------------------------------------------------------------------------
def test_datainf_ihvp_closed_form_and_damping():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    v = torch.randn(7, generator=gen, dtype=torch.float64)
    lam = datainf_damping(G)
    assert lam == pytest.approx(0.1 * float((G**2).mean()))
    expected = sum((v - (g @ v) / (lam + g @ g) * g) for g in G) / (5 * lam)
    torch.testing.assert_close(datainf_ihvp(G, v), expected)
    # several right-hand sides at once
    V = torch.stack([v, 2 * v])
    torch.testing.assert_close(datainf_ihvp(G, V)[1], 2 * expected)


def test_datainf_single_sample_is_exact_damped_inverse():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(1, 9, generator=gen, dtype=torch.float64)
    v = torch.randn(9, generator=gen, dtype=torch.float64)
    lam = 0.37
    exact = torch.linalg.solve(g.T @ g + lam * torch.eye(9, dtype=torch.float64), v)
    torch.testing.assert_close(datainf_ihvp(g, v, damping=lam), exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_per_sample_gradients_match_autograd(family):
    model, _ = build_tiny(family)
    calib = windows(3, 12)
    modules = list(find_blocks(model)[1].linears.values())
    exact = per_sample_gradients(model, modules, calib, make_projections(modules, 0), batch_size=2)
    projections = make_projections(modules, 4, seed=3)
    sketched = per_sample_gradients(model, modules, calib, projections, batch_size=3)
    for i in range(3):
        model.zero_grad()
        per_sample_nll(model, calib.input_ids[i : i + 1]).sum().backward()
        for j, m in enumerate(modules):
            ref = (m.weight.grad if isinstance(m, torch.nn.Linear) else m.weight.grad.T).float()  # Conv1D: (in, out)
            torch.testing.assert_close(exact[j][i].reshape(ref.shape), ref, rtol=1e-4, atol=1e-6)
            p_out, p_in = projections[j]
            sk = ref
            sk = p_out.T @ sk if p_out is not None else sk
            sk = sk @ p_in if p_in is not None else sk
            torch.testing.assert_close(sketched[j][i].reshape(sk.shape), sk, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_layer_influence_equals_dense_datainf():
    model, _ = build_tiny("llama")
    train, val = windows(5, 12, seed=0), windows(3, 12, seed=1)
    blocks = find_blocks(model)
    result = layer_influences(model, blocks, train, val, proj_dim=0, batch_size=2)
    flags = [p.requires_grad for p in model.parameters()]
    # reference: full per-window gradients of each Linear by autograd, DataInf by explicit sums
    def grads(data):
        out = []
        for ids in data.input_ids:
            model.zero_grad()
            per_sample_nll(model, ids[None]).sum().backward()
            out.append({id(m): m.weight.grad.detach().double().reshape(-1).clone() for b in blocks for m in b.linears.values()})
        return out

    gt, gv = grads(train), grads(val)
    for k, block in enumerate(blocks):
        u = np.zeros(5)
        for m in block.linears.values():
            G = torch.stack([g[id(m)] for g in gt])
            v = torch.stack([g[id(m)] for g in gv]).mean(0)
            lam = 0.1 * float((G**2).mean())
            ihvp = sum((v - (g @ v) / (lam + g @ g) * g) for g in G) / (5 * lam)
            u += (G @ ihvp).numpy()
        np.testing.assert_allclose(result.matrix[k], u, rtol=2e-3, atol=1e-6 * np.abs(u).max())
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("family", FAMILIES)
def test_influence_finite_for_every_family(family):
    model, _ = build_tiny(family)
    result = layer_influences(model, find_blocks(model), windows(4, 12), windows(2, 12, seed=5), proj_dim=8)
    assert result.matrix.shape == (4, 4) and np.isfinite(result.matrix).all()
    for mode in ("all", "positive", "top25"):
        s = result.scores(mode)
        assert np.isfinite(s).all() and s.min() == 0.0


def test_influence_aggregates_by_hand(tmp_path):
    u = np.array([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -1.0, 2.0]])
    np.testing.assert_allclose(aggregate_influence(u, "all"), [-2.0, 2.0])
    np.testing.assert_allclose(aggregate_influence(u, "positive"), [4.0, 3.0])
    # top25 keeps int(0.25 * 4) + 1 = 2 largest (LayerIF's partition rule)
    np.testing.assert_allclose(aggregate_influence(u, "top25"), [4.0, 2.5])
    with pytest.raises(LayercapError, match="aggregate"):
        aggregate_influence(u, "median")
    r = InfluenceResult(["a", "b"], u.tolist(), {"a": [0.1], "b": [0.2]}, 32, 4, 2)
    np.testing.assert_allclose(r.scores("all"), [0.0, 4.0])
    assert InfluenceResult.load(r.save(tmp_path / "inf.json")) == r


# ---- registry integration -------------------------------------------------------------------------
def test_registry_methods_return_layer_scores():
    from layercap.scores import ScoreOptions, available_methods, score_model

    assert {"alpha-hill", "owl", "influence"} <= set(available_methods())
    model, _ = build_tiny("llama")
    calib = windows(6, 12)
    alpha = score_model(model, "alpha-hill")
    assert alpha.method == "alpha-hill" and len(alpha) == 4
    np.testing.assert_allclose(alpha.zeta2, heavytail_scores(find_blocks(model)).alpha)
    owl = score_model(model, "owl", calib)
    assert owl.method == "owl" and np.all(owl.zeta2 <= 1)
    opts = ScoreOptions(extra={"validation": windows(3, 12, seed=9), "aggregate": "positive", "proj_dim": 0})
    inf = score_model(model, "influence", calib, options=opts)
    assert inf.method == "influence" and inf.metadata["method_info"]["aggregate"] == "positive"
    with pytest.warns(UserWarning, match="no validation set"):
        score_model(model, "influence", calib)
    with pytest.raises(LayercapError, match="aggregate"):
        score_model(model, "influence", calib, options=ScoreOptions(extra={"aggregate": "bogus"}))


# ---- real model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_alpha_hill_in_a_sane_range(smollm2):
    model, _ = smollm2
    blocks = find_blocks(model)
    assert len(blocks) == 30
    alpha = np.array(heavytail_scores(blocks).alpha)
    # measured (xmin_peak): 2.51 .. 7.18 over the 30 blocks; trained LLM layers are heavy-tailed
    assert np.all((alpha > 2.0) & (alpha < 8.0)), alpha
    assert alpha.std() > 0.1  # blocks differ


# ---- the science-check script (benchmarks/validate_gains.py) -------------------------------------
def _validate_gains_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "validate_gains.py"
    spec = importlib.util.spec_from_file_location("validate_gains", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["validate_gains"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_validate_gains_method_specs():
    vg = _validate_gains_module()
    assert vg.parse_spec("kfac:true@10", "empirical", 0.1) == ("kfac", "true", 10.0)
    assert vg.parse_spec("diag", "true", 0.1) == ("diag", "true", 0.1)
    assert vg.parse_spec("exact@2.5", "empirical", 0.1) == ("exact", "empirical", 2.5)
    for bad, message in (("gradnorm:true", "Fisher flavour"), ("diag:sampled", "empirical"), ("kfac@x", "number"),
                         ("kfac@0", "> 0")):
        with pytest.raises(LayercapError, match=message):
            vg.parse_spec(bad, "empirical", 0.1)
    with pytest.raises(SystemExit):
        vg.parse(["--methods", "nope"])


def test_validate_gains_calibrated_specs():
    vg = _validate_gains_module()
    assert vg.parse_spec("kfac-tr:true@10", "empirical", 0.1) == ("kfac-tr", "true", 10.0)
    assert [vg.tr_of_gain(s) for s in ("gain", "gain:true@10", "gain-diag", "gain-ekfac@3", "kfac", "kfac-tr")] == [
        "kfac-tr", "kfac-tr:true@10", "diag-tr", "ekfac-tr@3", None, None]
    args = vg.parse(["--methods", "gradnorm,kfac-tr,gain,diag-tr", "--newton", "ekfac"])
    assert args.methods == ["gradnorm", "kfac-tr", "gain", "diag-tr"] and args.tr_max_evals == 6
    with pytest.raises(LayercapError, match="Fisher flavour"):
        vg.parse_spec("exact-tr:true", "empirical", 0.1)


def test_validate_gains_newton_steps_solve_the_damped_systems():
    from layercap.scores import ScoreOptions, param_groups, score_model
    from layercap.scores.engine import make_context
    from layercap.scores.methods import fisher_pass

    vg = _validate_gains_module()
    model, _ = build_tiny("llama")
    calib = windows(3, 12)
    opts = ScoreOptions(batch_size=2)
    groups = param_groups(model, "module")[:3]
    steps = {kind: vg.newton_step(model, groups, calib, opts, kind) for kind in ("gradnorm", "diag", "kfac")}
    for kind in ("gradnorm", "diag", "kfac"):
        ref = score_model(model, kind, calib, granularity="module", options=opts).zeta2[:3]
        np.testing.assert_allclose(steps[kind]["zeta2"], ref, rtol=1e-5)
    # the Fisher flavour reaches the step: sampled labels give the engine's diag:true zeta2
    true_opts = ScoreOptions(batch_size=2, fisher="true")
    ref = score_model(model, "diag", calib, granularity="module", options=true_opts).zeta2[:3]
    np.testing.assert_allclose(vg.newton_step(model, groups, calib, true_opts, "diag")["zeta2"], ref, rtol=1e-5)
    # exact: the step is minus the CG solution, so g^T(-d) is the engine's exact zeta2
    exact_opts = ScoreOptions(batch_size=2, cg_max_iter=15)  # the same truncated CG in both: no need to converge
    ex = vg.newton_step(model, groups, calib, exact_opts, "exact")
    ref = score_model(model, "exact", calib, granularity="module", options=exact_opts).zeta2[:3]
    np.testing.assert_allclose(ex["zeta2"], ref, rtol=1e-5)
    for k, (st, z) in enumerate(zip(ex["steps"], ex["zeta2"])):
        minus_g = steps["gradnorm"]["steps"][k]
        assert set(st) == set(minus_g)
        assert sum(float((st[n].double() * minus_g[n].double()).sum()) for n in st) == pytest.approx(z, rel=1e-5)
    # K-FAC step of one Linear (no bias): G d A + lambda d = -g with lambda = rho tr(G) tr(A) / dim
    grp = groups[0]
    (wname, w), = grp.params
    stats = fisher_pass(model, groups, make_context(calib, opts, "t", groups, model), dict(grp.linears))
    A, G = stats.a[next(iter(grp.linears))].double(), stats.gg[next(iter(grp.linears))].double()
    lam = 0.1 * float(torch.trace(A) * torch.trace(G)) / w.numel()
    d = steps["kfac"]["steps"][0][wname].double()
    torch.testing.assert_close(G @ d @ A + lam * d, -stats.g[wname].double(), rtol=1e-4, atol=1e-9)
    # measuring a step leaves the weights untouched
    before = w.detach().clone()
    base = vg.mean_nll(model, calib, 2, "cpu")
    after = vg.measure_step(model, grp, steps["diag"]["steps"][0], [calib], 2, "cpu")
    assert torch.equal(w, before) and after[0] != base
    # the line search keeps the best scale on the statistics windows and measures held-out there
    held = windows(2, 12, seed=5)
    bases = [base, vg.mean_nll(model, held, 2, "cpu")]
    scales = (1.0, 0.5, 0.01)
    ls = vg.line_search(model, grp, steps["diag"]["steps"][0], calib, held, bases, scales, 2, "cpu")
    by_scale = {t: base - vg.measure_step(model, grp, steps["diag"]["steps"][0], [calib], 2, "cpu", scale=t)[0] for t in scales}
    assert ls["ls_scale"] == max(by_scale, key=by_scale.get)
    assert ls["ls_stats"] == pytest.approx(max(by_scale.values())) and ls["ls_stats"] >= ls["stats"]
    assert ls["stats"] == pytest.approx(by_scale[1.0])
    after_held = vg.measure_step(model, grp, steps["diag"]["steps"][0], [held], 2, "cpu", scale=ls["ls_scale"])[0]
    assert ls["ls_heldout"] == pytest.approx(bases[1] - after_held)
    assert torch.equal(w, before)


def test_validate_gains_utility_merges_a_finished_record(tmp_path):
    """The measured utility is scored from the statistics windows alone (half adapted on, half
    measured), and a finished record's ground truth is merged instead of recomputed."""
    from layercap.apply.utility import measure_utility
    from layercap.data.calibration import CalibrationSet
    from layercap.models import load_model

    vg = _validate_gains_module()
    common = ["--model", "tiny-llama", "--nsamples", "4", "--seqlen", "24", "--newton", "", "--steps", "2",
              "--utility-units", "1", "--utility-steps", "2"]
    first = tmp_path / "first.json"
    assert vg.main(common + ["--methods", "gradnorm", "--out", str(first)]) == 0
    second = tmp_path / "second.json"
    assert vg.main(common + ["--methods", "utility", "--merge", str(first), "--out", str(second)]) == 0
    a, b = vg.GainsValidation.load(first), vg.GainsValidation.load(second)
    assert b.optimiser == a.optimiser and b.scores["gradnorm"] == a.scores["gradnorm"]  # merged, not recomputed
    assert "optimiser" not in b.wall_time_s  # the Adam budget was not run again
    model, tok = load_model("tiny-llama")
    stats, _ = vg.disjoint_windows(tok, vg.parse([]).data, 4, 24, 0)
    adapt, measure = (CalibrationSet.of_windows(ids, stats.source, stats.seed) for ids in (stats.input_ids[:2], stats.input_ids[2:]))
    table = measure_utility(model, adapt, measure, [0, 1], steps=2, lr=1e-3, batch_size=8, seed=0, progress=False)
    np.testing.assert_allclose(b.scores["utility"], [2 * row[-1] for row in table.reduction], rtol=1e-5, atol=1e-9)
    assert set(b.spearman["utility"]) == {"optim_stats", "optim_heldout"}
