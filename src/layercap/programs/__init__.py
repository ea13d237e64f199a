"""The convex programs (numpy/scipy only; never import torch here).

- records:    Allocation, PruningRatios, TransferResult (JSON round-trip, validated on load)
- allocation: continuous water-filling allocation (SPEC section 2)
- integer:    integer allocation (greedy threshold, gap certificate)
- pruning:    pruning ratios, modes "exact" and "at-least" (SPEC section 3)
- transfer:   regret and the Theorem-4 bound (SPEC section 4)
- rules:      the MDL programs and the baseline rules on the same budget (SPEC section 5)
- damage:     measured convex damage curves and the pruning program on them (mdl:damage, mdl:obd)
- utility:    measured concave utility curves and the allocation program on them (mdl:measured)
"""

from layercap.programs.allocation import WaterFilling, water_fill
from layercap.programs.integer import IntegerAllocation, allocate_integer
from layercap.programs.pruning import RatioSolution, pruning_ratios
from layercap.programs.records import (
    ALLOCATION_SCHEMA,
    RATIOS_SCHEMA,
    TRANSFER_SCHEMA,
    AllocatedLayer,
    Allocation,
    PruningRatios,
    RatioLayer,
    TransferLayer,
    TransferResult,
)
from layercap.programs.rules import ALLOCATION_RULES, PRUNING_RULES, allocation_by_rule, ratios_by_rule
from layercap.programs.transfer import allocation_regret, pruning_regret, transfer

__all__ = [
    "ALLOCATION_SCHEMA", "RATIOS_SCHEMA", "TRANSFER_SCHEMA", "ALLOCATION_RULES", "PRUNING_RULES",
    "AllocatedLayer", "Allocation", "PruningRatios", "RatioLayer", "TransferLayer", "TransferResult",
    "WaterFilling", "IntegerAllocation", "RatioSolution",
    "water_fill", "allocate_integer", "pruning_ratios", "allocation_by_rule", "ratios_by_rule",
    "allocation_regret", "pruning_regret", "transfer",
]
