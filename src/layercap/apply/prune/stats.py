"""Running float32 statistics of a Linear module's inputs, filled by a forward hook.

* ``sq_mean`` (in,): mean over calibration tokens of x_j^2 (Wanda's ||x_j||^2 up to a constant);
* ``hessian`` (in, in): mean over calibration tokens of x x^T (SparseGPT's H up to the
  reference's constant factor 2, which changes neither the damping ratio nor the update).

Running means (not sums) keep float32 well scaled however many tokens are seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class InputStats:
    in_features: int
    device: torch.device
    want_hessian: bool = False
    tokens: int = 0
    sq_mean: torch.Tensor | None = field(default=None, repr=False)
    hessian: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.sq_mean = torch.zeros(self.in_features, dtype=torch.float32, device=self.device)
        if self.want_hessian:
            self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch of inputs ``x`` of shape (..., in_features)."""
        x = x.detach().reshape(-1, self.in_features).to(self.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        total = self.tokens + n
        keep = self.tokens / total
        self.sq_mean.mul_(keep).add_(x.pow(2).sum(0), alpha=1.0 / total)
        if self.hessian is not None:
            self.hessian.mul_(keep).addmm_(x.t(), x, alpha=1.0 / total)
        self.tokens = total


def attach_input_stats(modules: dict[str, nn.Module], in_features: dict[str, int], device: torch.device,
                       want_hessian: bool) -> tuple[dict[str, InputStats], list]:
    """Hook every module so its inputs update an :class:`InputStats`; returns (stats, hook handles)."""
    stats = {name: InputStats(in_features[name], device, want_hessian) for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(_module, inputs, _output, _stats=stats[name]):
            _stats.add(inputs[0])

        handles.append(module.register_forward_hook(hook))
    return stats, handles
