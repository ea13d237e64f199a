"""Pruning criteria and mask selection at an exact ratio (magnitude, Wanda; unstructured, N:M).

Conventions. A weight is an (out_features, in_features) matrix W (the ``nn.Linear`` layout;
use :func:`layercap.models.linear_weight` for GPT-2 ``Conv1D``). A mask is a bool tensor of
W's shape with True = pruned (set to zero), as in the SparseGPT and Wanda reference code.

Exact counts. ``exact_count(ratio, n) = floor(ratio * n + 1/2)`` weights out of n are pruned
(round half up). Selection takes the k smallest scores (ties to the lowest index, as a stable
sort would; found in O(n) with ``kthvalue``), so ties never change the count (the reference code
thresholds with ``<=``, which can prune more on ties):

* layer-wise (magnitude, SparseGPT): exactly ``exact_count(ratio, out*in)`` per module;
* per output row (Wanda): exactly ``exact_count(ratio, in)`` in every row, so the module's
  sparsity is ``out * exact_count(ratio, in) / (out*in)``, within ``1/(2*in)`` of ``ratio``;
* N:M: exactly N of every M consecutive input weights of every row (ratio must be N/M).
"""

from __future__ import annotations

import math

import torch

from layercap.errors import LayercapError

STRUCTURES = ("unstructured", "2:4", "4:8")


def parse_structure(structure: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M."""
    if structure == "unstructured":
        return None
    try:
        n_str, m_str = structure.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        n = m = 0
    if not (0 < n < m):
        raise LayercapError(f"--structure {structure!r} is not valid; use 'unstructured' or N:M such as {', '.join(STRUCTURES[1:])}.")
    return n, m


def exact_count(ratio: float, n: int) -> int:
    """Number of weights pruned out of ``n`` at ``ratio``: round half up, exact for ratio*n integral."""
    # the 1e-9 guards against 0.5 * 6 = 2.9999999 style float error before flooring
    return int(math.floor(ratio * n + 0.5 + 1e-9))


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32; shape (out, in)."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_sq_mean: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||x_j||_2 (float32, shape (out, in)).

    ``input_sq_mean``: shape (in,), the mean over calibration tokens of x_j^2. The reference
    divides the squared norm by the number of sequences instead of tokens; a constant factor
    per module, so the per-row ranking (and the mask) is the same.
    """
    if input_sq_mean.shape != (weight.shape[1],):
        raise ValueError(f"input norms have shape {tuple(input_sq_mean.shape)}, expected ({weight.shape[1]},)")
    return weight.detach().abs().float() * input_sq_mean.to(weight.device, torch.float32).sqrt().unsqueeze(0)


def _k_smallest_along_last(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` smallest entries along the last dim; ties go to the lowest index.

    Same mask as a stable sort, in O(n): the k-th smallest value is found by selection
    (``kthvalue``), everything below it is taken, and the remaining slots are filled with the
    first entries equal to it.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    below = scores < threshold
    missing = k - below.sum(-1, keepdim=True)
    at = scores == threshold
    return below | (at & (at.cumsum(-1) <= missing))


def smallest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` smallest entries of ``scores`` (any shape; ties go to the lowest flat index)."""
    return _k_smallest_along_last(scores.reshape(-1), k).reshape(scores.shape)


def rowwise_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """True at the ``exact_count(ratio, in)`` smallest entries of every row of (out, in) ``scores``."""
    return _k_smallest_along_last(scores, exact_count(ratio, scores.shape[1]))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the ``n`` smallest of every ``m`` consecutive entries of each row of (out, in) ``scores``."""
    rows, cols = scores.shape
    if cols % m:
        raise LayercapError(f"N:M sparsity {n}:{m} needs in_features divisible by {m}; this module has {cols}. Use --structure unstructured.")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[:, :, :n], True)
    return mask.reshape(rows, cols)


def select_mask(scores: torch.Tensor, ratio: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """The pruning mask of (out, in) ``scores`` at ``ratio``: N:M if ``nm``, else per row or layer-wise."""
    if nm is not None:
        if ratio == 0:
            return torch.zeros_like(scores, dtype=torch.bool)
        return nm_mask(scores, *nm)
    if per_row:
        return rowwise_mask(scores, ratio)
    return smallest_k_mask(scores, exact_count(ratio, scores.numel()))


def check_nm_ratio(ratio: float, nm: tuple[int, int], where: str) -> None:
    """N:M fixes the ratio at N/M: anything else (bar 0 = leave dense) is an error."""
    n, m = nm
    if ratio != 0 and abs(ratio - n / m) > 1e-9:
        raise LayercapError(
            f"{where}: ratio {ratio:g} is incompatible with {n}:{m} sparsity, which prunes exactly {n / m:g}; "
            f"use --sparsity {n / m:g} (or ratio 0 to leave it dense), or --structure unstructured for per-layer ratios."
        )
