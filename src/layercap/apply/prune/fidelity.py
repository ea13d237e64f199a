"""How close a pruned model stays to its dense original on calibration windows.

The searches' fitness (:mod:`layercap.apply.prune.search`) is cheap because it prunes every
block from *dense* block inputs. This is the expensive, faithful version: the model pruned the
way it will be used (sequentially, each block's mask from the already-pruned prefix), compared
with the dense model on the same windows. ``benchmarks/fitness_check.py`` found it ranks Wanda
configurations at 70 % as held-out perplexity does (one swap in five), where the dense-input
fitness does not; the pruning sweep uses it to choose among its own rules without evaluation
data (``Comparison.standings``: layercap's pick).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from layercap.apply.prune.damage import _kl_nll, _log_probs
from layercap.data.calibration import CalibrationSet
from layercap.errors import LayercapError


@dataclass(frozen=True)
class Fidelity:
    """``kl``: mean KL(p_dense || p_pruned) per predicted token (nats); ``nll`` / ``dense_nll``:
    mean next-token NLL of the pruned / dense model (nats per token); ``tokens``: predicted
    positions summed over; ``windows``: calibration windows read."""

    kl: float
    nll: float
    dense_nll: float
    tokens: int
    windows: int

    def to_dict(self) -> dict:
        return {"kl": self.kl, "nll": self.nll, "dense_nll": self.dense_nll, "tokens": self.tokens, "windows": self.windows}

    @classmethod
    def from_dict(cls, d: dict, source: str = "fidelity") -> "Fidelity":
        try:
            out = cls(float(d["kl"]), float(d["nll"]), float(d["dense_nll"]), int(d["tokens"]), int(d["windows"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise LayercapError(f"{source}: needs finite kl, nll, dense_nll and integer tokens, windows ({exc}).") from exc
        if not all(math.isfinite(v) for v in (out.kl, out.nll, out.dense_nll)) or out.kl < -1e-6 or out.tokens < 1:
            raise LayercapError(f"{source}: kl {out.kl}, nll {out.nll}, dense_nll {out.dense_nll} must be finite, "
                                f"kl >= 0, tokens >= 1; recompute it.")
        return out


@torch.no_grad()
def calibration_fidelity(dense: nn.Module, pruned: nn.Module, calib: CalibrationSet, batch_size: int = 8) -> Fidelity:
    """:class:`Fidelity` of ``pruned`` against ``dense`` on every window of ``calib``
    ((n, T) token ids): both models run batch by batch, so only one batch of (B, T - 1, V)
    log-probabilities is held at a time."""
    if batch_size < 1:
        raise LayercapError(f"batch_size must be >= 1, got {batch_size}.")
    ids = calib.input_ids
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise LayercapError("calibration windows must be (n, T) token ids with T >= 2.")
    kl = nll = dense_nll = 0.0
    modes = dense.training, pruned.training
    dense.eval(), pruned.eval()
    try:
        for batch in ids.split(batch_size):
            p = _log_probs(dense(input_ids=batch.to(_device(dense))).logits)
            q = _log_probs(pruned(input_ids=batch.to(_device(pruned))).logits).to(p.device)
            labels = batch[:, 1:].to(p.device)
            a, b = _kl_nll(p, q, labels)
            kl, nll = kl + a, nll + b
            dense_nll += _kl_nll(p, p, labels)[1]
    finally:
        dense.train(modes[0]), pruned.train(modes[1])
    tokens = int(ids.shape[0] * (ids.shape[1] - 1))
    return Fidelity(kl / tokens, nll / tokens, dense_nll / tokens, tokens, int(ids.shape[0]))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
