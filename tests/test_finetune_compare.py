"""compare-allocation: rule parsing, same-budget allocations, statistics, and the command end to end
on a tiny model (2 tasks x 2 rules x 2 seeds, 2 steps each) with resume and bad input."""

from __future__ import annotations

import json

import pytest

from layercap.experiments.common import placeholder_scores as uniform_scores
from layercap.programs.rules import RuleSpec, parse_rule as _parse_rule
from layercap.report.allocation_table import Cell
from layercap.report.statistics import mean_std, paired_differences, separation


def parse_rule(text):
    return _parse_rule(text, "allocation")
from layercap.errors import LayercapError
from layercap.models import find_blocks
from layercap.models.tiny import build_tiny


@pytest.fixture()
def arc(shared_data):
    return shared_data / "tasks" / "ARC-Easy"


def _tiny_dir(tmp_path):
    model, tok = build_tiny("llama")
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", [b.name for b in find_blocks(model)]


def test_parse_rule():
    assert parse_rule("mdl") == RuleSpec("mdl", "kfac", "allocation") and parse_rule("mdl:diag").label == "mdl:diag"
    assert parse_rule("layerif") == RuleSpec("layerif", "influence", "allocation") and parse_rule("layerif").label == "layerif"
    assert parse_rule("alphalora").source == "alpha-hill" and parse_rule("uniform").source is None
    with pytest.raises(LayercapError, match="allocation rule 'best' is unknown"):
        parse_rule("best")
    with pytest.raises(LayercapError, match="reads no scores"):
        parse_rule("uniform:kfac")


def test_same_budget_for_fixed_rules():
    from layercap.programs.rules import allocation_by_rule

    model, _ = build_tiny("llama", num_layers=8)
    scores = uniform_scores(model)
    for rule in ("uniform", "mola-2468", "mola-8642", "mola-5555"):
        ns = [int(v) for v in allocation_by_rule(rule, scores, 20, lower=1).counts().values()]
        assert sum(ns) == 20 and min(ns) >= 1, (rule, ns)
    ns = [int(v) for v in allocation_by_rule("mola-2468", scores, 40, lower=1).counts().values()]
    assert ns == [2, 2, 4, 4, 6, 6, 8, 8]  # exactly the pattern when the budget matches it


def test_statistics():
    assert mean_std([0.5]) == (0.5, 0.0)
    m, s = mean_std([0.2, 0.4, 0.6])
    assert m == pytest.approx(0.4) and s == pytest.approx(0.2)
    cells = [Cell("t", r, s, acc, None, None, 0.0, []) for r, s, acc in
             [("mdl:kfac", 0, 0.6), ("mdl:kfac", 1, 0.7), ("uniform", 0, 0.5), ("uniform", 1, 0.5)]]
    (p,) = paired_differences(cells, ["uniform", "mdl:kfac"], metrics=("acc",))
    assert p["diff_mean"] == pytest.approx(0.15) and p["diff_se"] == pytest.approx(0.05)
    assert p["beyond_2se"] is True and p["better"] is True
    # nll: lower is better, so a negative difference is the MDL rule's win
    cells = [Cell("t", r, s, None, None, None, 0.0, [], adapter="lora", nll=v) for r, s, v in
             [("mdl:kfac", 0, 2.0), ("mdl:kfac", 1, 2.1), ("uniform", 0, 2.2), ("uniform", 1, 2.2)]]
    (p,) = paired_differences(cells, ["uniform", "mdl:kfac"])
    assert p["metric"] == "nll" and p["adapter"] == "lora" and p["better"] is True
    assert p["diff_mean"] == pytest.approx(-0.15)


def test_separation_needs_a_gap_beyond_three_seed_stds():
    def cells(bad_nlls):
        return ([Cell("t", "uniform", s, None, None, None, 0.0, [], adapter="moe", nll=v) for s, v in enumerate([2.0, 2.01, 1.99])]
                + [Cell("t", "adversarial:kfac", s, None, None, None, 0.0, [], adapter="moe", nll=v) for s, v in enumerate(bad_nlls)])
    (x,) = separation(cells([2.2, 2.21, 2.19]), "adversarial:kfac")
    assert x["gap"] == pytest.approx(0.2) and x["seed_std"] == pytest.approx(0.01) and x["separates"] is True
    (y,) = separation(cells([2.02, 2.05, 1.99]), "adversarial:kfac")
    assert y["separates"] is False  # 0.02 gap, 0.03 std
    # a large seed effect shared by both rules: raw stds hide the gap, same-seed differences do not
    shared = [Cell("t", r, s, None, None, None, 0.0, [], adapter="moe", nll=base + d) for s, base in enumerate([2.0, 2.3, 1.8])
              for r, d in (("uniform", 0.0), ("adversarial:kfac", 0.1 + 0.002 * s))]
    (z,) = separation(shared, "adversarial:kfac")
    assert z["separates"] is False and z["separates_paired"] is True and z["paired_gap"] == pytest.approx(0.102)


