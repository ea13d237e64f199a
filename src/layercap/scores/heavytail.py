"""Heavy-tail exponent of weight spectra (AlphaPruning / AlphaLoRA baseline score source).

For a weight matrix W (out x in) the empirical spectral density is the set of eigenvalues of
W^T W, i.e. the squared singular values (AlphaPruning takes ``torch.linalg.svdvals`` in float32;
we take the eigenvalues of the smaller Gram matrix in float64, see :func:`esd`). Its upper tail is fitted with a power law p(x) ~ x^-alpha for x >= xmin by the
continuous Hill / maximum-likelihood estimator

    alpha = 1 + n / sum_{i: lambda_i >= xmin} log(lambda_i / xmin),     n = #{lambda_i >= xmin}.

A smaller alpha (heavier tail) marks a better-trained layer in the heavy-tailed
self-regularisation theory; AlphaPruning prunes high-alpha blocks harder and AlphaLoRA gives
them more experts.

How xmin is chosen matches ``net_esd_estimator`` of the AlphaPruning release
(haiquanlu/AlphaPruning, lib/esd_utils.py; the same code as TempBalance/WeightWatcher's
"fix fingers"), re-implemented here without copying:

* ``"xmin_mid"``: xmin is the eigenvalue at index N // 2 of the ascending spectrum (the upper half
  is the tail); no search.
* ``"xmin_peak"`` (what AlphaPruning's released scripts use: ``--ww_metric alpha_peak``): a
  100-bin histogram of log10(lambda); xmin2 = 10 ** (left edge of the fullest bin). Every
  eigenvalue in the candidate window is tried as xmin and the one with the smallest
  Kolmogorov-Smirnov distance D = max_j |1 - (lambda_j / xmin)^(1 - alpha) - j / n| wins. The
  released code bounds the window below by ``log10(0.95 * xmin2)`` (a log value compared with
  linear eigenvalues) and above by ``1.5 * xmin2``; we keep that behaviour so that scores match
  the published ratios, although the lower bound is in effect much looser than 0.95 * xmin2.
* ``None``: every eigenvalue but the largest is a candidate (WeightWatcher's plain KS search).

Per block the score is the mean of its matrices' alphas (AlphaPruning's ``mapping_type
block_wise``). Units: alpha is dimensionless; typical trained LLM layers give 2..8.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from layercap.errors import LayercapError
from layercap.io import atomic_write_json
from layercap.models import linear_weight

SCHEMA = "layercap.heavytail/v1"
FIX_FINGERS = ("xmin_peak", "xmin_mid", None)
EVALS_THRESH = 1e-5  # AlphaPruning's threshold for "near-zero" eigenvalues (filter_zeros=True)
_CHUNK = 256  # xmin candidates evaluated at once (bounds memory at ~_CHUNK * N floats)


@dataclass(frozen=True)
class HillFit:
    """Power-law fit of one spectrum: exponent ``alpha``, tail start ``xmin`` (eigenvalue units),
    KS distance ``D`` of the fit, ``n_tail`` eigenvalues in the tail, ``n`` eigenvalues in all."""

    alpha: float
    xmin: float
    D: float
    n_tail: int
    n: int


def esd(weight: torch.Tensor) -> np.ndarray:
    """Eigenvalues of W^T W (squared singular values), ascending, float64 array of length min(out, in).

    Computed as eigvalsh of the smaller Gram matrix in float64 rather than AlphaPruning's float32
    ``svdvals``: same eigenvalues (more accurate, if anything) and 5-20x faster on CPU, where
    ``svdvals`` of a 1536 x 576 matrix takes seconds.
    """
    with torch.no_grad():
        w = weight.detach().to(device="cpu", dtype=torch.float64)
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        e = np.linalg.eigvalsh(gram.numpy())
    return np.sort(np.clip(e, 0.0, None))


def _ks_distances(eigs: np.ndarray, cands: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """KS distance of the power-law fit for each candidate start index (vectorised by chunks)."""
    N = eigs.size
    out = np.ones(cands.size)
    for lo in range(0, cands.size, _CHUNK):
        idx = cands[lo : lo + _CHUNK]
        a = alphas[lo : lo + _CHUNK]
        j = np.arange(N)[None, :]  # offset inside the tail
        pos = idx[:, None] + j
        valid = pos < N
        n = (N - idx)[:, None].astype(np.float64)
        ratio = np.where(valid, eigs[np.minimum(pos, N - 1)] / eigs[idx][:, None], 1.0)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            dev = np.abs(1.0 - ratio ** (1.0 - a[:, None]) - j / n)
        dev = np.where(valid, dev, 0.0)
        out[lo : lo + _CHUNK] = dev.max(axis=1)
    return out


def pl_alpha_hill(
    eigs: Sequence[float] | np.ndarray | torch.Tensor,
    fix_fingers: str | None = "xmin_peak",
    bins: int = 100,
    xmin_pos: int = 2,
    filter_zeros: bool = False,
) -> HillFit:
    """PL_Alpha_Hill of a spectrum (any order; non-positive eigenvalues are dropped since
    log(0) is undefined). See the module docstring for the xmin rules."""
    if fix_fingers not in FIX_FINGERS:
        raise LayercapError(f"fix_fingers={fix_fingers!r}: choose one of {FIX_FINGERS}.")
    e = np.asarray(eigs.detach().cpu().numpy() if isinstance(eigs, torch.Tensor) else eigs, dtype=np.float64)
    e = np.sort(e[np.isfinite(e) & (e > 0)])
    if filter_zeros and (e > EVALS_THRESH).any():
        e = e[e > EVALS_THRESH]
    N = e.size
    if N < 2:
        raise LayercapError(
            f"a power-law fit needs at least 2 positive eigenvalues, got {N}; the matrix is (nearly) zero or 1-wide."
        )
    log_e = np.log(e)
    # suffix sums: tail_sum[i] = sum(log_e[i:])
    tail_sum = np.cumsum(log_e[::-1])[::-1]

    def alpha_at(i: np.ndarray) -> np.ndarray:
        n = (N - i).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 + n / (tail_sum[i] - n * log_e[i])

    if fix_fingers == "xmin_mid":
        i = np.array([N // xmin_pos])
        alpha = alpha_at(i)
        D = _ks_distances(e, i, alpha)
        return HillFit(float(alpha[0]), float(e[i[0]]), float(D[0]), int(N - i[0]), N)

    cands = np.arange(N - 1)
    if fix_fingers == "xmin_peak":
        log10_e = np.log10(e)
        counts, edges = np.histogram(log10_e, bins=bins, range=(log10_e.min(), log10_e.max()))
        xmin2 = 10.0 ** edges[int(np.argmax(counts))]
        lower = math.log10(0.95 * xmin2)  # sic: AlphaPruning compares this log value with eigenvalues
        upper = 1.5 * xmin2
        cands = cands[(e[:-1] >= lower) & (e[:-1] <= upper)]
    alphas = alpha_at(cands) if cands.size else np.empty(0)
    ok = np.isfinite(alphas) & (alphas > 1.0)
    if not ok.any():
        # degenerate window (e.g. a flat spectrum): fall back to the half-spectrum tail
        return pl_alpha_hill(e, "xmin_mid", bins, xmin_pos)
    cands, alphas = cands[ok], alphas[ok]
    D = _ks_distances(e, cands, alphas)
    best = int(np.argmin(D))  # first minimum, as torch.argmin in the reference
    i = int(cands[best])
    return HillFit(float(alphas[best]), float(e[i]), float(D[best]), int(N - i), N)


def matrix_alpha(module_or_weight: nn.Module | torch.Tensor, **fit_kwargs) -> HillFit:
    """Hill fit of one Linear/Conv1D module (or an (out, in) weight tensor)."""
    weight = module_or_weight if isinstance(module_or_weight, torch.Tensor) else linear_weight(module_or_weight)
    return pl_alpha_hill(esd(weight), **fit_kwargs)


@dataclass
class HeavyTailScores:
    """Per-group mean alpha plus the per-matrix fits behind it (JSON round-trip)."""

    groups: list[str]
    alpha: list[float]  # (K,) mean over the group's matrices
    matrices: dict[str, list[dict[str, Any]]]  # group -> [{"name", **HillFit}]
    fix_fingers: str | None = "xmin_peak"
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeavyTailScores":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not a {SCHEMA} record (schema={d.get('schema')!r}).")
        return cls(d["groups"], [float(a) for a in d["alpha"]], d["matrices"], d.get("fix_fingers"), SCHEMA)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "HeavyTailScores":
        from layercap.io import read_json

        return cls.from_dict(read_json(path, "heavy-tail scores file"))


def group_linears(group) -> dict[str, nn.Module]:
    """The Linear/Conv1D modules of a group (a ``Block``, a ``ParamGroup`` or a plain dict), by name.

    Raises LayercapError when there are none (embeddings or norms alone have no spectrum).
    """
    linears = getattr(group, "linears", None)
    if isinstance(group, dict):
        linears = group
    if not linears:
        name = getattr(group, "name", "?")
        raise LayercapError(
            f"group {name!r} has no Linear modules; spectrum-based scores (alpha-hill) and OWL need "
            "weight matrices. Use --granularity block or linear, or a --groups regex that selects Linears."
        )
    return linears


def heavytail_scores(
    groups: Iterable, fix_fingers: str | None = "xmin_peak", progress: bool = False, **fit_kwargs
) -> HeavyTailScores:
    """Mean PL_Alpha_Hill per group. ``groups``: objects with ``.name`` and ``.linears``
    (``layercap.models.Block`` or the scoring engine's ``ParamGroup``)."""
    from tqdm.auto import tqdm

    groups = list(groups)
    names, alphas, per = [], [], {}
    for group in tqdm(groups, desc="alpha-hill", unit="group", disable=not progress):
        name = getattr(group, "name", str(len(names)))
        fits = []
        for lname, module in group_linears(group).items():
            fit = matrix_alpha(module, fix_fingers=fix_fingers, **fit_kwargs)
            fits.append({"name": lname, **asdict(fit)})
        names.append(name)
        alphas.append(float(np.mean([f["alpha"] for f in fits])))
        per[name] = fits
    return HeavyTailScores(names, alphas, per, fix_fingers)


def alpha_hill_method(model, groups, calib, options) -> np.ndarray:
    """Registry adapter (``alpha-hill``; needs no data): (K,) float64 mean alpha per group.

    ``options.extra``: ``fix_fingers`` ("xmin_peak" default, "xmin_mid", None), ``bins`` (100),
    ``filter_zeros`` (False).
    """
    extra = dict(getattr(options, "extra", None) or {})
    fit_kwargs = {k: extra[k] for k in ("bins", "filter_zeros", "xmin_pos") if k in extra}
    result = heavytail_scores(
        groups, fix_fingers=extra.get("fix_fingers", "xmin_peak"), progress=bool(getattr(options, "progress", False)), **fit_kwargs
    )
    info = {"source": "PL_Alpha_Hill (AlphaPruning net_esd_estimator)", "fix_fingers": result.fix_fingers,
            "per_matrix_alpha": {g: [round(f["alpha"], 6) for f in fits] for g, fits in result.matrices.items()}}
    return np.asarray(result.alpha, dtype=np.float64), info


def _register() -> None:
    from layercap.scores.registry import register

    register("alpha-hill", alpha_hill_method, needs_data=False,
             description="AlphaPruning/AlphaLoRA heavy-tail exponent (PL_Alpha_Hill), mean over the group's matrices")


_register()
