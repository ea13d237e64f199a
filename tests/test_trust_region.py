"""Calibrated gains (scores/trust_region.py): the Levenberg-Marquardt search on quadratics with known
curvature, the -tr methods and gain on a tiny model, and `layercap score --method kfac-tr`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layercap import LayerScores
from layercap.cli import main
from layercap.data.calibration import CalibrationSet
from layercap.models.tiny import build_tiny
from layercap.scores import ScoreOptions, param_groups, score_model
from layercap.scores.trust_region import TR_HIGH, TR_LOW, line_search, newton_steps, stepped, trust_region


def windows(n=4, seqlen=12, seed=0) -> CalibrationSet:
    ids = torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, f"sha-{seed}-{n}-{seqlen}", "random", seed)


def quadratic(dim=12, seed=0, lo=1.0, hi=10.0):
    """(C, g) with C's eigenvalues in [lo, hi]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    ev = torch.linspace(lo, hi, dim, dtype=torch.float64)
    return q @ torch.diag(ev) @ q.T, torch.randn(dim, generator=gen, dtype=torch.float64)


def model_and_truth(c_model, c_true, g):
    """solve(lam) with the model curvature; decrease(d) of the true quadratic f(d) = g'd + d'C d/2."""
    eye = torch.eye(g.numel(), dtype=torch.float64)

    def solve(lam):
        x = torch.linalg.solve(c_model + lam * eye, g)
        return float(g @ x), {"w": -x}

    def decrease(step):
        d = step["w"]
        return -float(g @ d + 0.5 * d @ c_true @ d)

    return solve, decrease


def test_trust_region_on_an_exact_quadratic_converges_to_the_exact_decrease():
    c, g = quadratic()
    solve, decrease = model_and_truth(c, c, g)
    lam0 = 0.1 * float(torch.trace(c)) / c.shape[0]
    exact = 0.5 * float(g @ torch.linalg.solve(c, g))  # the undamped Newton step's decrease
    tr = trust_region(solve, decrease, lam0, max_evals=8, factor=10.0)
    # an exact model never overpredicts: r = 2 - g'MCMg / g'Mg in (1, 2], lambda shrinks every trial
    assert all(1.0 < r <= 2.0 for _, r in tr.history)
    assert [lam for lam, _ in tr.history] == pytest.approx([lam0 * 10.0**-i for i in range(8)])
    assert tr.accepted and tr.lam == pytest.approx(lam0 * 1e-7)
    assert tr.ratio == pytest.approx(1.0, abs=1e-6)
    assert 0.5 * tr.zeta2 == pytest.approx(exact, rel=1e-6)  # zeta^2/2 equals the true decrease
    assert tr.decrease == pytest.approx(exact, rel=1e-6)
    # r -> 1 monotonically as lambda -> 0
    rs = [r for _, r in tr.history]
    assert all(a >= b for a, b in zip(rs, rs[1:]))


def test_trust_region_grows_lambda_when_the_model_overpredicts():
    c, g = quadratic(seed=1)
    solve, decrease = model_and_truth(c / 1e4, c, g)  # curvature underestimated 10^4-fold
    lam0 = 0.1 * float(torch.trace(c / 1e4)) / c.shape[0]
    tr = trust_region(solve, decrease, lam0, max_evals=10, factor=10.0)
    assert tr.history[0][1] < TR_LOW  # the damped Newton step at lambda_0 raises or barely lowers f
    assert tr.accepted and TR_LOW <= tr.ratio <= TR_HIGH and tr.lam > lam0
    assert tr.decrease > 0 and tr.ratio == pytest.approx(tr.decrease / (0.5 * tr.zeta2))
    assert tr.step is not None and decrease(tr.step) == pytest.approx(tr.decrease)
    # a bracket (too small, large enough) is bisected in log space
    lams = [lam for lam, _ in tr.history]
    assert all(b > a for a, b in zip(lams, lams[1:3]))


def test_trust_region_without_an_acceptable_lambda_reports_the_largest_trial():
    c, g = quadratic(seed=2)
    solve, decrease = model_and_truth(c / 1e8, c, g)
    tr = trust_region(solve, decrease, 1e-9, max_evals=3, factor=10.0)
    assert not tr.accepted and tr.lam == pytest.approx(1e-7) and tr.evals == 3 and tr.ratio < TR_LOW


def test_line_search_halves_or_doubles_while_it_helps():
    f = lambda t, best: 1.0 - (t - best) ** 2  # decrease along the step, best at t = best
    assert line_search(lambda t: f(t, 0.25), f(1.0, 0.25), max_evals=3) == (0.25, pytest.approx(1.0))
    assert line_search(lambda t: f(t, 4.0), f(1.0, 4.0), max_evals=3)[0] == 4.0
    assert line_search(lambda t: f(t, 1.0), f(1.0, 1.0), max_evals=3) == (1.0, 1.0)
    calls = []
    line_search(lambda t: calls.append(t) or f(t, 1e-3), f(1.0, 1e-3), max_evals=3)
    assert calls == [0.5, 0.25, 0.125]  # never more than max_evals forward passes


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_tiny("llama", num_layers=2, hidden=16, seed=3)
    return model


