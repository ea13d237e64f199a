"""Sequential (block-by-block calibrated) pruning of tiny models of every family."""

from __future__ import annotations

import copy

import pytest
import torch

from layercap.apply.prune import (
    PruningReport,
    capture_block_calls,
    exact_count,
    prune_model,
    rowwise_mask,
    wanda_scores,
)
from layercap.data.calibration import CalibrationSet
from layercap.errors import LayercapError
from layercap.models import find_blocks, linear_weight
from layercap.models.tiny import FAMILIES, build_tiny

RATIOS = (0.3, 0.5, 0.7, 0.0)  # per block of the 4-block tiny models; the last left dense


def random_calib(n: int = 6, seqlen: int = 80, seed: int = 0) -> CalibrationSet:
    """Random token windows; seqlen 80 > the tiny Gemma 2/3 sliding window (64)."""
    ids = torch.randint(1, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, f"random-{seed}", "random", seed)


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    return random_calib()


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_replay_reproduces_block_outputs(family, calib):
    """Replaying the captured per-block calls through the dense blocks gives exactly the outputs of
    the model's own forward (per-layer masks and RoPE of Gemma 2/3, GPT-2's positional args)."""
    model, _ = build_tiny(family)
    blocks = find_blocks(model)
    batches = list(calib.batches(4))
    inputs, calls = capture_block_calls(model, blocks, batches)
    assert len(inputs) == len(batches) and all(len(c) == len(batches) for c in calls)
    real = {k: [] for k in range(len(blocks))}
    hooks = [
        b.module.register_forward_hook(lambda _m, _a, out, k=k: real[k].append(out[0] if isinstance(out, tuple) else out))
        for k, b in enumerate(blocks)
    ]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        hidden = inputs
        for k, block in enumerate(blocks):
            hidden = [call.run(block.module, x) for x, call in zip(hidden, calls[k])]
            for a, b in zip(hidden, real[k]):
                assert torch.equal(a, b), (family, block.name)
    # the block forwards are restored
    assert all("forward" not in b.module.__dict__ for b in blocks)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_family_gets_requested_ratios(family, method, calib):
    model, _ = build_tiny(family)
    blocks = find_blocks(model)
    ratios = {b.name: r for b, r in zip(blocks, RATIOS)}
    report = prune_model(model, ratios, method, calib if method != "magnitude" else None, progress=False)
    assert [m.name for m in report.modules] == [f"{b.name}.{rel}" for b in blocks for rel in b.linears]
    for block, ratio in zip(blocks, RATIOS):
        for rel, module in block.linears.items():
            w = linear_weight(module)
            rec = next(m for m in report.modules if m.name == f"{block.name}.{rel}")
            expected = w.shape[0] * exact_count(ratio, w.shape[1]) if method == "wanda" else exact_count(ratio, w.numel())
            assert rec.pruned == expected, (rec.name, rec.pruned, expected)
            assert rec.zeros == int((w == 0).sum()) == expected  # random init: no other zeros
            assert rec.numel == w.numel()
            if method == "wanda":  # per output row
                assert ((w == 0).sum(1) == exact_count(ratio, w.shape[1])).all()
    for b, ratio in zip(report.blocks, RATIOS):
        assert abs(b.achieved - ratio) <= 1 / (2 * 32) + 1e-12  # within 1/row_length rounding
    with torch.no_grad():
        logits = model(input_ids=calib.input_ids[:2]).logits
    assert torch.isfinite(logits).all()
    assert report.method == method and report.structure == "unstructured"
    assert (report.calibration is None) == (method == "magnitude")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3", "phi"])
