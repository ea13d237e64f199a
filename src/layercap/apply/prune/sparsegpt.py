"""SparseGPT for one weight matrix: blocked OBS pruning with weight reconstruction.

Follows the reference algorithm (Frantar & Alistarh 2023, IST-DASLab/sparsegpt ``fasterprune``):

1. H = mean over calibration tokens of x x^T (float32, (in, in)); columns whose input is always
   zero ("dead", H_jj = 0) get H_jj = 1 and their weights are zeroed (they cannot matter).
2. Damping: H += percdamp * mean(diag H) * I (1% by default).
3. U = upper Cholesky factor of H^-1 (so each row of U holds the OBS update coefficients).
4. Columns are processed in blocks of ``blocksize`` (128). Unstructured: at the start of each
   block the mask is chosen over the whole (out, blocksize) slice by the OBS saliency
   w^2 / U_jj^2. N:M: at every M-th column the N smallest saliencies of the next M columns
   of each row. Then, column by column, pruned weights are zeroed and the error
   (w - q) / U_jj is propagated to the remaining columns of the block (rank-1 updates); at the
   end of the block the accumulated errors are applied to all later columns at once (the lazy
   batch update).

Only departure from the reference: exact counts. The reference thresholds each block at
``sort(s)[int(numel * ratio)]`` with ``<=`` (one or more extra weights per block). Here block b
(columns [c0, c1)) prunes exactly ``exact_count(ratio, out*c1) - exact_count(ratio, out*c0)``
weights, which telescopes to ``exact_count(ratio, out*in)`` for the module.
"""

from __future__ import annotations

import torch

from layercap.apply.prune.masks import exact_count, smallest_k_mask
from layercap.errors import LayercapError


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; retries with 10x damping if H is not PD."""
    diag = torch.arange(h.shape[0], device=h.device)
    base = percdamp * torch.mean(torch.diag(h))
    for attempt in range(4):
        damped = h.clone()
        damped[diag, diag] += base * (10.0**attempt)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise LayercapError(
        "SparseGPT: the input Hessian is not positive definite even with 1000x damping "
        "(calibration activations are degenerate); use more --nsamples or --method wanda."
    )


@torch.no_grad()
def hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)`` for a Hessian (in, in): U = upper Cholesky factor of (H + damp I)^-1 after
    setting dead diagonal entries to 1; ``dead`` (bool, (in,)) marks inputs that are always 0.
    Linears fed the same input (q/k/v, gate/up) share it: compute once, pass as ``factor``."""
    H = hessian.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    return _inverse_cholesky(H, percdamp), dead


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    ratio: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) given ``hessian`` (in, in) = E[x x^T].

    Returns ``(new_weight, mask)``: the reconstructed float32 weight with zeros where
    ``mask`` (bool, (out, in)) is True. ``ratio`` in [0, 1); with ``nm = (N, M)`` the ratio is
    N/M by construction and ``blocksize`` must be a multiple of M. ``factor``: a precomputed
    :func:`hessian_factor` of ``hessian`` (``hessian`` is then only shape-checked).
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M = {nm[1]}")
    W = weight.detach().clone().float()
    Hinv, dead = factor if factor is not None else hessian_factor(hessian.to(W.device), percdamp)
    W[:, dead] = 0.0
    mask = torch.zeros_like(W, dtype=torch.bool)
    if ratio == 0:
        return W, mask

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if nm is None:
            k = exact_count(ratio, rows * i2) - exact_count(ratio, rows * i1)
            mask1 = smallest_k_mask(W1**2 / d1.unsqueeze(0) ** 2, k)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        # err_i = (w - q) / d = w * [pruned] / d: one multiply per column
        scale = mask1.float() / d1.unsqueeze(0)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                # saliencies of the next M columns use the already-updated weights (as in the reference)
                s = W1[:, i : i + nm[1]] ** 2 / d1[i : i + nm[1]].unsqueeze(0) ** 2
                order = torch.sort(s, dim=1, stable=True).indices
                mask1.scatter_(1, i + order[:, : nm[0]], True)
                scale[:, i : i + nm[1]] = mask1[:, i : i + nm[1]].float() / d1[i : i + nm[1]].unsqueeze(0)
            err = W1[:, i] * scale[:, i]
            # OBS update of this and the later columns of the block; it turns column i into q
            # (pruned entries to 0 up to rounding, kept entries unchanged since their err is 0)
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i1:i2] = W1.masked_fill_(mask1, 0.0)
        mask[:, i1:i2] = mask1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    return W, mask
