"""The pruner registry: name -> how one weight matrix is pruned at a ratio.

A pruner is ``prune(weight, ratio, nm, stats, factor, blocksize, percdamp) -> (new_weight | None, mask)``:
``weight`` (out, in) float tensor, ``mask`` bool (out, in) with True on the removed entries;
``new_weight`` is the reconstructed matrix (SparseGPT) or None when the surviving weights keep
their values. ``needs_data``: the pruner reads calibration inputs (``stats``: running input
statistics, :mod:`layercap.apply.prune.stats`); ``needs_hessian``: it needs their Gram matrix
(and shares one inverse-Hessian ``factor`` between Linears fed the same input).

Adding a pruner is one function and one :func:`register_pruner` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from layercap.apply.prune.masks import magnitude_scores, select_mask, wanda_scores
from layercap.apply.prune.sparsegpt import sparsegpt_prune
from layercap.errors import LayercapError


@dataclass(frozen=True)
class Pruner:
    name: str
    prune: Callable[..., tuple]
    needs_data: bool
    needs_hessian: bool = False
    description: str = ""


PRUNERS: dict[str, Pruner] = {}


def register_pruner(name: str, prune: Callable[..., tuple], needs_data: bool, needs_hessian: bool = False,
                    description: str = "") -> Pruner:
    PRUNERS[name] = pruner = Pruner(name, prune, needs_data, needs_hessian, description)
    return pruner


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise LayercapError(f"{name!r} is not a pruner; choose one of {', '.join(PRUNERS)}.")
    return PRUNERS[name]


def _magnitude(weight, ratio, nm, stats, factor, blocksize, percdamp):
    return None, select_mask(magnitude_scores(weight), ratio, nm, per_row=False)


def _wanda(weight, ratio, nm, stats, factor, blocksize, percdamp):
    return None, select_mask(wanda_scores(weight, stats.sq_mean), ratio, nm, per_row=True)


def _sparsegpt(weight, ratio, nm, stats, factor, blocksize, percdamp):
    return sparsegpt_prune(weight, stats.hessian, ratio, nm, blocksize, percdamp, factor)


register_pruner("magnitude", _magnitude, needs_data=False, description="|W|, layer-wise")
register_pruner("wanda", _wanda, needs_data=True, description="|W| * ||x||, per output row")
register_pruner("sparsegpt", _sparsegpt, needs_data=True, needs_hessian=True, description="blocked OBS with reconstruction")