@pytest.mark.parametrize("method", ["diag-tr", "kfac-tr", "ekfac-tr", "exact-tr"])
def test_tr_methods_steps_reduce_the_loss(tiny, method):
    calib = windows()
    before = [p.detach().clone() for p in tiny.parameters()]
    opts = ScoreOptions(batch_size=2, damping=1e-3, cg_max_iter=8, tr_max_evals=8)
    scores = score_model(tiny, method, calib, options=opts)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.parameters()))  # the model is restored
    info = scores.metadata["method_info"]
    K = len(scores)
    for key in ("initial_lambda", "damping_lambda", "tr_ratio", "tr_accepted", "tr_evals", "predicted_decrease",
                "measured_decrease", "tr_history"):
        assert len(info[key]) == K, key
    assert info["forward_passes"] == 1 + sum(info["tr_evals"])
    for k in range(K):
        r, lam, lam0 = info["tr_ratio"][k], info["damping_lambda"][k], info["initial_lambda"][k]
        assert info["tr_accepted"][k] and (TR_LOW <= r <= TR_HIGH or r > TR_HIGH)
        assert info["measured_decrease"][k] > 0  # the accepted step reduces the calibration loss
        assert scores.zeta2[k] == pytest.approx(2 * info["predicted_decrease"][k])
        assert r == pytest.approx(info["measured_decrease"][k] / info["predicted_decrease"][k])
        if info["tr_history"][k][0][1] < TR_LOW:  # the model overpredicted at lambda_0
            assert lam > lam0
    # zeta2 is the base method's zeta2 at the accepted lambda (absolute damping = that lambda)
    if method != "exact-tr":
        base = method[:-3]
        for k, grp in enumerate(param_groups(tiny, "block")):
            ref = score_model(tiny, base, calib, options=ScoreOptions(batch_size=2, damping=info["damping_lambda"][k],
                                                                     damping_mode="absolute"), blocks_regex=rf"model\.layers\.{k}")
            assert scores.zeta2[k] == pytest.approx(ref.zeta2[0], rel=1e-5)


def test_tiny_model_overpredicts_at_small_damping(tiny):
    scores = score_model(tiny, "kfac-tr", windows(), options=ScoreOptions(batch_size=2, damping=1e-4))
    info = scores.metadata["method_info"]
    assert all(h[0][1] < TR_LOW for h in info["tr_history"])  # every block's first trial overpredicts
    assert all(lam > lam0 for lam, lam0 in zip(info["damping_lambda"], info["initial_lambda"]))


def test_gain_is_the_line_searched_decrease(tiny):
    calib = windows()
    opts = ScoreOptions(batch_size=2, damping=1e-3)
    gain = score_model(tiny, "gain", calib, options=opts)
    tr = score_model(tiny, "kfac-tr", calib, options=opts)
    info = gain.metadata["method_info"]
    assert info["damping_lambda"] == tr.metadata["method_info"]["damping_lambda"]  # the same search
    np.testing.assert_allclose(gain.zeta2, 2 * np.maximum(info["gain_decrease"], 0))
    assert all(b >= a for a, b in zip(info["measured_decrease"], info["gain_decrease"]))
    # re-measure block 0's decrease at the chosen scale from the library's Newton step at that lambda
    groups = param_groups(tiny, "block")
    steps, _, _ = newton_steps(tiny, groups, calib, ScoreOptions(batch_size=2, damping=info["damping_lambda"][0],
                                                                 damping_mode="absolute"), "kfac")
    from layercap.scores.engine import local_windows
    from layercap.scores.trust_region import mean_loss

    with stepped(groups[0], steps[0], info["gain_scale"][0]):
        after = mean_loss(tiny, local_windows(calib), 2, "cpu")
    assert info["base_loss"] - after == pytest.approx(info["gain_decrease"][0], rel=1e-4, abs=1e-7)


def test_newton_steps_match_the_scores(tiny):
    calib = windows()
    groups = param_groups(tiny, "block")
    opts = ScoreOptions(batch_size=2)
    for base in ("gradnorm", "diag", "kfac", "ekfac"):
        _, zeta2, _ = newton_steps(tiny, groups, calib, opts, base)
        np.testing.assert_allclose(zeta2, score_model(tiny, base, calib, options=opts).zeta2, rtol=1e-6)


def test_bad_trust_region_options():
    from layercap.errors import LayercapError

    with pytest.raises(LayercapError, match="tr-factor"):
        ScoreOptions(tr_factor=1.0).validate()
    with pytest.raises(LayercapError, match="tr-max-evals"):
        ScoreOptions(tr_max_evals=0).validate()


def test_score_command_kfac_tr_writes_r_per_block(tmp_path, wikitext, capsys):
    model, tok = build_tiny("llama", num_layers=2, hidden=16)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text(wikitext.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    out = tmp_path / "scores.json"
    rc = main(["score", str(tmp_path / "m"), "--data", str(text), "--method", "kfac-tr", "--nsamples", "3", "--seqlen", "16",
               "--batch-size", "2", "--tr-max-evals", "5", "-o", str(out), "--quiet"])
    assert rc == 0
    scores = LayerScores.load(out)
    assert scores.method == "kfac-tr"
    info = json.loads(out.read_text())["metadata"]["method_info"]
    assert len(info["tr_ratio"]) == len(scores) == 2 and all(np.isfinite(info["tr_ratio"]))
    assert all(1 <= n <= 5 for n in info["tr_evals"]) and info["tr_max_evals"] == 5
    table = capsys.readouterr().out
    assert "lambda" in table and " r " in table.splitlines()[0] + " "
    assert main(["score", str(tmp_path / "m"), "--data", str(text), "--method", "kfac-tr", "--tr-factor", "1",
                 "-o", str(tmp_path / "bad.json"), "--quiet"]) != 0
    assert not (tmp_path / "bad.json").exists()
