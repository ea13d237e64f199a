"""`layercap prune`: checkpoint + pruning.json written atomically; bad input rejected, nothing written."""

from __future__ import annotations

import json
import re

import pytest
import torch

from layercap.apply.prune import PruningReport, exact_count, prune_model
from layercap.cli import main
from layercap.data.calibration import calibration_set
from layercap.models import find_blocks, linear_weight, load_model
from layercap.models.tiny import build_tiny
from layercap.programs.records import PruningRatios


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama (save_pretrained + tokenizer) and a small calibration text."""
    root = tmp_path_factory.mktemp("prune_cli")
    model, tok = build_tiny("llama")
    model.save_pretrained(root / "model", safe_serialization=True)
    tok.save_pretrained(root / "model")
    text = ("The quick brown fox jumps over the lazy dog. Pruning removes weights; experts add capacity. " * 40)
    (root / "calib.txt").write_text(text)
    return root


def run(*argv) -> int:
    return main(["prune", *map(str, argv), "--quiet"])


def test_uniform_sparsity_wanda_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = run(tiny_dir / "model", "--sparsity", 0.5, "--method", "wanda", "--data", tiny_dir / "calib.txt",
             "--nsamples", 4, "--seqlen", 32, "--batch-size", 3, "-o", out)
    assert rc == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "pruning.json"} <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert "model.layers.3" in printed and "overall" in printed
    report = PruningReport.load(out / "pruning.json")
    assert report.method == "wanda" and report.achieved == 0.5 and report.calibration["nsamples"] == 4

    # the same pruning in memory gives the same weights; the checkpoint reloads with identical logits
    model, tok = load_model(tiny_dir / "model")
    calib = calibration_set(tok, tiny_dir / "calib.txt", nsamples=4, seqlen=32, seed=0)
    assert calib.sha256 == report.calibration["sha256"]
    prune_model(model, {b.name: 0.5 for b in find_blocks(model)}, "wanda", calib, batch_size=3, progress=False)
    again, _ = load_model(out)
    ids = calib.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_ratios_file_sparsegpt_24(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir / "model", with_tokenizer=False)
    blocks = find_blocks(model)
    ratios = PruningRatios.uniform([b.name for b in blocks], [b.num_prunable for b in blocks], 0.5)
    ratios.save(tmp_path / "ratios.json")
    out = tmp_path / "pruned"
    rc = run(tiny_dir / "model", "--ratios", tmp_path / "ratios.json", "--method", "sparsegpt", "--structure", "2:4",
             "--data", tiny_dir / "calib.txt", "--nsamples", 4, "--seqlen", 32, "-o", out)
    assert rc == 0
    pruned, _ = load_model(out, with_tokenizer=False)
    for b in find_blocks(pruned):
        for m in b.linears.values():
            w = linear_weight(m)
            assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_plain_mapping_with_module_override_magnitude(tiny_dir, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"model.layers.1": 0.3, "model.layers.1.mlp.up_proj": 0.7}))
    out = tmp_path / "pruned"
    assert run(tiny_dir / "model", "--ratios", tmp_path / "r.json", "--method", "magnitude", "-o", out) == 0
    report = PruningReport.load(out / "pruning.json")
    by = {m.name: m for m in report.modules}
    up = by["model.layers.1.mlp.up_proj"]
    assert up.pruned == exact_count(0.7, up.numel)
    assert by["model.layers.1.self_attn.o_proj"].pruned == exact_count(0.3, by["model.layers.1.self_attn.o_proj"].numel)
    assert by["model.layers.0.self_attn.o_proj"].pruned == 0
    assert report.calibration is None


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda d, t: ["--ratios", _write(t / "r.json", {"model.layers.7": 0.5}), "--method", "magnitude"], "lacks"),
        (lambda d, t: ["--ratios", _write(t / "r.json", {"model.layers.0": 1.0}), "--method", "magnitude"], r"\[0, 1\)"),
        (lambda d, t: ["--sparsity", "1.2", "--method", "magnitude"], r"\[0, 1\)"),
        (lambda d, t: ["--sparsity", "0.6", "--structure", "2:4", "--method", "magnitude"], "incompatible with 2:4"),
        (lambda d, t: ["--sparsity", "0.5", "--method", "wanda"], "needs calibration data"),
        (lambda d, t: ["--sparsity", "0.5", "--method", "sparsegpt", "--data", t / "missing.txt"], "does not exist"),
        (lambda d, t: ["--ratios", t / "missing.json", "--method", "magnitude"], "does not exist"),
        (lambda d, t: ["--ratios", _write(t / "r.json", [0.5]), "--method", "magnitude"], "expected a layercap.ratios/v1"),
        (lambda d, t: ["--ratios", _write(t / "r.json", {"schema": "layercap.ratios/v1"}), "--method", "magnitude"], "'layers'"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_dir, tmp_path, capsys, make_args, message):
    out = tmp_path / "pruned"
    rc = main(["prune", str(tiny_dir / "model"), *map(str, make_args(tiny_dir, tmp_path)), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(message, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_cuda_device_without_cuda_is_an_error(tiny_dir, tmp_path, capsys):
    if torch.cuda.is_available():  # the GPU path is exercised by benchmarks/pruning.py there
        pytest.skip("this machine has CUDA")
    out = tmp_path / "pruned"
    assert run(tiny_dir / "model", "--sparsity", 0.5, "--method", "magnitude", "--device", "cuda", "-o", out) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not out.exists()
