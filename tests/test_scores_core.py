"""zeta^2 estimators against dense references on tiny models (SPEC section 1)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacfwd

from layercap import LayercapError
from layercap.data.calibration import CalibrationSet
from layercap.models.tiny import FAMILIES, build_tiny
from layercap.scores import METHODS, ScoreOptions, available_methods, param_groups, score_model
from layercap.scores.engine import Interrupted, sample_labels, sdpa_math, summed_nll
from layercap.scores.exact import conjugate_gradients

CURVATURE = ("gradnorm", "diag", "kfac", "ekfac", "exact")


def windows(n=4, seqlen=6, seed=0, vocab=320) -> CalibrationSet:
    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, f"sha-{seed}-{n}-{seqlen}", "random", seed)


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_tiny("llama", num_layers=2, hidden=8, seed=1)
    return model


# ---- dense references ---------------------------------------------------------------------------
def per_window_grads(model, calib, names, labels_fn=None):
    """Per-window gradients of the summed NLL (dense autograd), float64, (n, P)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(calib.input_ids.shape[0]):
        x = calib.input_ids[i : i + 1]
        logits = model(input_ids=x, use_cache=False).logits
        labels = None if labels_fn is None else labels_fn(logits, i)
        grads = torch.autograd.grad(summed_nll(logits, x, labels), [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def group_names(model, granularity="block"):
    return [[n for n, _ in g.params] for g in param_groups(model, granularity)]


def tokens(calib):
    return calib.input_ids.shape[0] * (calib.input_ids.shape[1] - 1)


# ---- gradnorm and diag ------------------------------------------------------------------------------
def test_gradnorm_equals_plain_autograd(tiny):
    calib = windows()
    scores = score_model(tiny, "gradnorm", calib, options=ScoreOptions(batch_size=3))
    out = tiny(input_ids=calib.input_ids, use_cache=False)
    loss = summed_nll(out.logits, calib.input_ids) / tokens(calib)  # mean token NLL
    for names, z in zip(group_names(tiny), scores.zeta2):
        params = dict(tiny.named_parameters())
        grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True)
        expected = sum(float(g.double().pow(2).sum()) for g in grads)
        assert z == pytest.approx(expected, rel=1e-5)
    assert scores.q.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_diag_equals_dense_per_window_fisher(tiny, mode):
    calib = windows()
    opts = ScoreOptions(batch_size=2, damping=0.1 if mode == "relative" else 1e-3, damping_mode=mode)
    scores = score_model(tiny, "diag", calib, options=opts)
    n_tok = tokens(calib)
    for names, z in zip(group_names(tiny), scores.zeta2):
        s = per_window_grads(tiny, calib, names)
        g = s.sum(0) / n_tok
        fisher = s.pow(2).sum(0) / n_tok
        lam = 0.1 * float(fisher.mean()) if mode == "relative" else 1e-3
        expected = float((g.pow(2) / (fisher + lam)).sum())
        assert z == pytest.approx(expected, rel=1e-5)


def test_diag_true_fisher_uses_seeded_sampled_labels(tiny):
    calib = windows()
    opts = ScoreOptions(batch_size=4, fisher="true", seed=3)
    scores = score_model(tiny, "diag", calib, options=opts)
    n_tok = tokens(calib)
    sampled = lambda logits, i: sample_labels(logits, torch.tensor([i]), seed=3)
    for names, z in zip(group_names(tiny), scores.zeta2):
        g = per_window_grads(tiny, calib, names).sum(0) / n_tok
        fisher = per_window_grads(tiny, calib, names, sampled).pow(2).sum(0) / n_tok
        lam = 0.1 * float(fisher.mean())
        assert z == pytest.approx(float((g.pow(2) / (fisher + lam)).sum()), rel=1e-5)
    empirical = score_model(tiny, "diag", calib, options=ScoreOptions(batch_size=4))
    assert not np.allclose(scores.zeta2, empirical.zeta2)
    again = score_model(tiny, "diag", calib, options=ScoreOptions(batch_size=1, fisher="true", seed=3))
    np.testing.assert_allclose(again.zeta2, scores.zeta2, rtol=1e-6)


# ---- K-FAC on a deep linear network -----------------------------------------------------------------
class DeepLinearLM(nn.Module):
    """Embedding -> `depth` blocks of one Linear each (no nonlinearity) -> head; positions independent."""

    def __init__(self, vocab=7, width=5, depth=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(num_hidden_layers=depth)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width, bias=(i % 2 == 0))) for i in range(depth))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, **kwargs):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return SimpleNamespace(logits=self.head(h))


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_kfac_is_exact_for_deep_linear_network_on_one_example(fisher):
    """One window of 2 tokens = one predicted token: the per-window Fisher of a Linear is
    (a a^T) (x) (d d^T) exactly, so K-FAC (and EK-FAC) must equal the dense solve."""
    model = DeepLinearLM()
    calib = CalibrationSet(torch.tensor([[2, 5]]), "one", "one", 0)
    opts = ScoreOptions(batch_size=1, fisher=fisher, seed=7)
    kfac = score_model(model, "kfac", calib, options=opts)
    ekfac = score_model(model, "ekfac", calib, options=opts)
    sampled = None if fisher == "empirical" else (lambda logits, i: sample_labels(logits, torch.tensor([i]), seed=7))
    for names, z, ze in zip(group_names(model), kfac.zeta2, ekfac.zeta2):
        g = per_window_grads(model, calib, names)[0]
        s = per_window_grads(model, calib, names, sampled)[0] if sampled else g
        curvature = torch.outer(s, s)
        lam = 0.1 * float(torch.trace(curvature)) / len(s)
        expected = float(g @ torch.linalg.solve(curvature + lam * torch.eye(len(s), dtype=torch.float64), g))
        assert z == pytest.approx(expected, rel=1e-5)
        assert ze == pytest.approx(expected, rel=1e-5)


