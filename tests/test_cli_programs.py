"""CLI of the programs (allocate, prune-ratios, transfer), run in-process through cli.main."""

import json

import numpy as np
import pytest

from layercap import LayerScore, LayerScores
from layercap.cli import main
from layercap.programs.records import Allocation, PruningRatios, TransferResult


@pytest.fixture()
def scores(tmp_path):
    rng = np.random.default_rng(0)
    s = LayerScores([LayerScore(f"model.layers.{i}", float(rng.random()), int(rng.integers(1000, 2000))) for i in range(8)],
                    method="kfac", metadata={"model": "tiny"})
    t = LayerScores([LayerScore(f"model.layers.{i}", float(rng.random()), l.params) for i, l in enumerate(s.layers)], method="kfac")
    s.save(tmp_path / "s.json")
    t.save(tmp_path / "t.json")
    return tmp_path


def test_allocate_writes_json_and_csv(scores, capsys):
    out = scores / "alloc.json"
    assert main(["allocate", str(scores / "s.json"), "--budget", "40", "-o", str(out), "--csv"]) == 0
    a = Allocation.load(out)
    assert a.rule == "mdl" and a.integer and a.spent == 40 and a.binds and min(a.counts().values()) >= 1
    assert (scores / "alloc.csv").read_text().splitlines()[0] == "name,n,cost,q"
    printed = capsys.readouterr().out
    assert "model.layers.7" in printed and "spent 40 of 40" in printed


def test_allocate_options(scores):
    out = scores / "a.json"
    args = ["allocate", str(scores / "s.json"), "--budget", "20", "--rule", "mola-2468", "--unit", "rank",
            "--min", "0", "--max", "8", "-o", str(out)]
    assert main(args) == 0
    a = Allocation.load(out)
    assert a.unit == "rank" and [l.n for l in a.layers] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert main(["allocate", str(scores / "s.json"), "--budget", "30.5", "--continuous", "--alpha", "auto",
                 "--beta", "1", "-o", str(out)]) == 0
    c = Allocation.load(out)
    assert not c.integer and c.spent == pytest.approx(30.5)
    (scores / "costs.csv").write_text("name,cost\n" + "".join(f"model.layers.{i},{1 + i % 2}\n" for i in range(8)))
    assert main(["allocate", str(scores / "s.json"), "--budget", "20", "--cost", str(scores / "costs.csv"), "-o", str(out)]) == 0
    f = Allocation.load(out)
    assert [l.cost for l in f.layers] == [1.0, 2.0] * 4 and f.spent <= 20
    assert main(["allocate", str(scores / "s.json"), "--budget", "100000", "--cost", "params", "-o", str(out)]) == 0
    assert Allocation.load(out).spent <= 100000


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--budget", "4"], "infeasible"),             # 8 layers x min 1 > 4
        (["--budget", "40", "--alpha", "big"], "--alpha"),
        (["--budget", "40", "--min", "2", "--max", "1"], "upper"),
        (["--budget", "40", "--cost", "nope.csv"], "--cost"),
        (["--budget", "40", "--min", "0.5"], "whole"),
    ],
)
def test_allocate_bad_input_writes_nothing(scores, capsys, extra, fragment):
    out = scores / "never.json"
    assert main(["allocate", str(scores / "s.json"), *extra, "-o", str(out), "--csv"]) == 2
    assert not out.exists() and not (scores / "never.csv").exists()
    assert fragment in capsys.readouterr().err


def test_allocate_missing_scores_file(scores, capsys):
    assert main(["allocate", str(scores / "missing.json"), "--budget", "4", "-o", str(scores / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_prune_ratios(scores, capsys):
    out = scores / "r.json"
    assert main(["prune-ratios", str(scores / "s.json"), "--sparsity", "0.5", "-o", str(out), "--csv"]) == 0
    r = PruningRatios.load(out)
    assert r.mode == "exact" and abs(r.achieved - 0.5) < 1e-12 and (scores / "r.csv").exists()
    assert r.rho.max() <= 0.95  # default cap: never a whole block removed
    assert "achieved 0.5000000000" in capsys.readouterr().out
    for rule in ("uniform", "owl", "alphapruning", "layerif"):
        assert main(["prune-ratios", str(scores / "s.json"), "--sparsity", "0.4", "--rule", rule,
                     "--min-ratio", "0.2", "--max-ratio", "0.7", "-o", str(out)]) == 0
        r = PruningRatios.load(out)
        assert r.rule == rule and abs(r.achieved - 0.4) < 1e-9 and r.rho.min() >= 0.2
    # the paper's literal program: warns that it does not bind
    assert main(["prune-ratios", str(scores / "s.json"), "--sparsity", "0.5", "--mode", "at-least",
                 "--max-ratio", "0.55", "-o", str(out)]) == 0
    assert "does not bind" in capsys.readouterr().err
    r = PruningRatios.load(out)
    assert r.mode == "at-least" and r.achieved == pytest.approx(0.55) and r.warnings


def test_prune_ratios_bad_input_writes_nothing(scores, capsys):
    out = scores / "never.json"
    assert main(["prune-ratios", str(scores / "s.json"), "--sparsity", "0.8", "--max-ratio", "0.6", "-o", str(out)]) == 2
    assert "outside" in capsys.readouterr().err and not out.exists()
    assert main(["prune-ratios", str(scores / "s.json"), "--sparsity", "0.5", "--p", "1", "-o", str(out)]) == 2
    assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: unknown rule
        main(["prune-ratios", str(scores / "s.json"), "--sparsity", "0.5", "--rule", "random", "-o", str(out)])


def test_transfer(scores, capsys):
    out = scores / "tr.json"
    assert main(["transfer", str(scores / "s.json"), str(scores / "t.json"), "--program", "allocation",
                 "--budget", "40", "-o", str(out), "--csv"]) == 0
    t = TransferResult.load(out)
    assert t.program == "allocation" and t.regret >= 0 and (scores / "tr.csv").exists()
    assert "regret" in capsys.readouterr().out
    assert main(["transfer", str(scores / "s.json"), str(scores / "t.json"), "--program", "pruning",
                 "--sparsity", "0.5"]) == 0
    assert main(["transfer", str(scores / "s.json"), str(scores / "t.json"), "--program", "pruning", "-o", str(out)]) == 2
    assert "--sparsity" in capsys.readouterr().err


def test_transfer_mismatched_layers(scores, capsys):
    other = LayerScores([LayerScore(f"x{i}", 1.0, 10) for i in range(8)])
    other.save(scores / "o.json")
    out = scores / "never.json"
    assert main(["transfer", str(scores / "s.json"), str(scores / "o.json"), "--program", "allocation",
                 "--budget", "40", "-o", str(out)]) == 2
    assert "same layers" in capsys.readouterr().err and not out.exists()


def test_outputs_are_valid_json_without_nan(scores):
    out = scores / "a.json"
    main(["allocate", str(scores / "s.json"), "--budget", "1000", "--alpha", "3", "--continuous", "-o", str(out)])
    doc = json.loads(out.read_text())
    assert doc["schema"] == "layercap.allocation/v1" and doc["binds"] is False and doc["mu"] == 0.0
