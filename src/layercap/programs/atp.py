"""Two peer rules on the same budget (numpy only): ATP's arithmetic progression and ``mdl-paper``.

``atp`` (ATP, "layer-wise sparsity as an arithmetic progression over depth"): rho_k = c +
step * k for blocks k = 0..K-1, clipped to [min_ratio, max_ratio], with the offset c solved
exactly so that the parameter-weighted mean is the target, sum_k N_k rho_k = s sum_k N_k. One
free parameter, ``step`` (ratio added per block of depth; > 0 prunes deeper blocks more).
Choosing it on calibration loss is a search (``layercap.apply.prune.search.atp_search``).

``mdl-paper``: the paper's protocol, the zeta^2 pruning program (``programs.pruning``,
psi = rho^p, mode exact) with every ratio clipped at s + margin (margin 0.05, as the paper
did). Clipping inside the program is exactly "clip, then renormalise to meet the target": the
solution is rho_k = clip(t a_k, min_ratio, s + margin) with the common scale t solved so that
the weighted mean is s.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from layercap.errors import LayercapError
from layercap.programs._solve import clipped_linear_root, dot, polish_root
from layercap.programs.pruning import pruning_ratios
from layercap.programs.records import PruningRatios, RatioLayer
from layercap.scorefile import LayerScores

PAPER_MARGIN = 0.05


def _record(rule, names, N, rho, s, lo, hi, nu=None, mode="rule", warnings=None, metadata=None) -> PruningRatios:
    layers = [RatioLayer(str(n), float(r), int(p)) for n, r, p in zip(names, rho, N)]
    achieved = float(dot(N, rho) / float(N.sum()))
    return PruningRatios(rule=rule, sparsity=float(s), mode=mode, layers=layers, achieved=min(max(achieved, 0.0), 1.0),
                         nu=nu, clipped=int(np.sum((rho <= lo + 1e-12) | (rho >= hi - 1e-12))),
                         warnings=list(warnings or []), metadata=dict(metadata or {}))


def atp_rho(params: Sequence[float], sparsity: float, step: float, *, min_ratio: float = 0.0,
            max_ratio: float = 0.95) -> np.ndarray:
    """(K,) ratios clip(c + step * k, lo, hi) with sum N rho = s sum N (c solved exactly)."""
    N = np.asarray(params, dtype=np.float64)
    lo, hi, s = float(min_ratio), float(max_ratio), float(sparsity)
    if N.ndim != 1 or N.size == 0 or not np.all(np.isfinite(N)) or np.any(N < 1):
        raise LayercapError("atp: params must be a non-empty list of prunable weight counts >= 1 (one per block).")
    if not math.isfinite(step):
        raise LayercapError(f"atp: step = {step!r} must be a finite number (ratio added per block of depth).")
    if not (0.0 <= lo <= s <= hi <= 1.0):
        raise LayercapError(f"atp: need 0 <= min_ratio ({lo}) <= sparsity ({s}) <= max_ratio ({hi}) <= 1.")
    b = step * np.arange(N.size, dtype=np.float64)
    ones = np.ones_like(N)
    target = s * float(N.sum())
    lo_v, hi_v = np.full(N.shape, lo), np.full(N.shape, hi)
    c = clipped_linear_root(ones, b, lo_v, hi_v, N, target, side="left")
    c = polish_root(c, ones, b, lo_v, hi_v, N, target)
    if not math.isfinite(c):  # every block at one bound: only when s is lo or hi
        return np.full(N.shape, s)
    return np.clip(c + b, lo, hi)


def atp_ratios(names: Sequence[str], params: Sequence[int], sparsity: float, step: float, *,
               min_ratio: float = 0.0, max_ratio: float = 0.95) -> PruningRatios:
    """The ``atp`` rule at a given ``step`` (see module docstring)."""
    if len(names) != len(params):
        raise LayercapError("atp: give one params count per block name.")
    N = np.asarray(params, dtype=np.int64)
    rho = atp_rho(N, sparsity, step, min_ratio=min_ratio, max_ratio=max_ratio)
    return _record("atp", names, N, rho, sparsity, min_ratio, max_ratio,
                   metadata={"step": float(step), "min_ratio": float(min_ratio), "max_ratio": float(max_ratio)})


def mdl_paper_ratios(scores: LayerScores, sparsity: float, *, margin: float = PAPER_MARGIN, min_ratio: float = 0.0,
                     max_ratio: float = 0.95, eta: float = 1.0, p: float = 2.0) -> PruningRatios:
    """The paper's protocol: zeta^2 program, ratios capped at sparsity + ``margin`` (see module doc)."""
    if not (math.isfinite(margin) and margin >= 0):
        raise LayercapError(f"mdl-paper: margin = {margin!r} must be >= 0 (the paper used 0.01 .. 0.05).")
    s = float(sparsity)
    hi = min(float(max_ratio), s + float(margin))
    sol = pruning_ratios(scores.zeta2, scores.params, s, mode="exact", eta=eta, p=p, min_ratio=min_ratio, max_ratio=hi)
    warnings = list(sol.warnings)
    if scores.method in ("alpha-hill", "owl"):
        warnings.append(f"mdl-paper expects curvature scores (zeta^2) but the scores file holds {scores.method!r} values.")
    return _record("mdl-paper", scores.names, scores.params, sol.rho, s, min_ratio, hi, nu=sol.nu, mode="exact",
                   warnings=warnings, metadata={"margin": float(margin), "cap": hi, "min_ratio": float(min_ratio),
                                                "eta": eta, "p": p, "objective": sol.objective,
                                                "scores_method": scores.method})
