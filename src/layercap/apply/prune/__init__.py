"""Pruning at per-layer ratios: magnitude, Wanda, SparseGPT; unstructured or N:M (SPEC section 5).

- masks:      scores (|W|, |W|*||x||) and exact-ratio mask selection (layer-wise, per row, N:M)
- sparsegpt:  blocked OBS pruning of one weight matrix with weight reconstruction
- stats:      float32 running input statistics of a Linear (hooks)
- pruners:    the pruner registry (magnitude, wanda, sparsegpt)
- plan:       user ratios (per block / per module) -> one ratio per Linear, validated
- sequential: ``prune_model``, block-by-block calibrated pruning of a whole model
- report:     ``PruningReport`` (schema ``layercap.pruning/v1``)
- fidelity:   a pruned model's KL to its dense original on calibration windows
"""

from layercap.apply.prune.masks import (
    STRUCTURES,
    exact_count,
    magnitude_scores,
    nm_mask,
    parse_structure,
    rowwise_mask,
    select_mask,
    smallest_k_mask,
    wanda_scores,
)
from layercap.apply.prune.fidelity import Fidelity, calibration_fidelity
from layercap.apply.prune.plan import check_ratio_values, module_ratios
from layercap.apply.prune.pruners import PRUNERS, Pruner, get_pruner, register_pruner
from layercap.apply.prune.report import METHODS, PRUNING_SCHEMA, BlockSparsity, ModuleSparsity, PruningReport
from layercap.apply.prune.sequential import BlockCall, capture_block_calls, prune_linear, prune_model
from layercap.apply.prune.sparsegpt import hessian_factor, sparsegpt_prune
from layercap.apply.prune.stats import InputStats, attach_input_stats

__all__ = [
    "STRUCTURES", "METHODS", "PRUNING_SCHEMA", "PRUNERS", "Pruner", "get_pruner", "register_pruner",
    "exact_count", "magnitude_scores", "wanda_scores", "smallest_k_mask", "rowwise_mask", "nm_mask", "select_mask",
    "parse_structure", "check_ratio_values", "module_ratios",
    "sparsegpt_prune", "hessian_factor", "InputStats", "attach_input_stats",
    "BlockCall", "capture_block_calls", "prune_linear", "prune_model",
    "PruningReport", "ModuleSparsity", "BlockSparsity", "Fidelity", "calibration_fidelity",
]
