"""`layercap export`: recipes that llm-compressor loads and applies, adapter configs that PEFT
applies with the allocated ranks, and the per-module table; bad input gives LayercapErrors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from layercap.cli import main as cli
from layercap.errors import LayercapError
from layercap.export import ExportOptions, export
from layercap.models import find_blocks
from layercap.models.blocks import linear_weight
from layercap.models.tiny import build_tiny
from layercap.programs.records import AllocatedLayer, Allocation, PruningRatios, RatioLayer

RATIOS = [0.3, 0.5, 0.7, 0.4]  # distinct per block, so a uniform application cannot pass


def _ratios(model, values=RATIOS, path=None) -> PruningRatios:
    blocks = find_blocks(model)
    layers = [RatioLayer(b.name, v, b.num_prunable) for b, v in zip(blocks, values)]
    total = sum(l.params for l in layers)
    achieved = sum(l.params * l.ratio for l in layers) / total
    rec = PruningRatios(rule="test", sparsity=achieved, mode="rule", layers=layers, achieved=achieved)
    if path is not None:
        rec.save(path)
    return rec


def _allocation(names, counts, path) -> Allocation:
    layers = [AllocatedLayer(n, c, 1.0) for n, c in zip(names, counts)]
    rec = Allocation(rule="test", budget=float(sum(counts)), unit="rank", integer=True, layers=layers, mu=None,
                     binds=True, spent=float(sum(counts)))
    rec.save(path)
    return rec


def _saved_tiny(tmp_path, layers=4, hidden=64):
    model, tok = build_tiny("llama", num_layers=layers, hidden=hidden)
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model, tok


def _block_sparsity(model) -> dict[str, float]:
    out = {}
    for b in find_blocks(model):
        zeros = sum(int((linear_weight(m) == 0).sum()) for m in b.linears.values())
        out[b.name] = zeros / sum(linear_weight(m).numel() for m in b.linears.values())
    return out


# ---- llm-compressor ------------------------------------------------------------------------
@pytest.mark.parametrize("method,structure", [("sparsegpt", "unstructured"), ("wanda", "2:4")])
def test_recipe_loads_in_llmcompressor_and_oneshot_applies_per_layer_sparsity(tmp_path, method, structure):
    llmc = pytest.importorskip("llmcompressor")  # fallback only: `make env` installs it
    from datasets import Dataset
    from llmcompressor.recipe import Recipe
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    d, model, tok = _saved_tiny(tmp_path)
    values = RATIOS if structure == "unstructured" else [0.5, 0.5, 0.0, 0.5]  # N:M: N/M or dense
    _ratios(model, values, tmp_path / "ratios.json")
    out = export(tmp_path / "ratios.json", "llmcompressor", tmp_path / "recipe.yaml", model_spec=str(d),
                 options=ExportOptions(method=method, structure=structure))

    # llm-compressor's own loader: one modifier, the exported per-layer sparsities and targets
    recipe = Recipe.create_instance(str(out))
    (mod,) = recipe.modifiers
    assert type(mod).__name__ == {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}[method]
    blocks = [b.name for b in find_blocks(model)]
    kept = [(b, v) for b, v in zip(blocks, values) if v > 0]
    assert mod.targets == [b for b, _ in kept]
    assert mod.sparsity == pytest.approx([v for _, v in kept])
    assert mod.mask_structure == ("0:0" if structure == "unstructured" else "2:4")

    # and its oneshot run prunes each named block at its own ratio
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 320, (32,), generator=g).tolist() for _ in range(8)]
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 8})
    target = AutoModelForCausalLM.from_pretrained(d)
    llmc.oneshot(model=target, processor=tok, recipe=str(out), dataset=ds, num_calibration_samples=8,
                 max_seq_length=32, pipeline="sequential")
    got = _block_sparsity(target)
    for b, v in zip(blocks, values):
        assert got[b] == pytest.approx(v, abs=0.01), (b, got[b], v)
    if structure == "2:4":
        w = linear_weight(find_blocks(target)[0].linears["mlp.up_proj"]).detach()
        assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all()
    assert float((target.lm_head.weight == 0).float().mean()) < 0.01  # lm_head never pruned


def test_recipe_without_model_orders_targets_numerically(tmp_path):
    model, _ = build_tiny("llama", num_layers=12)
    values = [0.1 * (i % 5) + 0.05 for i in range(12)]
    rec = _ratios(model, values)
    rec.layers = list(reversed(rec.layers))  # file order must not matter
    rec.save(tmp_path / "r.json")
    export(tmp_path / "r.json", "llmcompressor", tmp_path / "r.yaml")
    doc = yaml.safe_load((tmp_path / "r.yaml").read_text())
    args = doc["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    # model.layers.2 before model.layers.10: llm-compressor pairs sparsity[i] with named_modules order
    assert args["targets"] == [f"model.layers.{i}" for i in range(12)]
    assert args["sparsity"] == pytest.approx(values)


def test_recipe_rejects_bad_input(tmp_path):
    model, _ = build_tiny("llama")
    _ratios(model, [0.3, 0.5, 0.7, 0.4], tmp_path / "r.json")
    with pytest.raises(LayercapError, match="N/M|2:4|0.5"):
        export(tmp_path / "r.json", "llmcompressor", tmp_path / "x.yaml", options=ExportOptions(structure="2:4"))
    other, _ = build_tiny("llama", num_layers=2)
    with pytest.raises(LayercapError, match="lacks"):
        export(tmp_path / "r.json", "llmcompressor", tmp_path / "x.yaml", model=other)
    with pytest.raises(LayercapError, match="overwrite"):
        export(tmp_path / "r.json", "llmcompressor", tmp_path / "r.json")
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "layercap.scores/v1"}))
    with pytest.raises(LayercapError, match="schema"):
        export(tmp_path / "bad.json", "llmcompressor", tmp_path / "x.yaml")
    gpt2, _ = build_tiny("gpt2")
    _ratios(gpt2, [0.3, 0.5, 0.7, 0.4], tmp_path / "g.json")
    with pytest.raises(LayercapError, match="Conv1D"):  # llm-compressor would silently skip it
        export(tmp_path / "g.json", "llmcompressor", tmp_path / "x.yaml", model=gpt2)
    _allocation(["model.layers.0"], [1], tmp_path / "a.json")
    with pytest.raises(LayercapError, match="ratios/v1"):
        export(tmp_path / "a.json", "llmcompressor", tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


# ---- PEFT ----------------------------------------------------------------------------------
def test_adapter_config_loads_in_peft_with_allocated_ranks(tmp_path):
    from peft import LoraConfig, get_peft_model

    from layercap.apply.peft_lora import read_ranks

    d, model, _ = _saved_tiny(tmp_path, layers=12, hidden=32)
    names = [b.name for b in find_blocks(model)]
    counts = [1, 4, 1, 1, 3, 1, 1, 1, 1, 1, 2, 0]  # 1 vs 10/11 differ: an unanchored key would leak
    _allocation(names, counts, tmp_path / "alloc.json")
    assert cli(["export", str(tmp_path / "alloc.json"), "--format", "peft", "--model", str(d), "--rank-unit", "2",
                "--targets", "q_proj,down_proj", "-o", str(tmp_path / "adapter")]) == 0

    config = LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    fresh, _ = build_tiny("llama", num_layers=12, hidden=32)
    peft_model = get_peft_model(fresh, config)
    got = read_ranks(peft_model)
    want = {f"{b}.{m}": 2 * c for b, c in zip(names, counts) if c for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert got == want
    for name, module in peft_model.get_base_model().named_modules():
        if name in want:
            assert module.scaling["default"] == pytest.approx(2.0)  # alpha = 2 * rank
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(d) and saved["r"] == 8


def test_peft_needs_model_and_whole_units(tmp_path):
    model, _ = build_tiny("llama")
    names = [b.name for b in find_blocks(model)]
    _allocation(names, [1, 2, 1, 1], tmp_path / "a.json")
    with pytest.raises(LayercapError, match="--model"):
        export(tmp_path / "a.json", "peft", tmp_path / "out")
    doc = json.loads((tmp_path / "a.json").read_text())
    doc["integer"], doc["layers"][0]["n"] = False, 1.5
    (tmp_path / "f.json").write_text(json.dumps(doc))
    with pytest.raises(LayercapError, match="whole number"):
        export(tmp_path / "f.json", "peft", tmp_path / "out", model=model)
    with pytest.raises(LayercapError, match="match no Linear"):
        export(tmp_path / "a.json", "peft", tmp_path / "out", model=model, options=ExportOptions(targets=("nope",)))
    assert not (tmp_path / "out").exists()


# ---- tables --------------------------------------------------------------------------------
def test_ratio_table_per_module_matches_prune_plan(tmp_path):
    model, _ = build_tiny("llama")
    _ratios(model, RATIOS, tmp_path / "r.json")
    export(tmp_path / "r.json", "csv", tmp_path / "t.csv", model=model)
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    blocks = find_blocks(model)
    assert len(rows) == sum(len(b.linears) for b in blocks)
    by_block = {b.name: v for b, v in zip(blocks, RATIOS)}
    for r in rows:
        assert float(r["ratio"]) == by_block[r["block"]]
        assert r["name"].startswith(r["block"] + ".")
    export(tmp_path / "r.json", "json", tmp_path / "t.json")  # without a model: one row per record layer
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["schema"] == "layercap.export-table/v1" and doc["kind"] == "ratios"
    assert [r["ratio"] for r in doc["rows"]] == RATIOS


def test_rank_table_equals_peft_ranks(tmp_path):
    from peft import get_peft_model

    from layercap.apply.peft_lora import read_ranks
    from layercap.export.peft import build_lora_config

    model, _ = build_tiny("llama")
    names = [b.name for b in find_blocks(model)]
    _allocation(names, [0, 2, 1, 3], tmp_path / "a.json")
    export(tmp_path / "a.json", "json", tmp_path / "t.json", model=model, options=ExportOptions(rank_unit=4))
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    table = {r["name"]: r["rank"] for r in rows if r["rank"]}
    peft_model = get_peft_model(model, build_lora_config(model, dict(zip(names, [0, 2, 1, 3])), rank_unit=4))
    assert table == read_ranks(peft_model)
    assert all(r["rank"] == 0 for r in rows if r["block"] == names[0])