def test_kfac_factors_match_hand_computed_kronecker_on_multi_token_window():
    """Several tokens: K-FAC = sum_ij (U_G^T g U_A)^2/(s_G s_A + lam) with A, G from the tokens."""
    model = DeepLinearLM(depth=1, seed=3)
    calib = CalibrationSet(torch.tensor([[1, 4, 6, 2, 3], [0, 2, 2, 5, 1]]), "m", "m", 0)
    scores = score_model(model, "kfac", calib, options=ScoreOptions(batch_size=2, damping=0.3))
    lin = model.layers[0][0]
    h_in = model.embed(calib.input_ids)[:, :-1].reshape(-1, 5).double()
    a = torch.cat([h_in, torch.ones(h_in.shape[0], 1, dtype=torch.float64)], 1)
    out = lin(model.embed(calib.input_ids))
    loss = summed_nll(model.head(out), calib.input_ids)
    d, gw, gb = torch.autograd.grad(loss, [out, lin.weight, lin.bias])
    d = d[:, :-1].reshape(-1, 5).double()
    n_tok = a.shape[0]
    A, G = a.T @ a / n_tok, d.T @ d / n_tok
    grad = torch.cat([gw, gb.reshape(-1, 1)], 1).double() / n_tok
    dense = torch.kron(A, G)  # vec(grad) column-major: grad.T.reshape(-1)
    vec = grad.T.reshape(-1)
    lam = 0.3 * float(torch.trace(dense)) / dense.shape[0]
    expected = float(vec @ torch.linalg.solve(dense + lam * torch.eye(dense.shape[0], dtype=torch.float64), vec))
    assert scores.zeta2[0] == pytest.approx(expected, rel=1e-5)


# ---- exact (GGN + CG) ---------------------------------------------------------------------------------
def dense_ggn(model, calib, names):
    params = dict(model.named_parameters())
    primals = {n: params[n].detach() for n in names}
    ids = calib.input_ids

    def f(p):
        return functional_call(model, p, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits

    with sdpa_math():
        jac = jacfwd(f)(primals)
        logits = f(primals)
    n, t, v = logits.shape
    J = torch.cat([jac[name].reshape(n, t, v, -1) for name in names], dim=-1)[:, :-1].double()
    p = torch.softmax(logits[:, :-1].double(), -1)
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    C = torch.einsum("btvp,btvw,btwq->pq", J, H, J) / (n * (t - 1))
    return C


def test_exact_equals_dense_ggn_solve(tiny):
    calib = windows(n=3, seqlen=5)
    opts = ScoreOptions(batch_size=2, damping=1e-2, damping_mode="absolute", cg_tol=1e-10, cg_max_iter=1000)
    scores = score_model(tiny, "exact", calib, options=opts)
    n_tok = tokens(calib)
    for names, z in zip(group_names(tiny), scores.zeta2):
        C = dense_ggn(tiny, calib, names)
        g = per_window_grads(tiny, calib, names).sum(0) / n_tok
        expected = float(g @ torch.linalg.solve(C + 1e-2 * torch.eye(len(g), dtype=torch.float64), g))
        assert z == pytest.approx(expected, rel=1e-4)
    # the sampled-label trace estimate is unbiased for trace(C); with many draws it is close
    rel = score_model(tiny, "exact", calib, options=ScoreOptions(trace_samples=64, cg_max_iter=2))
    for names, est in zip(group_names(tiny), rel.metadata["method_info"]["trace_estimate"]):
        assert est == pytest.approx(float(torch.trace(dense_ggn(tiny, calib, names))), rel=0.15)


def test_conjugate_gradients_solves_spd_system():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(20, 20))
    C = torch.tensor(m @ m.T)
    b = torch.tensor(rng.normal(size=20))
    x, it, res = conjugate_gradients(lambda v: C @ v, b, 0.5, 1e-12, 200)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(m @ m.T + 0.5 * np.eye(20), b.numpy()), rtol=1e-8)
    assert res <= 1e-12 and it <= 200


