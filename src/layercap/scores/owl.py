"""OWL outlier ratio per block (Outlier Weighed Layerwise sparsity; Yin et al. 2023).

For every Linear W (out x in) of a block the Wanda importance is

    A_ij = |W_ij| * ||X_j||_2                 (X_j: input feature j over all calibration tokens)

and the block's outlier ratio is the share of its entries above M times their mean,

    D = #{A_ij > M * mean(A)} / #A,           M = 5 ("Hyper_m" in OWL).

Aggregation matches OWL's reference code (luuyin/OWL, lib/prune_all.py: ``layer_wmetric`` is
the concatenation of all the block's flattened Wanda metrics, then ``check_outlier_mean``), i.e.
the entries of all Linears are POOLED, not a mean of per-Linear ratios. OWL reports percent; we
return a fraction in [0, 1].

OWL's activation statistics are ``scaler_row = sum_t x_tj^2 / nsamples`` (nsamples = sequences);
the 1/nsamples factor is the same for every Linear of a block and cancels in the ratio, so we use
the plain ``||X_j||_2``. OWL computes activations layer by layer on the dense model, which is the
same as one dense forward pass with hooks.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

from layercap.models import linear_weight
from layercap.scores.heavytail import group_linears

DEFAULT_M = 5.0


def outlier_ratio(scores: torch.Tensor | Iterable[torch.Tensor], m: float = DEFAULT_M) -> float:
    """Fraction of entries strictly greater than ``m`` times the mean of all entries.

    ``scores``: one tensor or several (pooled, as OWL concatenates a block's Linears).
    """
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in parts])
    threshold = flat.mean() * m
    return float((flat > threshold).sum().item() / flat.numel())


def wanda_metric(module: nn.Module, input_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2 broadcast over rows: (out, in) float32. ``input_norm``: (in,) L2 norms."""
    w = linear_weight(module).detach().to(torch.float32)
    return w.abs() * input_norm.to(device=w.device, dtype=torch.float32).reshape(1, -1)


@torch.no_grad()
def input_norms(model: nn.Module, modules: Iterable[nn.Module], calib, batch_size: int = 8,
                device: str | torch.device | None = None, progress: bool = False) -> dict[nn.Module, torch.Tensor]:
    """L2 norm over all calibration tokens of each input feature of each module: {module: (in,) float32}.

    One dense forward pass per micro-batch with forward pre-hooks; sums of squares are
    accumulated in float32 whatever the model dtype.
    """
    from tqdm.auto import tqdm

    modules = list(modules)
    sumsq: dict[nn.Module, torch.Tensor] = {}

    def hook(module, args):
        x = args[0].detach().to(torch.float32)
        s = x.reshape(-1, x.shape[-1]).square().sum(dim=0)
        sumsq[module] = sumsq[module] + s if module in sumsq else s

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        n_batches = -(-calib.input_ids.shape[0] // batch_size)
        for ids in tqdm(calib.batches(batch_size), total=n_batches, desc="owl activations", unit="batch", disable=not progress):
            model(ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {m: sumsq[m].sqrt().cpu() for m in modules}


def owl_scores(model: nn.Module, groups, calib, m: float = DEFAULT_M, batch_size: int = 8,
               device=None, progress: bool = False) -> np.ndarray:
    """(K,) OWL outlier ratio of each group (fraction in [0, 1]), pooled over its Linears."""
    groups = list(groups)
    linears = [group_linears(g) for g in groups]
    norms = input_norms(model, [mod for ls in linears for mod in ls.values()], calib, batch_size, device, progress)
    return np.array(
        [outlier_ratio([wanda_metric(mod, norms[mod]) for mod in ls.values()], m) for ls in linears],
        dtype=np.float64,
    )


def owl_method(model, groups, calib, options) -> np.ndarray:
    """Registry adapter (``owl``; needs data). ``options.extra["hyper_m"]`` overrides M = 5."""
    extra = dict(getattr(options, "extra", None) or {})
    m = float(extra.get("hyper_m", DEFAULT_M))
    ratios = owl_scores(
        model, groups, calib, m=m,
        batch_size=int(getattr(options, "batch_size", 8) or 8),
        device=getattr(options, "device", None),
        progress=bool(getattr(options, "progress", False)),
    )
    return ratios, {"source": "OWL outlier ratio (pooled over the group's Linears)", "hyper_m": m}


def _register() -> None:
    from layercap.scores.registry import register

    register("owl", owl_method, needs_data=True,
             description="OWL outlier ratio: share of |W|*||x|| entries above M=5 times their mean")


_register()
