"""PEFT LoRA with per-layer ranks: anchored patterns, ranks read back, mismatches raise."""

from __future__ import annotations

import pytest
import torch

from layercap.apply.peft_lora import (
    apply_peft_lora,
    block_ranks,
    intended_ranks,
    lora_config_from_allocation,
    read_ranks,
    verify_ranks,
)
from layercap.errors import LayercapError
from layercap.models import find_blocks
from layercap.models.tiny import build_tiny


def _twelve():
    model, tok = build_tiny("llama", num_layers=12)
    names = [b.name for b in find_blocks(model)]
    # layer 1 differs from 10 and 11 so that an unanchored "layers.1." style key would leak
    counts = {n: 1 for n in names}
    counts[names[1]] = 4
    counts[names[10]] = 2
    counts[names[11]] = 0
    return model, tok, names, counts


def test_rank_pattern_anchored_and_ranks_read_back():
    model, _, names, counts = _twelve()
    peft_model, config = apply_peft_lora(model, counts, rank_unit=2, targets=("q_proj", "down_proj"))
    assert all(k.startswith("^") and k.endswith("$") for k in config.rank_pattern)
    got = block_ranks(peft_model, names)
    assert got == {n: 2 * c for n, c in counts.items()}
    ranks = read_ranks(peft_model)
    assert ranks["model.layers.1.self_attn.q_proj"] == 8
    assert ranks["model.layers.10.self_attn.q_proj"] == 4
    assert "model.layers.11.self_attn.q_proj" not in ranks  # n_k = 0: not adapted
    assert all(n.rsplit(".", 1)[-1] in {"q_proj", "down_proj"} for n in ranks)
    # alpha follows rank (ratio 2): scaling = alpha / r = 2 everywhere
    for module in peft_model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            assert module.scaling["default"] == pytest.approx(2.0)


def test_unanchored_keys_would_leak_which_is_why_we_anchor():
    import re

    # PEFT 0.21's rule: re.match(rf"(.*\.)?({key})$", name)
    def peft_match(key, name):
        return re.match(rf"(.*\.)?({key})$", name) is not None

    # the hazard: a block-level key ("everything in layer 1") also catches layers 10 and 11
    assert peft_match(r"layers\.1.*q_proj", "model.layers.11.self_attn.q_proj")
    assert not peft_match(r"^model\.layers\.1\.self_attn\.q_proj$", "model.layers.11.self_attn.q_proj")
    assert peft_match(r"^model\.layers\.1\.self_attn\.q_proj$", "model.layers.1.self_attn.q_proj")


def test_verify_detects_mismatch():
    model, _, names, counts = _twelve()
    peft_model, config = apply_peft_lora(model, counts, rank_unit=2, targets=("q_proj",))
    config.rank_pattern[r"^model\.layers\.3\.self_attn\.q_proj$"] = 6  # ask for something PEFT did not build
    with pytest.raises(LayercapError, match="wrong LoRA rank"):
        verify_ranks(peft_model, config)
    assert intended_ranks(config)["model.layers.3.self_attn.q_proj"] == 6


def test_adapter_trains_and_saves(tmp_path):
    model, _, names, counts = _twelve()
    peft_model, config = apply_peft_lora(model, counts, rank_unit=1, targets=("q_proj", "v_proj"))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    from peft import PeftModel

    fresh, _ = build_tiny("llama", num_layers=12)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert block_ranks(loaded, names) == {n: c for n, c in counts.items()}
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, peft_model(ids).logits)


def test_bad_inputs():
    model, _, names, counts = _twelve()
    with pytest.raises(LayercapError, match="lacks"):
        lora_config_from_allocation(model, {**counts, "model.layers.12": 1})
    with pytest.raises(LayercapError, match="nothing to adapt"):
        lora_config_from_allocation(model, {n: 0 for n in names})
    with pytest.raises(LayercapError, match="match no Linear"):
        lora_config_from_allocation(model, counts, targets=("query",))
