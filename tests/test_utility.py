"""Measured utility curves (issue 14.3): the cached partial pass equals full-model training, the
model is unchanged, resume, the command, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from layercap.apply.utility import _Lora, block_targets, measure_utility
from layercap.cli import main as cli_main
from layercap.data.calibration import CalibrationSet
from layercap.errors import LayercapError
from layercap.models import find_blocks
from layercap.models.tiny import build_tiny
from layercap.programs.utility import UtilityTable

torch.set_num_threads(1)


def _windows(n, T, seed):
    """Learnable windows (a stride-3 counter from a random start): adaptation generalises."""
    start = torch.randint(0, 320, (n, 1), generator=torch.Generator().manual_seed(seed))
    ids = (start + 3 * torch.arange(T)[None]) % 320
    return CalibrationSet(ids, f"sha{seed}", "counter", seed)


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_tiny("llama", num_layers=3, seed=1, dtype=torch.float64)
    return model


def _reference_reduction(model, train, heldout, k, rank, steps, lr, seed):
    """Block k's LoRA trained through the full model (no cached states)."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    ids, held = train.input_ids, heldout.input_ids

    def nll(x):
        logp = torch.log_softmax(m(input_ids=x).logits[:, :-1], -1)
        return -logp.gather(-1, x[:, 1:].unsqueeze(-1)).mean()

    with torch.no_grad():
        base = float(nll(held))
    lora = _Lora(block_targets(m, find_blocks(m)[k]), rank, seed)
    opt = torch.optim.Adam(lora.params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nll(ids).backward()
        opt.step()
    with torch.no_grad():
        return base - float(nll(held)), base


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reduction_equals_full_model_training(family):
    model, _ = build_tiny(family, num_layers=3, seed=2, dtype=torch.float64)
    train, held = _windows(4, 16, 0), _windows(3, 16, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    table = measure_utility(model, train, held, [0, 1, 2], steps=3, lr=5e-3, unit_rank=2, batch_size=3,
                            progress=False, tolerance=1.0)
    for k, v in model.state_dict().items():  # the model is left unchanged
        assert torch.equal(v, before[k])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert table.complete and all(row[0] == 0.0 for row in table.reduction)
    for k in (0, 2):
        for j, n in ((1, 1), (2, 2)):
            ref, base = _reference_reduction(model, train, held, k, 2 * n, 3, 5e-3, seed=1009 * k + n)
            assert table.base_nll == pytest.approx(base, rel=1e-10)
            assert table.reduction[k][j] == pytest.approx(ref, rel=1e-6, abs=1e-10)
    # costs: one unit = rank x (in + out) per adapted Linear
    expected = sum(2 * sum(m.weight.shape) if hasattr(m, "weight") and m.weight.dim() == 2 else 0
                   for m in block_targets(model, find_blocks(model)[0]).values())
    if family == "llama":
        assert table.costs[0] == expected
    assert table.cost["fwdbwd_s"] > 0 and table.cost["evaluations"] == 3 * 2
    assert table.fingerprint["params"] == sum(p.numel() for p in model.parameters())


def test_resume_continues_a_partial_table(tiny, tmp_path):
    train, held = _windows(4, 16, 0), _windows(2, 16, 1)
    kw = dict(steps=2, lr=5e-3, unit_rank=2, progress=False, tolerance=1.0)
    full = measure_utility(tiny, train, held, [0, 1, 2], **kw)
    partial = copy.deepcopy(full)
    partial.complete = False
    partial.reduction[1][2] = partial.reduction[2][1] = None
    partial.cost = {"wall_s": 1.0, "train_s": 0.5, "eval_s": 0.25, "evaluations": 4}
    path = tmp_path / "u.json.partial"
    partial.save(path)
    resumed = measure_utility(tiny, train, held, [0, 1, 2], checkpoint=path, **kw)
    assert resumed.cost["evaluations"] == 4 + 2  # counted over both runs, as the times
    assert resumed.cost["wall_s"] > 1.0 and resumed.cost["train_s"] > 0.5
    assert resumed.values().ravel().tolist() == pytest.approx(full.values().ravel().tolist(), rel=1e-12)
    # other settings: refused, not mixed
    with pytest.raises(LayercapError, match="different 'settings'"):
        measure_utility(tiny, train, held, [0, 1, 2], checkpoint=path, **{**kw, "lr": 1e-2})


def test_bad_settings(tiny):
    train = _windows(2, 8, 0)
    with pytest.raises(LayercapError, match="same"):
        measure_utility(tiny, train, train, [0, 1], progress=False)
    with pytest.raises(LayercapError, match="whole number"):
        measure_utility(tiny, train, _windows(2, 8, 1), [0, 1.5], progress=False)
    with pytest.raises(LayercapError, match="--steps"):
        measure_utility(tiny, train, _windows(2, 8, 1), [0, 1], steps=0, progress=False)


def test_utility_and_allocate_commands(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the cat number {i % 17} sat on mat {i % 5}." for i in range(300)))
    out = tmp_path / "u.json"
    args = ["utility", "tiny-llama", "--data", str(text), "--levels", "0", "1", "2", "--steps", "2", "--nsamples", "2",
            "--heldout", "2", "--seqlen", "16", "--rank-unit", "2", "--lr", "1e-3", "--tolerance", "1", "--quiet"]
    assert cli_main(args + ["-o", str(out)]) == 0
    table = UtilityTable.load(out)
    assert table.complete and table.levels == [0, 1, 2] and not (tmp_path / "u.json.partial").exists()
    assert table.data["train"]["sha256"] != table.data["heldout"]["sha256"]
    alloc = tmp_path / "a.json"
    assert cli_main(["allocate", "--rule", "mdl:measured", "--utility", str(out), "--budget", "4", "--min", "0",
                     "-o", str(alloc)]) == 0
    assert sum(l["n"] for l in json.loads(alloc.read_text())["layers"]) == 4
    capsys.readouterr()
    # a curve that dips or diverges (a learning rate far too high, no tolerance): an error, no table
    bad = tmp_path / "bad.json"
    rc = cli_main(["utility", "tiny-llama", "--data", str(text), "--levels", "0", "1", "2", "--steps", "3",
                   "--nsamples", "2", "--heldout", "2", "--seqlen", "16", "--lr", "30", "--tolerance", "0", "--quiet",
                   "-o", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and not bad.exists()
    assert "decreases with the level" in err or "diverged" in err
    rc = cli_main(args[:-1] + ["--levels", "2", "1", "-o", str(bad)])
    assert rc == 2 and "increasing" in capsys.readouterr().err and not bad.exists()


def test_only_some_blocks_keeps_the_whole_chain(tiny):
    train, held = _windows(2, 16, 0), _windows(2, 16, 1)
    kw = dict(steps=2, lr=5e-3, unit_rank=2, progress=False, tolerance=1.0)
    full = measure_utility(tiny, train, held, [0, 1], **kw)
    part = measure_utility(tiny, train, held, [0, 1], only=[1], **kw)
    assert not part.complete and part.reduction[0][1] is None and part.reduction[2][1] is None
    assert part.reduction[1][1] == pytest.approx(full.reduction[1][1], rel=1e-12)
    assert part.base_nll == pytest.approx(full.base_nll, rel=1e-12)


def test_halves_split_the_windows_with_their_own_hashes():
    from layercap.data.bos import NO_BOS

    ids = torch.arange(5 * 4).reshape(5, 4)
    calib = CalibrationSet.of_windows(ids, "text.txt", 3, NO_BOS)
    first, second = calib.halves()
    assert torch.equal(first.input_ids, ids[:2]) and torch.equal(second.input_ids, ids[2:])
    assert len({calib.sha256, first.sha256, second.sha256}) == 3
    assert first.sha256 == CalibrationSet.of_windows(ids[:2], "text.txt", 3, NO_BOS).sha256
    assert (first.source, first.seed, second.seed) == ("text.txt", 3, 3)