def test_trace_estimate_is_unbiased_on_one_example():
    """E_y ||grad nll(y)||^2 = trace(J^T H J): many sampled labels recover the dense GGN trace."""
    model = DeepLinearLM(depth=1, seed=2)
    calib = CalibrationSet(torch.tensor([[3, 1]]), "one", "one", 0)
    names = group_names(model)[0]
    C = dense_ggn(model, calib, names)
    est = score_model(model, "exact", calib, options=ScoreOptions(trace_samples=1000, cg_max_iter=1))
    assert est.metadata["method_info"]["trace_estimate"][0] == pytest.approx(float(torch.trace(C)), rel=0.15)


# ---- invariances ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", CURVATURE)
def test_scores_do_not_depend_on_batch_size(tiny, method):
    calib = windows(n=5, seqlen=6)
    extra = dict(cg_max_iter=8) if method == "exact" else {}
    a = score_model(tiny, method, calib, options=ScoreOptions(batch_size=1, **extra))
    b = score_model(tiny, method, calib, options=ScoreOptions(batch_size=3, **extra))
    # exact: 8 truncated CG iterations amplify float32 rounding of the matvec sums a little
    np.testing.assert_allclose(a.zeta2, b.zeta2, rtol=1e-4 if method == "exact" else 1e-5)


@pytest.mark.parametrize("method", ["diag", "kfac", "ekfac"])
def test_resume_after_interruption_gives_same_scores(tiny, method, tmp_path):
    calib = windows(n=6, seqlen=6)
    full = score_model(tiny, method, calib, options=ScoreOptions(batch_size=1))
    ckpt = tmp_path / "ckpt"
    broken = ScoreOptions(batch_size=1, checkpoint_dir=str(ckpt), checkpoint_every=1, extra={"_interrupt_after_batches": 4 if method != "ekfac" else 8})
    with pytest.raises(Interrupted):
        score_model(tiny, method, calib, options=broken)
    assert any(ckpt.iterdir())
    resumed = score_model(tiny, method, calib, options=ScoreOptions(batch_size=1, checkpoint_dir=str(ckpt), resume=True))
    np.testing.assert_allclose(resumed.zeta2, full.zeta2, rtol=1e-6)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_streaming_blocks_under_a_factor_budget_gives_the_same_scores(method):
    """--max-factor-gb: groups streamed in chunks (one data pass each) score exactly as one pass."""
    from layercap.scores.methods import chunk_groups, statistics_bytes

    model, _ = build_tiny("llama", num_layers=4, hidden=8, seed=3)
    calib = windows(n=3, seqlen=6)
    groups = param_groups(model, "block")
    one_block = max(statistics_bytes(g) for g in groups)
    budget_gb = 2.5 * one_block / 2**30  # two blocks per chunk
    assert [len(c) for c in chunk_groups(groups, int(budget_gb * 2**30))] == [2, 2]
    assert [len(c) for c in chunk_groups(groups, 1)] == [1, 1, 1, 1]  # a group over budget stands alone
    assert len(chunk_groups(groups, None)) == 1
    full = score_model(model, method, calib, options=ScoreOptions(batch_size=2))
    streamed = score_model(model, method, calib, options=ScoreOptions(batch_size=2, max_factor_gb=budget_gb))
    np.testing.assert_allclose(streamed.zeta2, full.zeta2, rtol=1e-6)
    assert full.metadata["method_info"]["statistics_passes"] == 1
    assert streamed.metadata["method_info"]["statistics_passes"] == 2
    with pytest.raises(LayercapError, match="max-factor-gb"):
        score_model(model, method, calib, options=ScoreOptions(max_factor_gb=0.0))


def test_streamed_kfac_resumes_across_chunks(tmp_path):
    model, _ = build_tiny("llama", num_layers=3, hidden=8, seed=4)
    calib = windows(n=4, seqlen=6)
    tiny_budget = 1e-9  # every block its own chunk: three statistics passes
    full = score_model(model, "kfac", calib, options=ScoreOptions(batch_size=1, max_factor_gb=tiny_budget))
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(Interrupted):  # dies in the second chunk's pass
        score_model(model, "kfac", calib, options=ScoreOptions(batch_size=1, max_factor_gb=tiny_budget, checkpoint_dir=ckpt,
                                                               extra={"_interrupt_after_batches": 6}))
    resumed = score_model(model, "kfac", calib, options=ScoreOptions(batch_size=1, max_factor_gb=tiny_budget,
                                                                     checkpoint_dir=ckpt, resume=True))
    np.testing.assert_allclose(resumed.zeta2, full.zeta2, rtol=1e-6)


