"""compare-pruning on a tiny model: cells, resumability, outputs, independent recomputation."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch

from layercap.errors import LayercapError
from layercap.experiments.pruning_sweep import PruningSweepOptions, run_pruning_sweep
from layercap.programs.rules import RuleSpec
from layercap.programs.rules import parse_rule as _parse_rule
from layercap.report.pruning_table import Comparison, cell_id


def parse_rule(text):
    from layercap.scores import available_methods

    return _parse_rule(text, "pruning", known_sources=available_methods())


def run_comparison(model, rules, methods, sparsities, out, log=None, **kw):
    return run_pruning_sweep(PruningSweepOptions(model, rules, methods, sparsities, **kw), out, log=lambda m: None)[0]

TEXT = "The quick brown fox jumps over the lazy dog. Pruning removes weights; experts add capacity. " * 40
TASK = [
    {"context": "The quick brown", "choices": [" fox", " dog"], "label": 0},
    {"context": "Pruning removes", "choices": [" weights", " experts"], "label": 0},
    {"context": "The lazy", "choices": [" dog", " fox", " cat"], "label": 0},
]


@pytest.fixture()
def setup(tmp_path):
    from layercap.models.tiny import build_tiny

    model, tok = build_tiny("llama", num_layers=3)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    task = tmp_path / "toy.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in TASK) + "\n")
    return tmp_path, dict(data=text, nsamples=4, seqlen=32, ppl=[text], tasks=[task], eval_seqlen=64, max_tokens=200, start_token=200, batch_size=4, progress=False, log=lambda m: None)


def test_parse_rule():
    assert parse_rule("uniform") == RuleSpec("uniform", None)
    assert parse_rule("owl") == RuleSpec("owl", "owl")
    assert parse_rule("alphapruning") == RuleSpec("alphapruning", "alpha-hill")
    assert parse_rule("layerif") == RuleSpec("layerif", "influence")
    assert parse_rule("mdl") == RuleSpec("mdl", "kfac") and parse_rule("mdl:diag").label == "mdl:diag"
    assert parse_rule("owl:diag").label == "owl:diag" and parse_rule("owl").label == "owl"
    assert cell_id(parse_rule("mdl:kfac"), "wanda", 0.5) == "mdl-kfac_wanda_s0.50"
    for bad, match in (("foo", "unknown"), ("mdl:nope", "not available"), ("uniform:kfac", "reads no scores")):
        with pytest.raises(LayercapError, match=match):
            parse_rule(bad)


def test_run_resume_and_outputs(setup, monkeypatch):
    tmp, kw = setup
    out = tmp / "cmp"
    res = run_comparison(str(tmp / "m"), ["uniform", "mdl:diag"], ["wanda"], [0.5], out, **kw)
    assert [c.label for c in res.cells] == ["uniform", "mdl:diag"]
    for name in ("comparison.json", "comparison.csv", "comparison.md", "comparison.png", "run.json", "scores/diag.json"):
        assert (out / name).is_file(), name
    uni, mdl = res.cells
    assert set(uni.ratios.values()) == {0.5}
    # MDL ratios differ per block but meet the target weighted by prunable weights
    from layercap.models import find_blocks, load_model

    model, tok = load_model(str(tmp / "m"))
    blocks = find_blocks(model)
    N = np.array([b.num_prunable for b in blocks], float)
    rho = np.array([mdl.ratios[b.name] for b in blocks])
    assert abs(float(N @ rho / N.sum()) - 0.5) < 1e-6 and rho.std() > 1e-4
    for c in res.cells:  # Wanda prunes exactly the requested share of each Linear (row-wise rounding)
        assert c.achieved == pytest.approx(0.5, abs=0.01)

    # independent recomputation of one cell: same calibration, same ratios -> same perplexity
    from layercap.apply.prune import prune_model
    from layercap.data.calibration import calibration_set
    from layercap.evaluate import perplexity

    calib = calibration_set(tok, kw["data"], nsamples=4, seqlen=32, seed=0, start_token=200)
    pruned = copy.deepcopy(model)
    prune_model(pruned, mdl.ratios, method="wanda", calib=calib, batch_size=4, progress=False)
    ppl = perplexity(pruned, tok, kw["ppl"][0], seqlen=64, max_tokens=200, progress=False)
    assert mdl.eval.ppl["text.txt"].ppl == pytest.approx(ppl.ppl, rel=1e-6)
    # its calibration KL, by a hand loop over the same windows: mean over predicted positions
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=calib.input_ids).logits[:, :-1].double(), -1)
        q = torch.log_softmax(pruned(input_ids=calib.input_ids).logits[:, :-1].double(), -1)
    hand = float((p.exp() * (p - q)).sum(-1).mean())
    assert hand > 1e-4 and mdl.calibration_kl == pytest.approx(hand, rel=1e-3)  # float32 log-softmax
    fid = json.loads((out / "fidelity" / "mdl-diag_wanda_s0.50.json").read_text())
    assert fid["windows"] == 4 and fid["tokens"] == 4 * 31
    assert fid["dense_nll"] < fid["nll"]

    # outputs: json round trip, csv rows, markdown rows
    back = Comparison.load(out / "comparison.json")
    assert back.to_dict() == res.to_dict()
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["rule"] for r in rows] == ["dense", "uniform", "mdl:diag"]
    assert float(rows[2]["ppl:text.txt"]) == pytest.approx(mdl.eval.ppl["text.txt"].ppl)
    md = (out / "comparison.md").read_text()
    assert md.count("\n") == 2 + 3 and "| dense |" in md and "| mdl:diag | wanda | 0.5 |" in md

    # rerun: finished cells are reused (pruning would fail), a new rule adds only its cells
    import layercap.apply.prune as prune_pkg

    calls = []
    real = prune_pkg.prune_model
    monkeypatch.setattr(prune_pkg, "prune_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run_comparison(str(tmp / "m"), ["uniform", "mdl:diag", "owl"], ["wanda"], [0.5], out, **kw)
    assert len(calls) == 2 and [c.label for c in again.cells] == ["uniform", "mdl:diag", "owl"]  # owl's cell and fit
    assert again.cells[1].to_dict() == mdl.to_dict()

    # the same plan again: nothing reruns
    opts = {k: v for k, v in kw.items() if k != "log"}
    _, summary = run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), ["uniform", "mdl:diag"], ["wanda"], [0.5], **opts), out)
    assert summary.ran == [] and len(summary.skipped) == 6
    # other calibration windows: scores and cells rerun, the dense evaluation does not
    _, summary = run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), ["uniform", "mdl:diag"], ["wanda"], [0.5],
                                                       **{**opts, "nsamples": 6}), out)
    assert summary.ran == ["scores:diag", "cell:uniform_wanda_s0.50", "fit:uniform_wanda_s0.50", "cell:mdl-diag_wanda_s0.50",
                           "fit:mdl-diag_wanda_s0.50"]
    assert summary.skipped == ["dense"]
    # only the cells of the latest settings are collected (the owl cell of nsamples 4 is not)
    from layercap.experiments.pruning_sweep import collect

    assert [c.label for c in collect(out).cells] == ["uniform", "mdl:diag"]


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(rules=["bogus"]), "unknown"),
        (dict(methods=["prunezilla"]), "pruner"),
        (dict(sparsities=[0.95]), "must lie"),
        (dict(data="missing.txt"), "does not exist"),
        (dict(tasks=["missing.jsonl"]), "does not exist"),
        (dict(rules=["owl", "owl"]), "twice"),
    ],
)
def test_bad_input_writes_nothing(setup, override, match):
    tmp, kw = setup
    args = dict(rules=["uniform"], methods=["wanda"], sparsities=[0.5])
    args.update({k: v for k, v in override.items() if k in args})
    kw = {**kw, **{k: (tmp / v if isinstance(v, str) else [tmp / x for x in v]) for k, v in override.items() if k in ("data", "tasks")}}
    with pytest.raises(LayercapError, match=match):
        run_comparison(str(tmp / "m"), args["rules"], args["methods"], args["sparsities"], tmp / "cmp", **kw)
    assert not (tmp / "cmp").exists()


def test_cli_compare_pruning(setup, capsys):
    from layercap.cli import main

    tmp, kw = setup
    rc = main([
        "compare-pruning", str(tmp / "m"), "--sparsity", "0.5", "--methods", "magnitude", "--rules", "uniform", "alphapruning",
        "--data", str(kw["data"]), "--nsamples", "4", "--seqlen", "32", "--ppl", str(kw["ppl"][0]), "--eval-seqlen", "64",
        "--max-tokens", "200", "--start-token", "200", "--tasks", str(kw["tasks"][0]), "-o", str(tmp / "cli"), "--quiet",
    ])
    assert rc == 0
    assert "| alphapruning | magnitude | 0.5 |" in capsys.readouterr().out
    assert (tmp / "cli" / "scores" / "alpha-hill.json").is_file()
    rc = main(["compare-pruning", str(tmp / "m"), "--rules", "mdl:nope", "--data", str(kw["data"]), "--ppl", str(kw["ppl"][0]), "-o", str(tmp / "bad")])
    assert rc == 2 and not (tmp / "bad").exists()


def test_report_only_collects_finished_cells(setup, tmp_path):
    from layercap.cli import main
    from layercap.experiments.pruning_sweep import collect

    tmp, kw = setup
    out = tmp / "cmp"
    run_comparison(str(tmp / "m"), ["mdl:diag", "uniform"], ["magnitude"], [0.5], out, **kw)
    run_comparison(str(tmp / "m"), ["uniform"], ["magnitude"], [0.6], out, **kw)
    got = collect(out)
    assert [(c.label, c.sparsity) for c in got.cells] == [("uniform", 0.5), ("mdl:diag", 0.5), ("uniform", 0.6)]
    (out / "comparison.md").unlink()
    assert main(["compare-pruning", str(tmp / "m"), "-o", str(out), "--report-only"]) == 0
    assert (out / "comparison.md").read_text().count("| uniform | magnitude |") == 2
    assert main(["compare-pruning", str(tmp / "m"), "-o", str(tmp / "none"), "--report-only"]) == 2
    assert main(["compare-pruning", str(tmp / "m"), "-o", str(tmp / "none2"), "--ppl", str(kw["ppl"][0])]) == 2  # no --data

    # the fit files: every cell's calibration KL is collected; one from other ratios is ignored,
    # a damaged one is refused naming the file (and --report-only writes nothing new)
    assert all(c.calibration_kl is not None and c.calibration_kl > 0 for c in got.cells)
    fit = out / "fidelity" / "mdl-diag_magnitude_s0.50.json"
    doc = json.loads(fit.read_text())
    fit.write_text(json.dumps({**doc, "ratios_sha256": "0" * 64}))
    assert [c.calibration_kl is None for c in collect(out).cells] == [False, True, False]
    fit.write_text(json.dumps({**doc, "kl": float("nan")}))
    with pytest.raises(LayercapError, match="mdl-diag_magnitude_s0.50.json.*finite"):
        collect(out)
    before = (out / "comparison.md").read_text()
    assert main(["compare-pruning", str(tmp / "m"), "-o", str(out), "--report-only"]) == 2
    assert (out / "comparison.md").read_text() == before
    fit.write_text(json.dumps({**doc, "schema": "other/v1"}))
    with pytest.raises(LayercapError, match="schema"):
        collect(out)


def test_calibration_fidelity_by_hand():
    """The dense model against itself: KL 0 and equal NLL; against a perturbed copy: the hand-computed
    mean over predicted positions, in any batch size."""
    from layercap.apply.prune import calibration_fidelity
    from layercap.data.calibration import CalibrationSet
    from layercap.models.tiny import build_tiny

    model, _ = build_tiny("llama", num_layers=2)
    ids = torch.randint(0, model.config.vocab_size, (5, 9), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(ids, "x", "hand", 0)
    same = calibration_fidelity(model, model, calib, batch_size=2)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.nll == pytest.approx(same.dense_nll)
    assert (same.tokens, same.windows) == (5 * 8, 5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
        lq = torch.log_softmax(other(input_ids=ids).logits[:, :-1].double(), -1)
    hand_kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    hand_nll = float(-lq.gather(-1, ids[:, 1:, None]).mean())
    for bs in (1, 3, 8):
        got = calibration_fidelity(model, other, calib, batch_size=bs)
        assert got.kl == pytest.approx(hand_kl, rel=1e-3) and got.nll == pytest.approx(hand_nll, rel=1e-4)
    with pytest.raises(LayercapError, match="batch_size"):
        calibration_fidelity(model, other, calib, batch_size=0)


def test_measured_rules_on_the_same_budget(setup):
    """mdl:damage, mdl:obd, atp, evopress and mdl-paper run through the sweep: each meets the
    target exactly, records its decision cost, and the damage tables are stages of their own."""
    tmp, kw = setup
    rules = ["uniform", "mdl:damage", "mdl:obd", "atp", "evopress", "mdl-paper:diag"]
    opts = {k: v for k, v in kw.items() if k != "log"}
    res, summary = run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), rules, ["wanda"], [0.5], damage_levels=[0.25, 0.5, 0.75],
                                                         search_generations=2, damage_nsamples=3, **opts), tmp / "measured")
    assert "damage:wanda" in summary.ran and "obd:wanda" in summary.ran and "scores:diag" in summary.ran
    assert [c.label for c in res.cells] == ["uniform", "mdl:damage", "mdl:obd", "atp", "evopress", "mdl-paper:diag"]
    from layercap.models import find_blocks, load_model

    model, _ = load_model(str(tmp / "m"))
    N = np.array([b.num_prunable for b in find_blocks(model)], float)
    for c in res.cells:
        rho = np.array(list(c.ratios.values()))
        assert abs(float(N @ rho / N.sum()) - 0.5) < 1e-6, c.label
        assert c.decision_seconds is not None and c.decision_seconds >= 0
    assert (tmp / "measured" / "damage" / "wanda.json").is_file()
    assert not list((tmp / "measured").rglob("*.partial"))  # finished tables replace their checkpoints
    table = json.loads((tmp / "measured" / "damage" / "wanda.json").read_text())
    assert table["calibration"]["nsamples"] == 3  # the measured decisions read the first damage_nsamples windows
    md = (tmp / "measured" / "comparison.md").read_text()
    assert "| mdl:obd | wanda | 0.5 |" in md and "decision (s)" in md


def test_damage_refine_searches_from_the_program_on_the_same_table(setup):
    """mdl:damage+refine reads mdl:damage's table (no second damage stage), keeps the budget exact,
    and its cell (only) reruns when the search budget changes."""
    tmp, kw = setup
    opts = {k: v for k, v in kw.items() if k != "log"}
    common = dict(damage_levels=[0.25, 0.5, 0.75], damage_nsamples=3, **opts)
    rules = ["mdl:damage", "mdl:damage+refine"]
    res, summary = run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), rules, ["wanda"], [0.5], search_generations=2, **common),
                                     tmp / "refine")
    assert [c.label for c in res.cells] == rules
    assert [n for n in summary.ran if n.startswith("damage:")] == ["damage:wanda"]
    assert (tmp / "refine" / "cells" / "mdl-damage-refine_wanda_s0.50.json").is_file()
    from layercap.models import find_blocks, load_model

    model, _ = load_model(str(tmp / "m"))
    N = np.array([b.num_prunable for b in find_blocks(model)], float)
    refined = np.array(list(res.cells[1].ratios.values()))
    assert abs(float(N @ refined / N.sum()) - 0.5) < 1e-6
    _, again = run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), rules, ["wanda"], [0.5], search_generations=3, **common),
                                 tmp / "refine")
    assert [n for n in again.ran if n.startswith("cell:")] == ["cell:mdl-damage-refine_wanda_s0.50"]


def test_standings_by_hand():
    from layercap.evaluate import EvalResult
    from layercap.evaluate.perplexity import PerplexityResult
    from layercap.report.pruning_table import CellResult, Comparison

    def ev(**ppl):
        return EvalResult("m", {k: PerplexityResult(v, 0.0, 1, 1, 8, 8, k, "x") for k, v in ppl.items()})

    def cell(rule, source, a, b, method="wanda", s=0.7):
        return CellResult(rule, source, method, s, s, {}, ev(a=a, b=b))

    cells = [cell("uniform", None, 100.0, 50.0), cell("owl", "owl", 80.0, 40.0), cell("atp", "measured", 60.0, 45.0),
             cell("mdl", "obd", 45.0, 40.3), cell("mdl", "damage", 50.0, 60.0), cell("mdl-paper", "kfac", 300.0, 90.0),
             cell("uniform", None, 10.0, 10.0, s=0.5), cell("mdl", "obd", 12.0, 9.0, s=0.5), cell("owl", "owl", 11.0, 11.0, s=0.5)]
    rows = {(r["sparsity"], r["text"]): r for r in Comparison({}, ev(a=1.0, b=1.0), cells).standings()}
    a, b = rows[(0.7, "a")], rows[(0.7, "b")]
    assert (a["best_layercap"], a["best_peer"], a["verdict"]) == ("mdl:obd", "atp", "wins")
    assert a["vs_uniform"] == pytest.approx(0.45) and a["beats_uniform"]
    assert (b["best_layercap"], b["best_peer"], b["verdict"]) == ("mdl:obd", "owl", "ties")  # 40.3 / 40 within 1 %
    low_a, low_b = rows[(0.5, "a")], rows[(0.5, "b")]
    assert low_a["verdict"] == "loses" and low_a["beats_uniform"] is False
    assert low_b["verdict"] == "wins" and low_b["vs_uniform"] == pytest.approx(0.9)
    md = Comparison({}, ev(a=1.0, b=1.0), cells).standings_markdown()
    assert md.count("\n| wanda |") == 4 and "| ties |" in md
    assert a["pick"] is None and "pick" not in md  # no calibration KL measured: no pick

    # the pick is chosen on calibration KL alone: mdl:damage (0.3) over mdl:obd (0.5) though obd evaluates better
    for c, kl in zip(cells[:6], [0.9, 0.6, 0.4, 0.5, 0.3, 2.0]):
        c.calibration_kl = kl
    comp = Comparison({}, ev(a=1.0, b=1.0), cells)
    rows = {(r["sparsity"], r["text"]): r for r in comp.standings()}
    a, b = rows[(0.7, "a")], rows[(0.7, "b")]
    assert (a["pick"], a["pick_ppl"], a["pick_verdict"]) == ("mdl:damage", 50.0, "wins")  # 50 vs atp 60
    assert a["pick_vs_uniform"] == pytest.approx(0.5) and a["best_layercap"] == "mdl:obd"
    assert (b["pick"], b["pick_verdict"]) == ("mdl:damage", "loses") and b["pick_vs_peer"] == pytest.approx(1.5)
    # KL (0.9, 0.6, 0.4, 0.5, 0.3, 2.0) against ppl on text a (100, 80, 60, 45, 50, 300): scipy.stats.spearmanr 0.828571
    assert a["kl_spearman"] == pytest.approx(0.8285714, abs=1e-6)
    assert rows[(0.5, "a")]["pick"] is None  # no KL at 50 %
    md = comp.standings_markdown()
    assert "Layercap's pick" in md and md.count("| mdl:damage | 0.3000 |") == 2


def test_context_damage_is_one_table_per_sparsity(setup):
    """mdl:context measures its curves at each target's uniform operating point: one stage and table
    per (pruner, sparsity), each recording that context; the ratios meet every target exactly, and a
    new sparsity adds only its own table and cell."""
    tmp, kw = setup
    opts = {k: v for k, v in kw.items() if k != "log"}
    common = dict(damage_levels=[0.25, 0.5, 0.75], damage_nsamples=3, **opts)
    res, summary = run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), ["mdl:context"], ["wanda"], [0.5], **common), tmp / "ctx")
    assert [n for n in summary.ran if n.startswith("context:")] == ["context:wanda:s0.50"]
    table = json.loads((tmp / "ctx" / "damage" / "context-wanda-s0.50.json").read_text())
    assert set(table["metadata"]["context"]["ratios"].values()) == {0.5}
    assert table["metadata"]["context"]["kl"] > 0 and len(table["metadata"]["context"]["kl_block_dense"]) == 3
    _, again = run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), ["mdl:context"], ["wanda"], [0.5, 0.6], **common), tmp / "ctx")
    assert sorted(again.ran) == ["cell:mdl-context_wanda_s0.60", "context:wanda:s0.60", "fit:mdl-context_wanda_s0.60"]
    from layercap.models import find_blocks, load_model

    model, _ = load_model(str(tmp / "m"))
    N = np.array([b.num_prunable for b in find_blocks(model)], float)
    for s in (0.5, 0.6):
        cell = json.loads((tmp / "ctx" / "cells" / f"mdl-context_wanda_s{s:.2f}.json").read_text())
        assert abs(float(N @ np.array(list(cell["ratios"].values())) / N.sum()) - s) < 1e-6
        tried = cell["decision"]["search"]  # the trust radius was chosen on calibration KL among those tried
        assert cell["decision"]["fitness"] == min(v for _, v in tried) and cell["decision"]["radius"] in [r for r, _ in tried]


def test_fitness_windows_apart_from_the_damage_windows(setup):
    """--fitness-nsamples sets the windows of the searches' fitness (atp's step, +refine) without
    touching the damage curves' windows; changing it reruns the searched cells and nothing else."""
    tmp, kw = setup
    opts = {k: v for k, v in kw.items() if k != "log"}
    common = dict(damage_levels=[0.25, 0.5, 0.75], damage_nsamples=2, search_generations=2, **opts)
    rules = ["mdl:damage", "mdl:damage+refine", "atp"]
    res, _ = run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), rules, ["wanda"], [0.5], fitness_nsamples=4, **common),
                               tmp / "fit")
    assert json.loads((tmp / "fit" / "damage" / "wanda.json").read_text())["calibration"]["nsamples"] == 2
    by = {c.label: c for c in res.cells}
    assert by["atp"].decision["fitness_windows"] == 4 and by["mdl:damage+refine"].decision["fitness_windows"] == 4
    assert "fitness_windows" not in by["mdl:damage"].decision  # the program alone searches nothing
    _, again = run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), rules, ["wanda"], [0.5], fitness_nsamples=3, **common),
                                 tmp / "fit")
    assert sorted(n for n in again.ran if n.startswith("cell:")) == ["cell:atp_wanda_s0.50", "cell:mdl-damage-refine_wanda_s0.50"]
    with pytest.raises(LayercapError, match="fitness_nsamples must lie in"):
        PruningSweepOptions(str(tmp / "m"), rules, ["wanda"], [0.5], fitness_nsamples=5, **common)


