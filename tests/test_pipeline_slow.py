"""`layercap run` on the real SmolLM2-135M (the default config, cut down to fit a few minutes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layercap.experiments.config import load_config
from layercap.experiments.run import run_pipeline

# The embedded default at a small size: one cheap curvature estimator (diag) stands in for kfac
# as the decisions' source, and the heavy-tail rules are left out (alpha-hill on SmolLM2 is tested
# in test_scores_baselines; the estimators against dense references on tiny models). Three damage
# levels instead of nine: the OBD table was 41 of the test's 91 s on an idle core.
SMALL = [
    "model.device=cpu",
    "data.nsamples=2", "data.seqlen=64",
    "scoring.methods=[diag,owl]", "allocation.scores=diag", "pruning.scores=diag",
    "allocation.rules=[mdl,uniform,mola-2468]", "pruning.rules=[mdl:obd-linear,mdl,uniform,owl]",
    "allocation.budget=60", "pruning.damage_levels=[0.3,0.5,0.7]",
    "pruning.save_checkpoints=false",  # the tiny end-to-end test covers saved checkpoints
    "evaluation.ppl_tokens=1024", "evaluation.tasks=[ARC-Easy]", "evaluation.limit=6",
]


@pytest.mark.slow
def test_default_job_on_smollm2(shared_data, tmp_path):
    config = load_config(None, SMALL + [f"data.root={shared_data}"])
    run_dir = tmp_path / "smollm2"
    summary = run_pipeline(config, run_dir)
    assert summary.skipped == []
    load = lambda rel: json.loads((run_dir / rel).read_text())

    model = load("model.json")
    assert len(model["blocks"]) == 30 and model["num_params"] > 100e6
    for rule in config.allocation.rules:
        n = np.array([layer["n"] for layer in load(f"allocation/{rule}.json")["layers"]])
        assert n.sum() == 60 and n.min() >= 1, rule
    from layercap.programs.records import PruningRatios

    for rule in config.pruning.rules:  # per block, or per Linear (mdl:obd-linear): weighted by the layers' weights
        r = PruningRatios.load(run_dir / f"ratios/{rule.replace(':', '-')}.json")
        assert abs(r.rho @ r.params / r.params.sum() - 0.5) < 1e-6, rule
    for rule in ("mdl", "mdl-obd-linear"):
        mdl = PruningRatios.load(run_dir / f"ratios/{rule}.json").rho
        assert mdl.std() > 1e-3, rule  # real scores / damage differ across blocks, so MDL ratios are not uniform
    assert len(PruningRatios.load(run_dir / "ratios/mdl-obd-linear.json").names) == 7 * 30

    # the default job prunes with mdl:obd-linear and uniform
    dense, pruned = load("eval/dense.json"), {r: load(f"eval/{r}.json") for r in ("mdl-obd-linear", "uniform")}
    ppl = dense["perplexity"]["wiki.test.raw"]
    assert 10 < ppl < 80  # data README: about 30 on 2048 tokens
    for rule, ev in pruned.items():
        assert ev["perplexity"]["wiki.test.raw"] > ppl, rule  # 50% pruning hurts
        assert abs(load(f"pruned/{rule}.json")["sparsity"] - 0.5) < 0.005
    assert not (run_dir / "pruned/mdl-obd-linear").exists()  # save_checkpoints false
    md = (run_dir / "report.md").read_text()
    assert f"{ppl:.2f}" in md and "| mdl:obd-linear |" in md and "report_files/ratios.png" in md
    assert "report_files/damage-obd-linear.png" in md and "**Best rule: `" in md