def test_cli_compare_allocation_and_resume(arc, shared_data, tmp_path, capsys):
    from layercap.cli import main
    from layercap.report.allocation_table import AllocationComparison as Comparison

    model_dir, names = _tiny_dir(tmp_path)
    boolq = shared_data / "tasks" / "boolq"
    out = tmp_path / "cmp"
    argv = ["compare-allocation", str(model_dir), "--budget", "10", "--rules", "uniform", "mdl:diag",
            "--train", str(arc / "train.json"), str(boolq / "train.json"),
            "--eval", str(arc / "test.json"), str(boolq / "test.json"), "--seeds", "0", "1",
            "--rank", "2", "--max-steps", "2", "--batch-size", "4", "--max-length", "48", "--limit-train", "8",
            "--limit-eval", "6", "--calib-nsamples", "4", "--calib-seqlen", "32", "--no-progress", "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| mdl:diag |" in text and "ARC-Easy" in text and "boolq" in text
    c = Comparison.load(out / "comparison.json")
    assert len(c.cells) == 2 * 2 * 2
    for task, by_rule in c.allocations.items():
        for rule, ns in by_rule.items():
            assert sum(ns) == 10 and min(ns) >= 1, (task, rule, ns)
    means = {(r["rule"], r["task"]): r for r in c.summary}
    accs = [x.acc for x in c.cells if x.rule == "uniform" and x.task == "boolq"]
    assert means[("uniform", "boolq")]["acc_mean"] == pytest.approx(sum(accs) / 2)
    # the answer-token NLL is the cell's continuous metric; the unadapted model is the reference
    assert all(x.nll is not None and x.nll > 0 and x.adapter == "moe" for x in c.cells)
    assert set(c.baselines) == {"ARC-Easy", "boolq"} and c.baselines["boolq"]["nll"] > 0
    assert (out / "comparison.png").stat().st_size > 1000 and (out / "comparison.csv").is_file()
    # not empty -> needs --resume; with --resume every cell is already finished (no training)
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    before = (out / "runs" / "boolq" / "moe" / "uniform" / "seed1" / "finetune.json").read_text()
    assert main(argv + ["--resume"]) == 0
    assert (out / "runs" / "boolq" / "moe" / "uniform" / "seed1" / "finetune.json").read_text() == before
    assert Comparison.load(out / "comparison.json").summary == c.summary
    # bad rule: error before anything is written
    assert main(argv[:5] + ["best-rule"] + argv[7:-1] + [str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_one_seed_has_no_standard_error():
    cells = [Cell("t", "mdl:kfac", 0, 0.6, None, None, 0.0, []), Cell("t", "uniform", 0, 0.5, None, None, 0.0, [])]
    (p,) = paired_differences(cells, ["uniform", "mdl:kfac"], metrics=("acc",))
    assert p["diff_se"] is None and p["beyond_2se"] is False
    json.dumps(p, allow_nan=False)


def test_sweep_reruns_exactly_what_a_changed_setting_reaches(arc, tmp_path):
    """Budget 8 -> 12 reruns allocations and fine-tuning but not scores; nothing changed reruns
    nothing; an old cell is never reused under a new budget."""
    from layercap.apply.finetune import FinetuneOptions
    from layercap.experiments.allocation_sweep import AllocationSweepOptions, run_allocation_sweep

    model_dir, _ = _tiny_dir(tmp_path)
    ft = FinetuneOptions(rank=2, max_steps=1, batch_size=4, max_length=48, limit_train=4, limit_eval=4, progress=False)

    def sweep(budget):
        opts = AllocationSweepOptions(str(model_dir), budget, ["uniform", "mdl:gradnorm"], [str(arc / "train.json")],
                                      [str(arc / "test.json")], calib_nsamples=2, calib_seqlen=16, finetune=ft)
        return run_allocation_sweep(opts, tmp_path / "out", resume=True)

    c8, s8 = sweep(8)
    assert sorted(s8.ran) == sorted(["scores:ARC-Easy:gradnorm", "baseline:ARC-Easy", "allocation:ARC-Easy:moe:uniform",
                                     "allocation:ARC-Easy:moe:mdl:gradnorm", "finetune:ARC-Easy:moe:uniform:seed0",
                                     "finetune:ARC-Easy:moe:mdl:gradnorm:seed0"])
    _, again = sweep(8)
    assert again.ran == [] and len(again.skipped) == 6
    c12, s12 = sweep(12)
    assert {"scores:ARC-Easy:gradnorm", "baseline:ARC-Easy"} <= set(s12.skipped) and len(s12.ran) == 4
    assert all(sum(ns) == 12 for ns in c12.allocations["ARC-Easy/moe"].values())
    record = json.loads((tmp_path / "out" / "runs" / "ARC-Easy" / "moe" / "uniform" / "seed0" / "finetune.json").read_text())
    assert sum(layer["n"] for layer in record["allocation"]["layers"]) == 12  # the adapter was trained with the new budget


def test_text_corpus_task_both_adapters_and_the_control(shared_data, tmp_path):
    """A text corpus is adapted as language modelling and scored on its held-out last part; both
    adapters run on the same budget; the adversarial control spends it in 3 blocks."""
    from layercap.apply.finetune import FinetuneOptions
    from layercap.experiments.allocation_sweep import AllocationSweepOptions, run_allocation_sweep

    model_dir, names = _tiny_dir(tmp_path)
    text = shared_data / "corpora" / "tinyshakespeare" / "input.txt"
    ft = FinetuneOptions(rank=2, max_steps=2, batch_size=2, max_length=32, limit_train=8, limit_eval=4, progress=False)
    rules = ["uniform", "adversarial:gradnorm", "mdl:gradnorm", "mdl:measured"]
    opts = AllocationSweepOptions(str(model_dir), 8, rules, [str(text)], ["-"], seeds=[0, 1], calib_nsamples=2,
                                  calib_seqlen=16, finetune=ft, adapters=["moe", "lora"], utility_levels=[0, 1, 2, 4],
                                  utility_steps=2, utility_nsamples=2, utility_seqlen=16)
    c, summary = run_allocation_sweep(opts, tmp_path / "out")
    assert len(c.cells) == 2 * 4 * 2 and {x.adapter for x in c.cells} == {"moe", "lora"}
    assert "utility:tinyshakespeare" in summary.ran
    from layercap.programs.utility import UtilityTable

    table = UtilityTable.load(tmp_path / "out" / "utility" / "tinyshakespeare.json")
    assert table.levels == [0, 1, 2, 4] and table.blocks == names
    for adapter in ("lora", "moe"):  # one table for both adapters, capped at the largest measured level
        assert max(c.allocations[f"tinyshakespeare/{adapter}"]["mdl:measured"]) <= 4
    assert all(x.acc is None and 0 < x.nll < 20 for x in c.cells)
    heldout = c.cells[0].eval["heldout"]
    assert heldout["tokens"] == 4 * 31 and heldout["data"]["split_token"] > 0
    for key, by_rule in c.allocations.items():
        assert all(sum(ns) == 8 for ns in by_rule.values()), key
        bad = by_rule["adversarial:gradnorm"]
        floor = 1 if key.endswith("/moe") else 0
        assert sum(1 for n in bad if n > floor) <= 3
    assert {(x["adapter"], x["task"]) for x in c.separation} == {("moe", "tinyshakespeare"), ("lora", "tinyshakespeare")}
    assert c.baselines["tinyshakespeare"]["nll"] > 0
    assert "tinyshakespeare moe NLL" in (tmp_path / "out" / "comparison.md").read_text()


def test_text_corpus_split_is_disjoint_and_scored_like_a_hand_loop(shared_data):
    import torch
    import torch.nn.functional as F

    from layercap.data.domain import domain_split
    from layercap.evaluate.perplexity import windows_nll

    model, tok = build_tiny("llama")
    text = shared_data / "corpora" / "tinyshakespeare" / "input.txt"
    split = domain_split(tok, text, 32, 0.1, heldout_windows=3, train_windows=50)
    assert split.train.shape == (50, 32) and split.heldout.shape == (3, 32)
    # the held-out windows come from after the split point, the training windows from before it
    from layercap.data.calibration import read_text, tokenize_text

    ids = tokenize_text(tok, read_text(text))
    assert torch.equal(split.heldout[0], ids[split.split_token:split.split_token + 32])
    assert torch.equal(split.train[-1], ids[49 * 32:50 * 32]) and 50 * 32 <= split.split_token
    cal, val = split.calibration(4), split.calibration(4, offset=0.5)
    assert not any(torch.equal(a, b) for a in cal.input_ids for b in val.input_ids)
    got = windows_nll(model, split.heldout, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=split.heldout).logits
    hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), split.heldout[:, 1:].reshape(-1))
    assert got["tokens"] == 3 * 31 and got["nll_per_token"] == pytest.approx(float(hand), rel=1e-5)
    ex = split.examples()[0]
    assert ex["labels"] == ex["input_ids"]  # no BOS: every position a target (the trainer shifts)