def test_fitness_nsamples_flag_needs_a_search(setup, capsys):
    from layercap.cli import main

    tmp, kw = setup
    code = main(["compare-pruning", str(tmp / "m"), "--rules", "uniform", "mdl:damage", "--fitness-nsamples", "3",
                 "--data", str(kw["data"]), "--ppl", str(kw["ppl"][0]), "-o", str(tmp / "x")])
    assert code == 2 and "--fitness-nsamples: ignored" in capsys.readouterr().err
    assert not (tmp / "x").exists()


def test_per_linear_rules_on_the_same_budget(setup):
    """mdl:obd-linear / mdl:damage-linear: a ratio per Linear from tables with a row per Linear;
    the budget is met exactly weighted by each Linear's weights, and the pruned model has those
    ratios module by module. A search from them is refused (the searches move whole blocks)."""
    from layercap.apply.prune.damage import prunable_units
    from layercap.models import find_blocks, load_model

    tmp, kw = setup
    opts = {k: v for k, v in kw.items() if k != "log"}
    res, summary = run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), ["mdl:obd-linear", "mdl:damage-linear"], ["wanda"], [0.6],
                                                         damage_levels=[0.3, 0.6, 0.9], damage_nsamples=2, **opts), tmp / "lin")
    assert {"obd-linear:wanda", "damage-linear:wanda"} <= set(summary.ran)
    assert (tmp / "lin" / "damage" / "wanda-linear.json").is_file() and (tmp / "lin" / "damage" / "obd-wanda-linear.json").is_file()
    model, _ = load_model(str(tmp / "m"))
    units = prunable_units(find_blocks(model), "linear")
    N = np.array([u.params for u in units], float)
    for c in res.cells:
        rho = np.array([c.ratios[u.name] for u in units])
        assert abs(float(N @ rho / N.sum()) - 0.6) < 1e-6 and rho.std() > 1e-3  # not one ratio per block
        assert c.achieved == pytest.approx(0.6, abs=0.01) and c.calibration_kl > 0
    with pytest.raises(LayercapError, match="'obd-linear\\+refine' is not available"):
        PruningSweepOptions(str(tmp / "m"), ["mdl:obd-linear+refine"], ["wanda"], [0.6], **opts)


