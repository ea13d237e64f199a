"""``PruningReport``: what a pruning run did (schema ``layercap.pruning/v1``).

Per module: requested ratio, weight count, pruned count (the mask), zeros after pruning (the
mask plus any weight that was already exactly zero). Per block and overall: the same, summed.
``achieved = pruned / numel``. Written as ``pruning.json`` beside a pruned checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layercap.apply.prune.pruners import PRUNERS
from layercap.errors import LayercapError
from layercap.io import atomic_write_json, read_json

PRUNING_SCHEMA = "layercap.pruning/v1"
METHODS = tuple(PRUNERS)  # the registered pruners (layercap.apply.prune.pruners)


@dataclass(frozen=True)
class ModuleSparsity:
    """One Linear: ``name`` is its full module name, ``block`` the block it belongs to."""

    name: str
    block: str
    ratio: float
    numel: int
    pruned: int
    zeros: int

    @property
    def achieved(self) -> float:
        return self.pruned / self.numel

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "block": self.block, "ratio": float(self.ratio), "numel": int(self.numel),
                "pruned": int(self.pruned), "zeros": int(self.zeros), "achieved": self.achieved}


@dataclass(frozen=True)
class BlockSparsity:
    """One block: ``ratio`` is the requested sparsity (weighted by module size)."""

    name: str
    ratio: float
    numel: int
    pruned: int

    @property
    def achieved(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ratio": float(self.ratio), "numel": int(self.numel),
                "pruned": int(self.pruned), "achieved": self.achieved}


def summarise_blocks(modules: list[ModuleSparsity]) -> list[BlockSparsity]:
    """Blocks in first-seen order, each with its modules' totals."""
    order: dict[str, list[ModuleSparsity]] = {}
    for m in modules:
        order.setdefault(m.block, []).append(m)
    out = []
    for name, ms in order.items():
        numel = sum(m.numel for m in ms)
        out.append(BlockSparsity(name, sum(m.ratio * m.numel for m in ms) / numel, numel, sum(m.pruned for m in ms)))
    return out


@dataclass
class PruningReport:
    """A pruning run. ``calibration`` is None for magnitude (no data), else
    ``{"sha256", "source", "nsamples", "seqlen", "seed", "tokens"}``. ``wall_time_s`` in seconds."""

    method: str
    structure: str
    modules: list[ModuleSparsity]
    calibration: dict[str, Any] | None = None
    wall_time_s: float = 0.0
    device: str = "cpu"
    model: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> list[BlockSparsity]:
        return summarise_blocks(self.modules)

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.modules)

    @property
    def pruned(self) -> int:
        return sum(m.pruned for m in self.modules)

    @property
    def requested(self) -> float:
        """Requested overall sparsity (module ratios weighted by size)."""
        return sum(m.ratio * m.numel for m in self.modules) / self.numel if self.numel else 0.0

    @property
    def achieved(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0

    def block_ratios(self) -> dict[str, float]:
        """Achieved sparsity per block."""
        return {b.name: b.achieved for b in self.blocks}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PRUNING_SCHEMA,
            "method": self.method,
            "structure": self.structure,
            "overall": {"requested": self.requested, "achieved": self.achieved, "numel": self.numel, "pruned": self.pruned},
            "blocks": [b.to_dict() for b in self.blocks],
            "modules": [m.to_dict() for m in self.modules],
            "calibration": self.calibration,
            "wall_time_s": float(self.wall_time_s),
            "device": self.device,
            "model": self.model,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, doc: Any, source: str = "pruning report") -> "PruningReport":
        """Validate and rebuild; ``blocks`` and ``overall`` are derived, so they are recomputed."""
        if not isinstance(doc, dict) or doc.get("schema") != PRUNING_SCHEMA:
            got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise LayercapError(f"{source}: 'schema' is {got!r}; expected {PRUNING_SCHEMA!r} (a pruning.json from `layercap prune`).")
        if doc.get("method") not in METHODS:
            raise LayercapError(f"{source}: 'method' = {doc.get('method')!r} must be one of {', '.join(METHODS)}.")
        if not isinstance(doc.get("structure"), str):
            raise LayercapError(f"{source}: 'structure' must be a string such as 'unstructured' or '2:4'.")
        items = doc.get("modules")
        if not isinstance(items, list):
            raise LayercapError(f"{source}: 'modules' must be a list of per-module records.")
        modules = []
        for i, item in enumerate(items):
            where = f"{source}: modules[{i}]"
            try:
                m = ModuleSparsity(str(item["name"]), str(item["block"]), float(item["ratio"]), int(item["numel"]),
                                   int(item["pruned"]), int(item["zeros"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise LayercapError(f"{where}: needs name, block, ratio, numel, pruned, zeros ({exc}).") from exc
            if m.numel < 1 or not 0 <= m.pruned <= m.zeros <= m.numel or not (math.isfinite(m.ratio) and 0 <= m.ratio < 1):
                raise LayercapError(f"{where}: need numel >= 1, 0 <= pruned <= zeros <= numel and 0 <= ratio < 1.")
            modules.append(m)
        calibration = doc.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise LayercapError(f"{source}: 'calibration' must be an object or null.")
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise LayercapError(f"{source}: 'metadata' must be an object.")
        return cls(method=doc["method"], structure=doc["structure"], modules=modules, calibration=calibration,
                   wall_time_s=float(doc.get("wall_time_s", 0.0)), device=str(doc.get("device", "cpu")),
                   model=str(doc.get("model", "")), metadata=metadata)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "PruningReport":
        doc = read_json(path, "pruning report", "`layercap prune ... -o DIR` writes DIR/pruning.json.")
        return cls.from_dict(doc, str(path))

    def table(self) -> str:
        """A readable per-block table (requested vs achieved sparsity)."""
        lines = [f"{'block':<28} {'weights':>12} {'requested':>10} {'achieved':>10}"]
        for b in self.blocks:
            lines.append(f"{b.name:<28} {b.numel:>12,d} {b.ratio:>10.4f} {b.achieved:>10.4f}")
        lines.append(f"{'overall':<28} {self.numel:>12,d} {self.requested:>10.4f} {self.achieved:>10.4f}")
        return "\n".join(lines)
