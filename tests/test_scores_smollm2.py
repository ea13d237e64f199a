"""Real model: SmolLM2-135M on WikiText windows, all 30 blocks scored by gradnorm and diag, and
the 10 blocks 0, 3, ..., 27 by kfac.

One test per method, sharing the windows and the scores through a module cache (`make test`
distributes tests by module, so they run on one worker and nothing is scored twice). K-FAC's cost
is its float64 eigendecompositions (14 per block, about 80 % of its 68 s for all 30 blocks on one
thread; 12 blocks took 80-122 s beside another test worker), so it scores a spread-out subset of
the blocks (the blocks_regex path, as `--blocks`).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy.stats import spearmanr

from layercap.data.calibration import calibration_set
from layercap.scores import ScoreOptions, score_model

pytestmark = pytest.mark.slow
METHODS = ("gradnorm", "diag", "kfac")
KFAC_INDEX = list(range(0, 30, 3))
KFAC_BLOCKS = r"model\.layers\.(" + "|".join(map(str, KFAC_INDEX)) + ")"


@pytest.fixture(scope="module")
def scored(smollm2, wikitext):
    """method -> zeta2 (30,), computed on first use."""
    model, tok = smollm2
    model = copy.deepcopy(model)  # the session fixture must not be touched
    calib = calibration_set(tok, wikitext, nsamples=4, seqlen=64, seed=0)
    cache: dict[str, np.ndarray] = {}

    def get(method: str) -> np.ndarray:
        if method not in cache:
            regex = KFAC_BLOCKS if method == "kfac" else None
            scores = score_model(model, method, calib, options=ScoreOptions(batch_size=2), blocks_regex=regex)
            expected = [f"model.layers.{k}" for k in (KFAC_INDEX if regex else range(30))]
            assert scores.names == expected
            assert np.all(np.isfinite(scores.zeta2)) and np.all(scores.zeta2 > 0)
            assert scores.q.sum() == pytest.approx(1.0)
            assert scores.params[0] == 3_540_096  # 4 attention + 3 MLP Linears + 2 norms of one block
            cache[method] = scores.zeta2
            print(method, np.array2string(scores.q, precision=4, max_line_width=200))
        return cache[method]

    return get


@pytest.mark.parametrize("method", METHODS)
def test_smollm2_blocks_scored(scored, method):
    assert scored(method).shape == (len(KFAC_INDEX) if method == "kfac" else 30,)


def test_smollm2_kfac_agrees_with_diag_on_the_ranking(scored):
    results = {m: scored(m) if m == "kfac" else scored(m)[KFAC_INDEX] for m in METHODS}
    rho = {f"{a}~{b}": spearmanr(results[a], results[b]).statistic
           for a, b in (("gradnorm", "diag"), ("gradnorm", "kfac"), ("diag", "kfac"))}
    print("Spearman:", {k: round(v, 3) for k, v in rho.items()})
    # the two curvature estimates of the same quantity must broadly agree on the layer ranking
    assert rho["diag~kfac"] > 0.5
