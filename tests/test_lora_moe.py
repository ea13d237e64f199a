"""LoRA-MoE layer: dense mixture by hand, kernels vs loop reference, balance loss, gradients, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from layercap.apply.lora_moe import (
    LoraMoEConfig,
    LoraMoELinear,
    apply_lora_moe,
    expert_counts,
    load_balancing_loss,
    load_lora_moe,
    lora_moe_modules,
    save_lora_moe,
    switch_balance_loss,
)
from layercap.errors import LayercapError
from layercap.models import find_blocks
from layercap.models.tiny import build_tiny


def _layer(n=3, r=2, k=2, kernel="dense", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(6, 5)
    layer = LoraMoELinear(base, n, r, alpha=4.0, top_k=k, kernel=kernel)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    return layer


def test_all_experts_equal_router_is_average_of_experts():
    layer = _layer(n=3, r=2, k=3)
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(2, 4, 6)
    # by hand: equal logits -> renormalised softmax 1/n per expert
    mix = sum((x @ layer.lora_A[e].t()) @ layer.lora_B[e].t() for e in range(3)) / 3
    expected = layer.base(x) + (4.0 / 2) * mix
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_top_k_uses_renormalised_softmax_of_selected_experts():
    layer = _layer(n=4, r=3, k=2)
    x = torch.randn(7, 6)
    logits = x @ layer.router.weight.t()
    out = layer(x)
    for t in range(7):
        top = torch.topk(logits[t], 2).indices
        w = torch.softmax(logits[t, top], 0)  # softmax over selected logits == renormalised softmax
        delta = sum(w[j] * layer.lora_B[e] @ (layer.lora_A[e] @ x[t]) for j, e in enumerate(top.tolist()))
        torch.testing.assert_close(out[t], layer.base(x[t]) + layer.scaling * delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["dense", "grouped"])
@pytest.mark.parametrize("n,k", [(1, 2), (3, 2), (5, 1), (6, 3)])
def test_kernels_match_loop_reference_forward_and_backward(kernel, n, k):
    layer = _layer(n=n, r=2, k=k, kernel=kernel)
    x = torch.randn(3, 5, 6)
    out = layer(x)
    ref = layer.forward_loop(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [layer.lora_A, layer.lora_B, layer.router.weight])
    grads_ref = torch.autograd.grad((ref * g).sum(), [layer.lora_A, layer.lora_B, layer.router.weight])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_zero_init_b_leaves_base_output_unchanged():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraMoELinear(base, 4, 2, alpha=8.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))


def test_balance_loss_hand_example():
    # 4 tokens, 3 experts, top-1; probabilities chosen by hand
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    top = probs.topk(1, dim=-1).indices  # experts 0, 0, 1, 2
    f = [2 / 4, 1 / 4, 1 / 4]
    p = [(0.7 + 0.6 + 0.1 + 0.2) / 4, (0.2 + 0.3 + 0.8 + 0.2) / 4, (0.1 + 0.1 + 0.1 + 0.6) / 4]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, p))
    assert switch_balance_loss(probs, top, 3).item() == pytest.approx(expected, rel=1e-6)
    # top-2 assignment: token sets {0,1},{0,1},{1,0 or 2},{2,0 or 1}; count membership
    top2 = probs.topk(2, dim=-1).indices
    member = torch.zeros(4, 3)
    for t in range(4):
        member[t, top2[t]] = 1
    expected2 = 3 * float((member.mean(0) * probs.mean(0)).sum())
    assert switch_balance_loss(probs, top2, 3).item() == pytest.approx(expected2, rel=1e-6)
    # padding mask drops the last token
    mask = torch.tensor([True, True, True, False])
    f3 = [2 / 3, 1 / 3, 0.0]
    p3 = probs[:3].mean(0).tolist()
    assert switch_balance_loss(probs, top, 3, mask).item() == pytest.approx(3 * sum(a * b for a, b in zip(f3, p3)), rel=1e-6)


def test_balance_loss_of_uniform_router_is_top_k():
    probs = torch.full((8, 4), 0.25)
    top = torch.tensor([[0, 1], [2, 3]] * 4)
    assert switch_balance_loss(probs, top, 4).item() == pytest.approx(2.0)


COUNTS = {"model.layers.0": 1, "model.layers.1": 2, "model.layers.2": 3, "model.layers.3": 5}


def _wrapped(counts=COUNTS, targets=("q_proj", "v_proj", "down_proj"), **kw):
    model, tok = build_tiny("llama")
    config = LoraMoEConfig(counts=dict(counts), targets=list(targets), rank=2, alpha=4.0, **kw)
    apply_lora_moe(model, config)
    return model, tok, config


def test_counts_and_ranks_read_back_equal_allocation():
    model, _, config = _wrapped()
    assert expert_counts(model) == COUNTS
    mods = lora_moe_modules(model)
    assert len(mods) == 4 * 3
    for name, m in mods.items():
        block = ".".join(name.split(".")[:3])
        assert m.num_experts == COUNTS[block] and m.lora_A.shape[:2] == (COUNTS[block], 2)
        assert m.top_k == min(2, COUNTS[block])
    assert config.modules == list(mods)


def test_gradients_reach_only_adapters_and_routers():
    model, tok, _ = _wrapped()
    with torch.no_grad():
        for m in lora_moe_modules(model).values():
            m.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 320, (2, 12))
    out = model(input_ids=ids, labels=ids)
    loss = out.loss + 0.01 * load_balancing_loss(model)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "router.weight")) for n in trainable)
    for n, p in model.named_parameters():
        if n in trainable and n.startswith("model.layers.0.") and n.endswith("router.weight"):
            # one expert: softmax of a single logit is 1, so its router gets an exact zero gradient
            assert p.grad is not None and p.grad.abs().sum() == 0, n
        elif n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_save_load_round_trip_identical_logits(tmp_path):
    model, _, config = _wrapped(top_k=2)
    with torch.no_grad():
        for m in lora_moe_modules(model).values():
            m.lora_B.normal_(std=0.2)
            m.router.weight.normal_()
    ids = torch.randint(0, 320, (2, 10))
    save_lora_moe(model, config, tmp_path / "adapter")
    fresh, _ = build_tiny("llama")
    loaded = load_lora_moe(fresh, tmp_path / "adapter")
    assert loaded.counts == COUNTS and loaded.rank == 2 and loaded.schema == "layercap.lora_moe/v1"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


@pytest.mark.parametrize("family", ["gpt2", "opt", "phi", "qwen2"])
def test_default_targets_inject_into_other_families(family):
    from layercap.apply.lora_moe import default_targets

    model, _ = build_tiny(family)
    blocks = [b.name for b in find_blocks(model)]
    targets = default_targets(model)
    config = LoraMoEConfig(counts={b: 2 for b in blocks}, targets=list(targets), rank=2, alpha=4.0)
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
    apply_lora_moe(model, config)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)  # B = 0 at init
    assert expert_counts(model) == {b: 2 for b in blocks}
    assert {n.rsplit(".", 1)[-1] for n in lora_moe_modules(model)} == set(targets)


def test_bad_allocations_raise_and_leave_model_untouched():
    model, _ = build_tiny("llama")
    reference = copy.deepcopy(model.state_dict())
    bad = [
        ({**COUNTS, "model.layers.9": 1}, ("q_proj",), "lacks"),
        ({k: 0 for k in COUNTS}, ("q_proj",), "nothing to adapt"),
        ({k: v for k, v in COUNTS.items() if k != "model.layers.3"}, ("q_proj",), "no count"),
        (COUNTS, ("q_proj", "wq"), "wq"),
        ({**COUNTS, "model.layers.1": 1.5}, ("q_proj",), "integers"),
    ]
    for counts, targets, needle in bad:
        with pytest.raises(LayercapError, match=needle):
            apply_lora_moe(model, LoraMoEConfig(counts=counts, targets=list(targets)))
        assert not lora_moe_modules(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.items())


def test_training_steps_reduce_loss():
    model, _, config = _wrapped(targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    torch.manual_seed(1)
    ids = torch.randint(0, 320, (4, 16))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-2)
    model.train()
    losses = []
    for _ in range(25):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + config.aux_coef * load_balancing_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_deepcopy_after_forward_with_grad():
    layer = _layer(n=3)
    layer(torch.randn(4, 6)).sum()
    clone = copy.deepcopy(layer)
    assert clone.last_probs is None and torch.equal(clone.lora_A, layer.lora_A)
    assert layer.last_probs is not None


@pytest.mark.slow
def test_smollm2_allocation_injects_and_round_trips(smollm2, tmp_path):
    model, _ = smollm2
    model = copy.deepcopy(model)
    blocks = [b.name for b in find_blocks(model)]
    assert len(blocks) == 30
    counts = {b: 1 + (i % 4) for i, b in enumerate(blocks)}  # 75 experts, uneven
    ids = torch.randint(0, 49152, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    config = LoraMoEConfig(counts=counts, targets=["q_proj", "down_proj"], rank=2, alpha=4.0)
    apply_lora_moe(model, config)
    assert expert_counts(model) == counts and len(lora_moe_modules(model)) == 60
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)  # B = 0: starts at the base model
        for m in lora_moe_modules(model).values():
            m.lora_B.normal_(std=0.02)
        after = model(ids).logits
    assert not torch.allclose(after, before)
    save_lora_moe(model, config, tmp_path / "adapter")
    del model
    fresh = copy.deepcopy(smollm2[0])
    load_lora_moe(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, after)


def test_a_block_with_zero_experts_keeps_its_linears_and_output():
    """0 experts = no adapter on that block (as PEFT rank 0): its Linears stay plain, the read-back says 0."""
    counts = {**COUNTS, "model.layers.2": 0}
    model, _, config = _wrapped(counts)
    assert expert_counts(model) == counts
    assert not any(".layers.2." in name for name in lora_moe_modules(model))
    assert len(lora_moe_modules(model)) == 3 * 3 and config.counts == counts
    plain, _ = build_tiny("llama")
    ids = torch.randint(0, plain.config.vocab_size, (2, 8))
    # B starts at 0, so the whole wrapped model still equals the base model
    assert torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-6)
