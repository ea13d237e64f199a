"""The exact root of a sum of clipped linear functions (the dual search behind every program)."""

import numpy as np
import pytest

from layercap.programs._solve import clipped_linear_root, clipped_sum


@pytest.mark.parametrize("seed", range(4))
def test_root_is_exact_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    for trial in range(250):
        K = int(rng.integers(1, 3000)) if trial % 10 == 0 else int(rng.integers(1, 600))
        a = rng.random(K) * rng.choice([0, 1], K, p=[0.1, 0.9])
        b = rng.normal(size=K)
        lo = rng.random(K) * 0.5
        hi = lo + rng.random(K) * rng.choice([1, np.inf], K, p=[0.8, 0.2])
        h = rng.random(K) + 0.1
        if trial % 3 == 0:
            a = a * 10.0 ** rng.uniform(-200, 200, K)  # slopes over 400 decades
        if trial % 7 == 0:
            a, b = np.round(a, 1), np.round(b, 1)  # many tied breakpoints
        with np.errstate(over="ignore", invalid="ignore"):  # the test's own +-1e300 probes
            f_min, f_max = clipped_sum(-1e300, a, b, lo, hi, h), clipped_sum(1e300, a, b, lo, hi, h)
        target = f_min + (min(f_max, f_min + 10 * K) - f_min) * rng.random()
        small = int(rng.integers(1, 200))
        for side in ("left", "right"):
            t = clipped_linear_root(a, b, lo, hi, h, target, side=side, small=small)
            with np.errstate(over="ignore", invalid="ignore"):
                v = clipped_sum(t, a, b, lo, hi, h)
            assert abs(v - target) <= 1e-9 * max(1.0, abs(target)), (trial, side, t, v, target)


def test_flat_regions_pick_the_requested_side():
    # f = clip(t, 0, 1) + clip(t - 2, 0, 1): flat at 1 on [1, 2]
    a, b, lo, hi, h = np.ones(2), np.array([0.0, -2.0]), np.zeros(2), np.ones(2), np.ones(2)
    assert clipped_linear_root(a, b, lo, hi, h, 1.0, side="left") == pytest.approx(1.0)
    assert clipped_linear_root(a, b, lo, hi, h, 1.0, side="right") == pytest.approx(2.0)
    assert clipped_linear_root(a, b, lo, hi, h, 3.0, side="right") == np.inf
    assert clipped_linear_root(a, b, lo, hi, h, -1.0, side="right") == -np.inf
