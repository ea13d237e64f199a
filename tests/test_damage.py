"""Damage curves (issue 13): the cached partial forward, hand-computed damage, resume, OBD, bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from layercap.apply.prune import prune_model
from layercap.apply.prune.damage import _Chain, _obd, Curvature, curvature_stats, damage_curves
from layercap.apply.prune.sequential import capture_block_calls
from layercap.data.calibration import CalibrationSet
from layercap.errors import LayercapError
from layercap.models import find_blocks
from layercap.models.tiny import build_tiny
from layercap.programs.damage import DamageTable, check_levels

torch.set_num_threads(1)


def _calib(n=4, T=16, seed=0):
    ids = torch.randint(0, 320, (n, T), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, f"sha{seed}", "random", seed)


@pytest.fixture(scope="module")
def tiny():
    # float64: the damages are ~1e-5 nats, below float32 round-off of the log-probs
    model, _ = build_tiny("llama", num_layers=3, seed=1, dtype=torch.float64)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_cached_partial_forward_equals_full_forward(family):
    model, _ = build_tiny(family, num_layers=3, seed=2)
    calib = _calib()
    blocks = find_blocks(model)
    batches = list(calib.batches(2))
    inputs, calls = capture_block_calls(model, blocks, batches)
    chain = _Chain(model, blocks, calls, batches)
    states = [inputs]
    for k in range(len(blocks)):
        states.append([chain.run_block(k, j, h) for j, h in enumerate(states[-1])])
    for j, b in enumerate(batches):
        full = model(input_ids=b, use_cache=False).logits
        for k in range(len(blocks) + 1):  # from every cached block input, and from the last output
            part = chain.head(j, chain.run_from(k, j, states[k][j]))
            torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
@torch.no_grad()
def test_damage_equals_hand_computed_loss_difference(tiny, method):
    calib = _calib()
    levels = [0.3, 0.6]
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    table = damage_curves(tiny, calib, levels, method, batch_size=3, progress=False)
    for k, v in tiny.state_dict().items():  # the model is left unchanged
        assert torch.equal(v, before[k])
    ids = calib.input_ids
    dense = torch.log_softmax(tiny(input_ids=ids).logits[:, :-1].double(), -1)
    labels = ids[:, 1:]
    nll_dense = -dense.gather(-1, labels.unsqueeze(-1)).mean().item()
    assert table.dense_nll == pytest.approx(nll_dense, rel=1e-5)
    names = [b.name for b in find_blocks(tiny)]
    for k in (0, 2):
        for j, level in enumerate(levels):
            copy_ = copy.deepcopy(tiny)
            ratios = {n: (level if i == k else 0.0) for i, n in enumerate(names)}
            prune_model(copy_, ratios, method, calib, progress=False, batch_size=4)
            logq = torch.log_softmax(copy_(input_ids=ids).logits[:, :-1].double(), -1)
            kl = (dense.exp() * (dense - logq)).sum(-1).mean().item()
            dnll = -logq.gather(-1, labels.unsqueeze(-1)).mean().item() - nll_dense
            assert kl > 0
            assert table.kl[k][j] == pytest.approx(kl, rel=1e-4, abs=1e-9)
            assert table.dnll[k][j] == pytest.approx(dnll, rel=1e-3, abs=1e-7)
    assert table.complete and table.cost["evaluations"] == 6
    assert table.cost["forward_s"] > 0 and table.cost["per_eval_forward_equivalents"] > 0


@torch.no_grad()
def test_linear_units_equal_hand_computed_loss_difference(tiny):
    """A row per Linear: its KL is the hand loss difference of pruning that module alone, and its
    OBD estimates sum over the block's Linears to the block row's (Wanda masks from dense inputs)."""
    from layercap.apply.prune.damage import prunable_units

    calib, levels = _calib(), [0.3, 0.6]
    curv = curvature_stats(tiny, calib, ("diag", "kfac"))
    lin = damage_curves(tiny, calib, levels, "wanda", batch_size=3, progress=False, curvature=curv, units="linear")
    blk = damage_curves(tiny, calib, levels, "wanda", batch_size=3, progress=False, curvature=curv)
    blocks = find_blocks(tiny)
    units = prunable_units(blocks, "linear")
    assert lin.blocks == [u.name for u in units] and len(units) == 7 * len(blocks)
    assert lin.blocks[0] == "model.layers.0.self_attn.q_proj" and lin.metadata["units"] == "linear"
    assert sum(lin.params) == sum(blk.params) and lin.cost["evaluations"] == len(units) * len(levels)
    for kind in ("diag", "kfac"):
        per_block = np.array(lin.obd[kind]).reshape(len(blocks), 7, len(levels)).sum(1)
        np.testing.assert_allclose(per_block, np.array(blk.obd[kind]), rtol=1e-9)
    ids = calib.input_ids
    dense = torch.log_softmax(tiny(input_ids=ids).logits[:, :-1].double(), -1)
    for i in (0, 9, 20):  # q_proj of block 0, v_proj of block 1, down_proj of block 2
        for j, level in enumerate(levels):
            copy_ = copy.deepcopy(tiny)
            prune_model(copy_, {lin.blocks[i]: level}, "wanda", calib, progress=False, batch_size=4)
            logq = torch.log_softmax(copy_(input_ids=ids).logits[:, :-1].double(), -1)
            kl = (dense.exp() * (dense - logq)).sum(-1).mean().item()
            assert kl > 0 and lin.kl[i][j] == pytest.approx(kl, rel=1e-4, abs=1e-9)
    with pytest.raises(LayercapError, match="units"):
        damage_curves(tiny, calib, levels, "wanda", progress=False, units="row")
    with pytest.raises(LayercapError, match="per block"):
        damage_curves(tiny, calib, levels, "wanda", progress=False, units="linear", context={u.name: 0.5 for u in blocks})


def test_resume_after_interruption_gives_the_same_table(tiny, tmp_path, monkeypatch):
    import layercap.apply.prune.damage as dmg

    calib = _calib()
    levels = [0.2, 0.5, 0.8]
    ref = damage_curves(tiny, calib, levels, "wanda", progress=False)
    ckpt = tmp_path / "d.json.partial"
    real, calls = dmg._kl_nll, {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] > 9:  # die during the 5th evaluation (2 micro-batches each, + 2 dense)
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(dmg, "_kl_nll", flaky)
    with pytest.raises(KeyboardInterrupt):
        damage_curves(tiny, calib, levels, "wanda", batch_size=2, checkpoint=ckpt, progress=False)
    monkeypatch.setattr(dmg, "_kl_nll", real)
    partial = DamageTable.load(ckpt)
    assert not partial.complete and sum(v is not None for r in partial.kl for v in r) == 3
    resumed = damage_curves(tiny, calib, levels, "wanda", batch_size=2, checkpoint=ckpt, progress=False)
    assert resumed.cost["evaluations"] == 6  # only the missing (block, level) pairs
    np.testing.assert_allclose(resumed.values("kl"), ref.values("kl"), rtol=1e-5)
    # a partial table from other levels (or another model) is refused, naming the file
    with pytest.raises(LayercapError, match="levels"):
        damage_curves(tiny, calib, [0.2, 0.5], "wanda", checkpoint=ckpt, progress=False)


def test_kfac_quadratic_form_matches_the_kronecker_product():
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 3, 4
    a = torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    A = a @ a.T
    b = torch.randn(out_f, out_f, generator=g, dtype=torch.float64)
    G = b @ b.T
    dW = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    F = torch.rand(out_f, in_f, generator=g, dtype=torch.float64)

    class B:  # a one-Linear block
        name = "blk"

    curv = Curvature({"blk.lin": F}, {"blk.lin": (A, G)}, "true", 0.0)
    got = _obd(curv, B, {"lin": dW})
    vec = dW.T.reshape(-1).double()  # column-major vec(dW)
    want = 0.5 * float(vec @ torch.kron(A, G) @ vec)
    assert got["kfac"] == pytest.approx(want, rel=1e-10)
    assert got["diag"] == pytest.approx(0.5 * float((F * dW**2).sum()), rel=1e-6)


def test_obd_estimates_and_agreement(tiny):
    calib = _calib(n=4, T=16)
    curv = curvature_stats(tiny, calib, ("diag", "kfac"))
    table = damage_curves(tiny, calib, [0.3, 0.7], "wanda", curvature=curv, progress=False)
    for kind in ("diag", "kfac"):
        est = np.array(table.obd[kind])
        assert np.all(est > 0) and np.all(est[:, 1] > est[:, 0])  # more pruning, more damage
        assert len(table.agreement[kind]) == 2
    only = damage_curves(tiny, calib, [0.3, 0.7], "wanda", curvature=curv, measure=False, progress=False)
    assert not only.complete and only.kl[0][0] is None
    np.testing.assert_allclose(only.values("obd-diag"), table.values("obd-diag"))


def test_record_round_trip_and_bad_input(tiny, tmp_path):
    table = damage_curves(tiny, _calib(), [0.5], "magnitude", progress=False)
    path = table.save(tmp_path / "d.json")
    back = DamageTable.load(path)
    assert back.to_dict() == table.to_dict()
    doc = json.loads(path.read_text())
    bad = dict(doc, kl=[row[:0] for row in doc["kl"]])
    with pytest.raises(LayercapError, match="one value per level"):
        DamageTable.from_dict(bad, "x.json")
    bad = dict(doc, dnll=[[float("nan")] for _ in doc["dnll"]])
    with pytest.raises(LayercapError, match="finite"):
        DamageTable.from_dict(bad, "x.json")
    bad = dict(doc, levels=[1.0])
    with pytest.raises(LayercapError, match=r"outside \[0, 1\)"):
        DamageTable.from_dict(bad, "x.json")
    with pytest.raises(LayercapError, match="another model"):
        back.check_compatible(["a", "b", "c"])
    with pytest.raises(LayercapError, match="model"):
        back.check_compatible(back.blocks, model="smollm2")
    for levels in ([1.0], [-0.1], [0.5, 0.3], [], [float("nan")]):
        with pytest.raises(LayercapError):
            check_levels(levels)


def test_cli_validates_before_writing(tmp_path, capsys):
    from layercap.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "d.json"
    assert main(["damage", "tiny-llama", "--data", str(text), "--levels", "0.5", "1.0", "-o", str(out)]) == 2
    assert "outside [0, 1)" in capsys.readouterr().err and not out.exists()
    rc = main(["damage", "tiny-llama", "--data", str(text), "--levels", "0.3", "0.6", "--nsamples", "2", "--seqlen", "16",
               "--method", "wanda", "--obd", "diag", "--quiet", "-o", str(out)])
    assert rc == 0 and out.exists() and not (tmp_path / "d.json.partial").exists()
    table = DamageTable.load(out)
    assert table.model == "tiny-llama" and len(table.blocks) == 4 and "diag" in table.agreement


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@torch.no_grad()
def test_damage_in_context_equals_hand_computed_loss_difference(tiny, method):
    """Curves at an operating point: block k re-pruned alone at rho, every other block at its
    context ratio (sequential masks), KL to the dense model, minus block k dense in the same context."""
    calib, ctx_calib = _calib(), _calib(n=6, seed=3)
    names = [b.name for b in find_blocks(tiny)]
    context = dict(zip(names, [0.5, 0.4, 0.6]))
    levels = [0.3, 0.7]
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    table = damage_curves(tiny, calib, levels, method, batch_size=3, progress=False, context=context, context_calib=ctx_calib)
    for k, v in tiny.state_dict().items():  # the model leaves dense
        assert torch.equal(v, before[k])
    ids, labels = calib.input_ids, calib.input_ids[:, 1:]
    dense = torch.log_softmax(tiny(input_ids=ids).logits[:, :-1].double(), -1)

    for k in (0, 2):
        ctx_model = copy.deepcopy(tiny)
        prune_model(ctx_model, context, method, ctx_calib, progress=False, batch_size=4)

        def kl_nll(m):
            logq = torch.log_softmax(m(input_ids=ids).logits[:, :-1].double(), -1)
            return ((dense.exp() * (dense - logq)).sum(-1).mean().item(),
                    -logq.gather(-1, labels.unsqueeze(-1)).mean().item())

        ctx_kl, _ = kl_nll(ctx_model)
        assert table.metadata["context"]["kl"] == pytest.approx(ctx_kl, rel=1e-4)
        blk = find_blocks(ctx_model)[k]
        for r, m in blk.linears.items():
            m.weight.copy_(find_blocks(tiny)[k].linears[r].weight)
        kl0, nll0 = kl_nll(ctx_model)
        assert table.metadata["context"]["kl_block_dense"][k] == pytest.approx(kl0, rel=1e-4)
        for j, level in enumerate(levels):
            m_ = copy.deepcopy(ctx_model)
            ratios = {n: (level if i == k else 0.0) for i, n in enumerate(names)}
            # sequential pruning of block k alone: its masks see the pruned prefix's outputs on `calib`
            prune_model(m_, ratios, method, calib, progress=False, batch_size=3)
            kl, nll = kl_nll(m_)
            assert table.kl[k][j] == pytest.approx(kl - kl0, rel=1e-4, abs=1e-9)
            assert table.dnll[k][j] == pytest.approx(nll - nll0, rel=1e-3, abs=1e-7)
    assert table.cost["evaluations"] == 3 * (len(levels) + 1)


def test_context_bad_input_and_resume_in_another_context(tiny, tmp_path):
    calib = _calib()
    names = [b.name for b in find_blocks(tiny)]
    with pytest.raises(LayercapError, match="every block"):
        damage_curves(tiny, calib, [0.5], "wanda", progress=False, context={names[0]: 0.5})
    with pytest.raises(LayercapError, match=r"\[0, 1\)"):
        damage_curves(tiny, calib, [0.5], "wanda", progress=False, context={n: 1.0 for n in names})
    ckpt = tmp_path / "c.json.partial"
    damage_curves(tiny, calib, [0.5], "wanda", progress=False, checkpoint=ckpt, context={n: 0.5 for n in names})
    with pytest.raises(LayercapError, match="another context"):
        damage_curves(tiny, calib, [0.5], "wanda", progress=False, checkpoint=ckpt, context={n: 0.4 for n in names})
    with pytest.raises(LayercapError, match="another context"):
        damage_curves(tiny, calib, [0.5], "wanda", progress=False, checkpoint=ckpt)


def test_cli_context(tmp_path, capsys):
    from layercap.cli import main

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "c.json"
    base = ["damage", "tiny-llama", "--data", str(text), "--levels", "0.3", "0.6", "--nsamples", "2", "--seqlen", "16", "--quiet"]
    assert main(base + ["--context", "1.5", "-o", str(out)]) == 2
    assert "[0, 1)" in capsys.readouterr().err and not out.exists()
    ratios = tmp_path / "r.json"
    from layercap.programs.records import PruningRatios

    PruningRatios.uniform(["model.layers.0"], [10], 0.5).save(ratios)  # another model's blocks
    assert main(base + ["--context", str(ratios), "-o", str(out)]) == 2
    assert "not this model's 4 blocks" in capsys.readouterr().err and not out.exists()
    assert main(base + ["--context", "0.5", "-o", str(out)]) == 0
    table = DamageTable.load(out)
    assert set(table.metadata["context"]["ratios"].values()) == {0.5} and "in context" in capsys.readouterr().out
