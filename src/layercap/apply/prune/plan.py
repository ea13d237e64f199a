"""Turn user ratios (per block, optionally per module) into one ratio per Linear module.

Keys of ``ratios`` are block names (``model.layers.3``: the ratio of every Linear in the block)
or full module names (``model.layers.3.mlp.down_proj``: overrides the block's ratio for that
module). Blocks not named are left dense (ratio 0). Every check happens here, before any
weight is touched.
"""

from __future__ import annotations

import math
from typing import Mapping

from layercap.apply.prune.masks import check_nm_ratio, parse_structure
from layercap.errors import LayercapError
from layercap.models import Block, linear_weight


def check_ratio_values(ratios: Mapping[str, float], structure: str = "unstructured") -> None:
    """Values finite in [0, 1), and equal to N/M (or 0) for N:M. Needs no model."""
    if not ratios:
        raise LayercapError("no pruning ratios given: pass --sparsity S or a --ratios file with at least one layer.")
    nm = parse_structure(structure)
    for name, ratio in ratios.items():
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 <= ratio < 1:
            raise LayercapError(
                f"ratio for {name!r} is {ratio!r}; ratios must be numbers in [0, 1) (1 would remove every weight of "
                "the layer). Cap them when computing them, e.g. `layercap prune-ratios SCORES --sparsity 0.5 --max-ratio 0.9`."
            )
        if nm is not None:
            check_nm_ratio(float(ratio), nm, name)


def module_ratios(blocks: list[Block], ratios: Mapping[str, float], structure: str = "unstructured") -> dict[str, float]:
    """Full module name -> ratio for every Linear of ``blocks`` (0 where nothing was asked)."""
    check_ratio_values(ratios, structure)
    by_block = {b.name: b for b in blocks}
    modules = {f"{b.name}.{rel}": (b, rel) for b in blocks for rel in b.linears}
    unknown = [k for k in ratios if k not in by_block and k not in modules]
    if unknown:
        raise LayercapError(
            f"ratios name {len(unknown)} layer(s) this model lacks, e.g. {unknown[:3]}; the model's blocks are "
            f"{blocks[0].name} ... {blocks[-1].name} ({len(blocks)} blocks). Were the ratios computed for another model "
            "(or with other --blocks / --modules)?"
        )
    out = {}
    nm = parse_structure(structure)
    for full, (block, rel) in modules.items():
        ratio = float(ratios.get(full, ratios.get(block.name, 0.0)))
        if nm is not None and ratio > 0 and linear_weight(block.linears[rel]).shape[1] % nm[1]:
            raise LayercapError(
                f"{full} has {linear_weight(block.linears[rel]).shape[1]} input features, not a multiple of {nm[1]}: "
                f"{structure} sparsity is impossible there; exclude it with --modules or use --structure unstructured."
            )
        out[full] = ratio
    return out