# ---- the OBD-form check (benchmarks/obd_agreement.py) ---------------------------------------------
def test_obd_agreement_benchmark_reproduces_the_sweeps_obd_table(setup, capsys):
    """The benchmark's diagonal-Fisher row equals the Spearman of the sweep's own OBD table against its
    measured table (same windows, same masks); it refuses a table measured on other windows."""
    import importlib.util
    from pathlib import Path

    from layercap.programs.damage import DamageTable, spearman

    tmp, kw = setup
    opts = {k: v for k, v in kw.items() if k != "log"}
    out = tmp / "agree"
    run_pruning_sweep(PruningSweepOptions(str(tmp / "m"), ["mdl:damage", "mdl:obd"], ["wanda"], [0.5],
                                          damage_levels=[0.25, 0.5, 0.75], damage_nsamples=3, **opts), out)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "obd_agreement.py"
    spec = importlib.util.spec_from_file_location("obd_agreement", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    capsys.readouterr()
    assert bench.main([str(out), "--method", "wanda"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["diag"], ["kfac"])}
    measured = DamageTable.load(out / "damage" / "wanda.json")
    obd = DamageTable.load(out / "damage" / "obd-wanda.json")
    expected = [spearman([r[j] for r in obd.obd["diag"]], [r[j] for r in measured.kl]) for j in range(3)]
    assert rows["diag"] == ["-" if e is None else f"{e:+.2f}" for e in expected]
    assert len(rows["kfac"]) == 3 and all(v == "-" or -1.0 <= float(v) <= 1.0 for v in rows["kfac"])
    doc = json.loads((out / "damage" / "wanda.json").read_text())
    doc["calibration"]["sha256"] = "0" * 64
    (out / "damage" / "wanda.json").write_text(json.dumps(doc))
    with pytest.raises(LayercapError, match="other calibration windows"):
        bench.main([str(out), "--method", "wanda"])
