"""Real model: SmolLM2-135M on WikiText windows, all 30 blocks scored by gradnorm, diag, kfac."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy.stats import spearmanr

from layercap.data.calibration import calibration_set
from layercap.scores import ScoreOptions, score_model

pytestmark = pytest.mark.slow


def test_smollm2_blocks_scored_by_three_methods(smollm2, wikitext):
    model, tok = smollm2
    model = copy.deepcopy(model)  # the session fixture must not be touched
    calib = calibration_set(tok, wikitext, nsamples=4, seqlen=64, seed=0)
    results = {}
    for method in ("gradnorm", "diag", "kfac"):
        scores = score_model(model, method, calib, options=ScoreOptions(batch_size=2))
        assert len(scores) == 30 and scores.names[0] == "model.layers.0"
        assert np.all(np.isfinite(scores.zeta2)) and np.all(scores.zeta2 > 0)
        assert scores.q.sum() == pytest.approx(1.0)
        assert scores.params[0] == 3_540_096  # 4 attention + 3 MLP Linears + 2 norms of one block
        results[method] = scores.zeta2
    rho = {f"{a}~{b}": spearmanr(results[a], results[b]).statistic
           for a, b in (("gradnorm", "diag"), ("gradnorm", "kfac"), ("diag", "kfac"))}
    print("Spearman:", {k: round(v, 3) for k, v in rho.items()})
    for method, z in results.items():
        print(method, np.array2string(z / z.sum(), precision=4, max_line_width=200))
    # the two curvature estimates of the same quantity must broadly agree on the layer ranking
    assert rho["diag~kfac"] > 0.5