def test_resume_refuses_checkpoint_of_other_settings(tiny, tmp_path):
    calib = windows(n=4, seqlen=6)
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(Interrupted):
        score_model(tiny, "diag", calib, options=ScoreOptions(batch_size=1, checkpoint_dir=ckpt, extra={"_interrupt_after_batches": 2}))
    with pytest.raises(LayercapError, match="different settings"):
        score_model(tiny, "diag", calib, options=ScoreOptions(batch_size=2, checkpoint_dir=ckpt, resume=True))


def test_scoring_leaves_model_untouched(tiny):
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in tiny.named_parameters()}
    for p in tiny.model.embed_tokens.parameters():
        p.requires_grad_(False)
    score_model(tiny, "kfac", windows())
    assert not any(p.requires_grad for p in tiny.model.embed_tokens.parameters())
    for p in tiny.model.embed_tokens.parameters():
        p.requires_grad_(True)
    for n, p in tiny.named_parameters():
        assert torch.equal(p.detach(), before[n][0])
        assert p.grad is None


# ---- every family, every method -------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_every_method(family):
    model, _ = build_tiny(family, num_layers=2, hidden=16)
    calib = windows(n=2, seqlen=5)
    for method in CURVATURE:
        scores = score_model(model, method, calib, options=ScoreOptions(batch_size=2, cg_max_iter=3))
        assert len(scores) == 2
        assert np.all(np.isfinite(scores.zeta2)) and np.all(scores.zeta2 > 0), (family, method, scores.zeta2)
        assert scores.metadata["method"] == method and scores.metadata["data_sha256"] == calib.sha256


# ---- groups, registry, metadata, errors --------------------------------------------------------------
def test_module_and_user_groups(tiny):
    calib = windows()
    mod = score_model(tiny, "kfac", calib, granularity="module")
    assert len(mod) == 2 * 7 and mod.names[0] == "model.layers.0.self_attn.q_proj"
    blocks = param_groups(tiny)
    assert sum(g.num_params for g in blocks) == sum(p.numel() for n, p in tiny.named_parameters() if ".layers." in n)
    user = score_model(tiny, "diag", calib, granularity={"attn": r"self_attn", "mlp": r"\.mlp\.", "embed": "embed_tokens"})
    assert user.names == ["attn", "mlp", "embed"]
    groups = param_groups(tiny, {"attn": r"self_attn"})
    assert len(groups[0].linears) == 8  # q, k, v, o of both blocks get Kronecker factors
    with pytest.raises(LayercapError, match="match no parameter"):
        param_groups(tiny, {"x": "does-not-exist"})
    with pytest.raises(LayercapError, match="granularity"):
        param_groups(tiny, "layer")


def test_registry_and_errors(tiny):
    assert set(CURVATURE) <= set(METHODS) and {"alpha-hill", "owl", "influence"} <= set(available_methods())
    with pytest.raises(LayercapError, match="unknown score method"):
        score_model(tiny, "nope", windows())
    with pytest.raises(LayercapError, match="needs calibration data"):
        score_model(tiny, "diag", None)
    with pytest.raises(LayercapError, match="--damping"):
        score_model(tiny, "diag", windows(), options=ScoreOptions(damping=0))
    with pytest.raises(LayercapError, match="--fisher"):
        score_model(tiny, "diag", windows(), options=ScoreOptions(fisher="observed"))


def test_metadata_recorded(tiny):
    calib = windows()
    s = score_model(tiny, "kfac", calib, metadata={"note": "x"})
    m = s.metadata
    for key in ("model", "data_sha256", "tokens", "damping", "granularity", "wall_time_s", "peak_memory_bytes", "versions"):
        assert key in m
    assert m["tokens"] == calib.num_tokens and m["note"] == "x" and m["peak_memory_bytes"] > 0
    assert len(m["method_info"]["damping_lambda"]) == 2


def test_bfloat16_model_gets_float32_statistics():
    model, _ = build_tiny("qwen2", num_layers=2, hidden=16, dtype=torch.bfloat16)
    calib = windows(n=2, seqlen=6)
    ref_model, _ = build_tiny("qwen2", num_layers=2, hidden=16)
    for method in ("diag", "kfac"):
        low = score_model(model, method, calib).zeta2
        ref = score_model(ref_model, method, calib).zeta2
        assert np.all(np.isfinite(low)) and np.all(low > 0)
        # bf16 forward/backward (8-bit mantissa) vs float32: same scores to a few percent
        np.testing.assert_allclose(low, ref, rtol=0.2)
