"""compare-allocation: rule parsing, same-budget allocations, statistics, and the command end to end
on a tiny model (2 tasks x 2 rules x 2 seeds, 2 steps each) with resume and bad input."""

from __future__ import annotations

import json

import pytest

from layercap.experiments.common import placeholder_scores as uniform_scores
from layercap.programs.rules import RuleSpec, parse_rule as _parse_rule
from layercap.report.allocation_table import Cell
from layercap.report.statistics import mean_std, paired_differences


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
    (p,) = paired_differences(cells, ["uniform", "mdl:kfac"], ["t"])
    assert p["diff_mean"] == pytest.approx(0.15) and p["diff_se"] == pytest.approx(0.05)
    assert p["beyond_2se"] is True


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
    assert (out / "comparison.png").stat().st_size > 1000 and (out / "comparison.csv").is_file()
    # not empty -> needs --resume; with --resume every cell is already finished (no training)
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    before = (out / "runs" / "boolq" / "uniform" / "seed1" / "finetune.json").read_text()
    assert main(argv + ["--resume"]) == 0
    assert (out / "runs" / "boolq" / "uniform" / "seed1" / "finetune.json").read_text() == before
    assert Comparison.load(out / "comparison.json").summary == c.summary
    # bad rule: error before anything is written
    assert main(argv[:5] + ["best-rule"] + argv[7:-1] + [str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_one_seed_has_no_standard_error():
    cells = [Cell("t", "mdl:kfac", 0, 0.6, None, None, 0.0, []), Cell("t", "uniform", 0, 0.5, None, None, 0.0, [])]
    (p,) = paired_differences(cells, ["uniform", "mdl:kfac"], ["t"])
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
    assert sorted(s8.ran) == sorted(["scores:ARC-Easy:gradnorm", "allocation:ARC-Easy:uniform", "allocation:ARC-Easy:mdl:gradnorm",
                                     "finetune:ARC-Easy:uniform:seed0", "finetune:ARC-Easy:mdl:gradnorm:seed0"])
    _, again = sweep(8)
    assert again.ran == [] and len(again.skipped) == 5
    c12, s12 = sweep(12)
    assert "scores:ARC-Easy:gradnorm" in s12.skipped and len(s12.ran) == 4
    assert all(sum(ns) == 12 for ns in c12.allocations["ARC-Easy"].values())
    record = json.loads((tmp_path / "out" / "runs" / "ARC-Easy" / "uniform" / "seed0" / "finetune.json").read_text())
    assert sum(layer["n"] for layer in record["allocation"]["layers"]) == 12  # the adapter was trained with the new budget