def test_pruned_checkpoint_reloads_with_identical_logits(family, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = build_tiny(family)
    prune_model(model, {b.name: 0.5 for b in find_blocks(model)}, "sparsegpt", calib, progress=False)
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    ids = calib.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    for b in find_blocks(again):
        for m in b.linears.values():
            assert int((linear_weight(m) == 0).sum()) == exact_count(0.5, linear_weight(m).numel())


@pytest.mark.parametrize("structure,nm", [("2:4", (2, 4)), ("4:8", (4, 8))])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nm_structure_in_every_group(family, method, structure, nm, calib):
    model, _ = build_tiny(family)
    blocks = find_blocks(model)
    report = prune_model(model, {b.name: nm[0] / nm[1] for b in blocks}, method, calib, structure=structure, progress=False)
    for b in blocks:
        for m in b.linears.values():
            w = linear_weight(m)
            groups = (w == 0).reshape(w.shape[0], -1, nm[1]).sum(-1)
            assert (groups == nm[0]).all()
    assert report.achieved == 0.5


def test_calibration_is_sequential_on_pruned_outputs(calib):
    """Block 1's Wanda statistics come from the outputs of the already-pruned block 0:
    reproduce them by hand from a model with only block 0 pruned."""
    model, _ = build_tiny("llama")
    reference = copy.deepcopy(model)
    blocks = find_blocks(model)
    prune_model(model, {blocks[0].name: 0.5, blocks[1].name: 0.5}, "wanda", calib, batch_size=4, progress=False)

    ref_blocks = find_blocks(reference)
    prune_model(reference, {ref_blocks[0].name: 0.5}, "wanda", calib, batch_size=4, progress=False)
    sq = {}
    hooks = [
        m.register_forward_hook(lambda _m, inp, _o, rel=rel: sq.setdefault(rel, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
        for rel, m in ref_blocks[1].linears.items()
    ]
    with torch.no_grad():
        reference(input_ids=calib.input_ids, use_cache=False)
    for h in hooks:
        h.remove()
    for rel, m in ref_blocks[1].linears.items():
        x = torch.cat(sq[rel])
        expected = rowwise_mask(wanda_scores(linear_weight(m), (x.float() ** 2).mean(0)), 0.5)
        assert torch.equal(linear_weight(blocks[1].linears[rel]) == 0, expected), rel
    # and calibrating block 1 on *dense* block-0 outputs would give a different mask somewhere
    dense = build_tiny("llama")[0]
    prune_model(dense, {find_blocks(dense)[1].name: 0.5}, "wanda", calib, progress=False)
    assert any(
        not torch.equal(linear_weight(m) == 0, linear_weight(blocks[1].linears[rel]) == 0)
        for rel, m in find_blocks(dense)[1].linears.items()
    )


def test_per_module_ratios_override_block(calib):
    model, _ = build_tiny("qwen2")
    blocks = find_blocks(model)
    down = f"{blocks[2].name}.mlp.down_proj"
    report = prune_model(model, {blocks[2].name: 0.5, down: 0.25}, "sparsegpt", calib, progress=False)
    by_name = {m.name: m for m in report.modules}
    assert by_name[down].ratio == 0.25 and by_name[down].pruned == exact_count(0.25, by_name[down].numel)
    assert by_name[f"{blocks[2].name}.self_attn.q_proj"].achieved == 0.5
    assert all(m.pruned == 0 for m in report.modules if m.block != blocks[2].name)  # unnamed blocks stay dense


def test_magnitude_needs_no_data_and_runs_no_forward():
    model, _ = build_tiny("llama")
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    report = prune_model(model, {b.name: 0.6 for b in find_blocks(model)}, "magnitude", None, progress=False)
    assert calls == [] and report.calibration is None and abs(report.achieved - 0.6) < 1e-3


def test_bad_input_is_rejected_before_any_change(calib):
    model, _ = build_tiny("llama")
    before = copy.deepcopy(model.state_dict())
    names = [b.name for b in find_blocks(model)]
    cases = [
        ({"model.layers.9": 0.5}, "wanda", calib, "unstructured", "lacks"),
        ({names[0]: 1.0}, "wanda", calib, "unstructured", r"\[0, 1\)"),
        ({names[0]: -0.1}, "magnitude", None, "unstructured", r"\[0, 1\)"),
        ({names[0]: float("nan")}, "magnitude", None, "unstructured", r"\[0, 1\)"),
        ({names[0]: 0.6}, "wanda", calib, "2:4", "incompatible with 2:4"),
        ({names[0]: 0.5}, "wanda", None, "unstructured", "needs calibration data"),
        ({names[0]: 0.5}, "obs", calib, "unstructured", "not a pruner"),
        ({}, "magnitude", None, "unstructured", "no pruning ratios"),
        ({names[0]: 0.5}, "wanda", calib, "3-4", "not valid"),
    ]
    for ratios, method, data, structure, message in cases:
        with pytest.raises(LayercapError, match=message):
            prune_model(model, ratios, method, data, structure=structure, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_explicit_device_and_bfloat16(calib):
    """``device='cpu'`` takes the move-one-block path; a bfloat16 model keeps its dtype."""
    model, _ = build_tiny("mistral", dtype=torch.bfloat16)
    report = prune_model(model, {b.name: 0.5 for b in find_blocks(model)}, "sparsegpt", calib, device="cpu", progress=False)
    assert report.device == "cpu" and report.achieved == 0.5
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib.input_ids[:1]).logits.float()).all()


def test_report_round_trip(calib, tmp_path):
    model, _ = build_tiny("gemma")
    blocks = find_blocks(model)
    report = prune_model(model, {b.name: r for b, r in zip(blocks, RATIOS)}, "wanda", calib, progress=False)
    path = report.save(tmp_path / "pruning.json")
    again = PruningReport.load(path)
    assert again.to_dict() == report.to_dict()
    doc = report.to_dict()
    assert doc["schema"] == "layercap.pruning/v1"
    assert doc["calibration"]["sha256"] == calib.sha256 and doc["calibration"]["tokens"] == calib.num_tokens
    assert [b["name"] for b in doc["blocks"]] == [b.name for b in blocks]
    assert doc["overall"]["pruned"] == sum(m["pruned"] for m in doc["modules"])
    bad = dict(doc, modules=[dict(doc["modules"][0], pruned=10**9)])
    with pytest.raises(LayercapError, match="pruned <= zeros"):
        PruningReport.from_dict(bad)
    with pytest.raises(LayercapError, match="schema"):
        PruningReport.from_dict(dict(doc, schema="layercap.ratios/v1"))


def test_sparsegpt_shares_the_inverse_between_linears_fed_the_same_input(calib, monkeypatch):
    """q/k/v (and gate/up) see the same input, so their Hessians are bitwise equal: one factor each."""
    import layercap.apply.prune.sequential as sequential

    calls = []
    real = sequential.hessian_factor
    monkeypatch.setattr(sequential, "hessian_factor", lambda h, p: calls.append(h.shape) or real(h, p))
    model, _ = build_tiny("llama")
    blocks = find_blocks(model)
    assert list(blocks[0].linears) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    prune_model(model, {b.name: 0.5 for b in blocks}, "sparsegpt", calib, progress=False)
    assert len(calls) == 4 * len(blocks)  # {q,k,v}, o, {gate,up}, down
