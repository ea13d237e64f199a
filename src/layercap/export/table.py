"""``--format csv|json``: the per-module decision table, for any other tool.

Rows are per module when a model is given (every Linear of every decoder block with its ratio,
or every LoRA-targeted module with its rank), per layer of the record otherwise.

Columns. Ratios: ``name`` (full module name, or the record's layer name without a model),
``block`` (the decoder block it belongs to), ``ratio`` (fraction of the module's weights to
remove, in [0, 1)), ``params`` (weights in the module, or in the layer without a model).
Allocation: ``name``, ``block``, ``n`` (the block's allocated units), ``rank`` (LoRA rank =
rank_unit * n; 0 = not adapted).

The JSON form is ``{"schema": "layercap.export-table/v1", "kind": "ratios"|"ranks",
"source", "source_sha256", "columns", "rows": [{column: value}]}``.
"""

from __future__ import annotations

import os
from pathlib import Path

from layercap.io import atomic_write_csv, atomic_write_json, sha256_file
from layercap.programs.records import Allocation, PruningRatios

TABLE_SCHEMA = "layercap.export-table/v1"


def ratio_rows(ratios: PruningRatios, model=None, structure: str = "unstructured", blocks_regex=None, modules_regex=None) -> list[dict]:
    """One row per Linear of the model (with a model) or per record layer (without)."""
    if model is None:
        return [{"name": l.name, "block": l.name, "ratio": float(l.ratio), "params": int(l.params)} for l in ratios.layers]
    from layercap.apply.prune import module_ratios
    from layercap.models import find_blocks
    from layercap.models.blocks import linear_weight

    blocks = find_blocks(model, blocks_regex, modules_regex)
    per_module = module_ratios(blocks, ratios.ratios(), structure)
    rows = []
    for b in blocks:
        for rel, module in b.linears.items():
            full = f"{b.name}.{rel}"
            rows.append({"name": full, "block": b.name, "ratio": per_module[full], "params": int(linear_weight(module).numel())})
    return rows


def rank_rows(allocation: Allocation, counts: dict[str, int], model=None, rank_unit: int = 8, targets=None,
              alpha_ratio: float = 2.0) -> list[dict]:
    """One row per LoRA-targeted module (with a model; the ranks PEFT is given) or per block."""
    if model is None:
        return [{"name": b, "block": b, "n": n, "rank": rank_unit * n} for b, n in counts.items()]
    from layercap.apply.lora_moe import default_targets, resolve_targets
    from layercap.apply.peft_lora import intended_ranks, lora_config_from_allocation

    config = lora_config_from_allocation(model, counts, rank_unit=rank_unit, targets=targets, alpha_ratio=alpha_ratio)
    ranks = intended_ranks(config)
    per_block = resolve_targets(model, tuple(targets) if targets else default_targets(model))
    return [{"name": full, "block": b, "n": counts[b], "rank": ranks.get(full, 0)} for b, mods in per_block.items() for full in mods]


def write_table(rows: list[dict], output: str | os.PathLike, fmt: str, kind: str, source: str | os.PathLike) -> Path:
    """Write ``rows`` as CSV or JSON (atomically)."""
    columns = list(rows[0]) if rows else []
    if fmt == "csv":
        return atomic_write_csv(output, columns, [[r[c] for c in columns] for r in rows])
    doc = {"schema": TABLE_SCHEMA, "kind": kind, "source": str(source), "source_sha256": sha256_file(source),
           "columns": columns, "rows": rows}
    return atomic_write_json(output, doc)
