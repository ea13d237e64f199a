"""Typed result records of the programs: allocations, pruning ratios, transfer regret.

Each record round-trips through JSON (``to_dict`` / ``from_dict`` / ``save`` / ``load``) with a
``"schema": "layercap.<thing>/v1"`` field, and is validated on load: a malformed file raises
LayercapError naming the field and the fix. ``save`` writes JSON, or CSV for a ``.csv`` path
(per-layer table only; CSV is an export, JSON is the record that ``load`` reads back).

Schemas (documented in README, section "schemas")::

    layercap.allocation/v1
      {"schema", "rule", "budget", "unit": "experts"|"rank"|"units", "integer": bool,
       "layers": [{"name", "n", "q"?, "cost"}], "mu", "binds", "spent", "gap"?, "metadata": {}}

    layercap.ratios/v1
      {"schema", "rule", "sparsity", "mode": "exact"|"at-least"|"rule",
       "layers": [{"name", "ratio", "params"}], "achieved", "nu", "clipped",
       "warnings": [], "metadata": {}}

    layercap.transfer/v1
      {"schema", "program": "allocation"|"pruning", "regret", "bound", "bound_holds",
       "assumptions_hold", "assumption_notes": [], "constants": {"m", "L", "L_q"},
       "q_distance2", "objective_source", "objective_target",
       "layers": [{"name", "q_source", "q_target", "x_source", "x_target"}], "metadata": {}}

No torch here (programs/ is numpy only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from layercap.errors import LayercapError
from layercap.io import atomic_write_csv, atomic_write_json, read_json

ALLOCATION_SCHEMA = "layercap.allocation/v1"
RATIOS_SCHEMA = "layercap.ratios/v1"
TRANSFER_SCHEMA = "layercap.transfer/v1"
UNITS = ("experts", "rank", "units")
RATIO_MODES = ("exact", "at-least", "rule")
PROGRAMS = ("allocation", "pruning")


# ---- validation helpers -------------------------------------------------------------------
def _read_json(path: str | Path, what: str, hint: str) -> tuple[dict, str]:
    return read_json(path, f"{what} file", f"Expected a layercap {what} file. {hint}"), str(path)


def _obj(doc: Any, src: str, schema: str) -> dict:
    if not isinstance(doc, dict):
        raise LayercapError(f"{src}: expected a JSON object with \"schema\": {schema!r}, got {type(doc).__name__}.")
    got = doc.get("schema")
    if got != schema:
        raise LayercapError(f"{src}: field 'schema' is {got!r}; expected {schema!r} (is this the right kind of file?).")
    return doc


def _num(doc: dict, key: str, src: str, *, lo: float | None = None, hi: float | None = None,
         optional: bool = False, allow_none: bool = False) -> float | None:
    if key not in doc:
        if optional:
            return None
        raise LayercapError(f"{src}: missing field {key!r}.")
    v = doc[key]
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise LayercapError(f"{src}: field {key!r} = {v!r} must be a finite number.")
    if lo is not None and v < lo:
        raise LayercapError(f"{src}: field {key!r} = {v!r} must be >= {lo}.")
    if hi is not None and v > hi:
        raise LayercapError(f"{src}: field {key!r} = {v!r} must be <= {hi}.")
    return float(v)


def _str(doc: dict, key: str, src: str, choices: Sequence[str] | None = None) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or not v:
        raise LayercapError(f"{src}: field {key!r} must be a non-empty string, got {v!r}.")
    if choices is not None and v not in choices:
        raise LayercapError(f"{src}: field {key!r} = {v!r}; allowed: {', '.join(choices)}.")
    return v


def _bool(doc: dict, key: str, src: str) -> bool:
    v = doc.get(key)
    if not isinstance(v, bool):
        raise LayercapError(f"{src}: field {key!r} must be true or false, got {v!r}.")
    return v


def _meta(doc: dict, src: str) -> dict:
    m = doc.get("metadata", {})
    if not isinstance(m, dict):
        raise LayercapError(f"{src}: field 'metadata' must be an object.")
    return m


def _layers(doc: dict, src: str) -> list[dict]:
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise LayercapError(f"{src}: field 'layers' must be a non-empty list of per-layer objects.")
    seen: set[str] = set()
    for i, item in enumerate(layers):
        if not isinstance(item, dict):
            raise LayercapError(f"{src}: layers[{i}] must be an object.")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise LayercapError(f"{src}: layers[{i}].name must be a non-empty string, got {name!r}.")
        if name in seen:
            raise LayercapError(f"{src}: layers[{i}].name {name!r} appears twice; names must be unique.")
        seen.add(name)
    return layers


def _f(x: Any) -> Any:
    """JSON-safe scalar: numpy -> python; ints stay ints."""
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def jsonable(x):
    """A bound (None, scalar or per-layer array) as JSON: whole numbers as ints."""
    if x is None:
        return None
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        v = float(a)
        return int(v) if v.is_integer() else v
    return [int(v) if float(v).is_integer() else float(v) for v in a]


# ---- allocation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AllocatedLayer:
    """One layer's capacity: n units (experts, rank units) at cost `cost` per unit; q optional."""

    name: str
    n: float
    cost: float
    q: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "n": _f(self.n)}
        if self.q is not None:
            d["q"] = float(self.q)
        d["cost"] = float(self.cost)
        return d


@dataclass
class Allocation:
    """Per-layer capacity under a budget (schema ``layercap.allocation/v1``).

    n is an int for integer allocations (``integer`` true), a float otherwise. ``spent`` =
    sum cost * n (same unit as ``budget``). ``mu`` is the budget's dual price (0 when the budget
    does not bind; None for rules that are not a program). ``gap`` (integer only): certified
    upper bound on objective(integer solution) - objective(integer optimum), from the
    continuous relaxation; 0 when the integer solution is provably optimal.
    """

    rule: str
    budget: float
    unit: str
    integer: bool
    layers: list[AllocatedLayer]
    mu: float | None
    binds: bool
    spent: float
    gap: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def n(self) -> np.ndarray:
        """Shape (K,) float64 array of the per-layer counts."""
        return np.array([l.n for l in self.layers], dtype=np.float64)

    def counts(self) -> dict[str, float | int]:
        return {l.name: l.n for l in self.layers}

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": ALLOCATION_SCHEMA, "rule": self.rule, "budget": float(self.budget), "unit": self.unit,
            "integer": bool(self.integer), "layers": [l.to_dict() for l in self.layers],
            "mu": None if self.mu is None else float(self.mu), "binds": bool(self.binds), "spent": float(self.spent),
        }
        if self.gap is not None:
            d["gap"] = float(self.gap)
        d["metadata"] = self.metadata
        return d

    @classmethod
    def from_dict(cls, doc: Any, source: str = "allocation") -> "Allocation":
        doc = _obj(doc, source, ALLOCATION_SCHEMA)
        integer = _bool(doc, "integer", source)
        layers = []
        for i, item in enumerate(_layers(doc, source)):
            where = f"{source}: layers[{i}]"
            n = _num(item, "n", where, lo=0.0)
            if integer:
                if float(n).is_integer():
                    n = int(n)
                else:
                    raise LayercapError(f"{where}: field 'n' = {item['n']!r} must be a whole number (integer allocation).")
            cost = _num(item, "cost", where)
            if cost <= 0:
                raise LayercapError(f"{where}: field 'cost' = {cost!r} must be > 0.")
            q = _num(item, "q", where, lo=0.0, optional=True)
            layers.append(AllocatedLayer(item["name"], n, cost, q))
        return cls(
            rule=_str(doc, "rule", source), budget=_num(doc, "budget", source, lo=0.0),
            unit=_str(doc, "unit", source, UNITS), integer=integer, layers=layers,
            mu=_num(doc, "mu", source, lo=0.0, allow_none=True), binds=_bool(doc, "binds", source),
            spent=_num(doc, "spent", source, lo=0.0), gap=_num(doc, "gap", source, lo=0.0, optional=True, allow_none=True),
            metadata=_meta(doc, source),
        )

    def save(self, path: str | Path) -> Path:
        """JSON (the record), or CSV ``name,n,cost,q`` when the suffix is .csv (atomic)."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            rows = [[l.name, _f(l.n), repr(float(l.cost)), "" if l.q is None else repr(float(l.q))] for l in self.layers]
            return atomic_write_csv(path, ["name", "n", "cost", "q"], rows)
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Allocation":
        doc, src = _read_json(path, "allocation", "Create one with `layercap allocate SCORES --budget B -o allocation.json`.")
        return cls.from_dict(doc, src)


# ---- pruning ratios -----------------------------------------------------------------------
@dataclass(frozen=True)
class RatioLayer:
    """One layer's pruning ratio (fraction of its `params` prunable weights removed)."""

    name: str
    ratio: float
    params: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ratio": float(self.ratio), "params": int(self.params)}


@dataclass
class PruningRatios:
    """Per-layer pruning ratios under a global sparsity target (schema ``layercap.ratios/v1``).

    ``achieved`` = sum params*ratio / sum params. ``nu`` is the sparsity constraint's dual
    (None for rules that are not the program). ``clipped`` counts layers at rho_min or rho_max.
    ``mode`` is "exact" / "at-least" for the MDL program, "rule" for baseline rules.
    """

    rule: str
    sparsity: float
    mode: str
    layers: list[RatioLayer]
    achieved: float
    nu: float | None = None
    clipped: int = 0
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def rho(self) -> np.ndarray:
        """Shape (K,) float64 array of ratios in [0, 1]."""
        return np.array([l.ratio for l in self.layers], dtype=np.float64)

    @property
    def params(self) -> np.ndarray:
        return np.array([l.params for l in self.layers], dtype=np.int64)

    def ratios(self) -> dict[str, float]:
        return {l.name: float(l.ratio) for l in self.layers}

    def block_rho(self, blocks: Sequence[str]) -> np.ndarray:
        """(len(blocks),) ratio of each block: its own, or the weight-weighted mean of its Linears'
        when the layers are Linear modules (``model.layers.3.mlp.down_proj`` belongs to
        ``model.layers.3``). A block no layer names gets 0 (left dense)."""
        rho, N = self.rho, self.params.astype(np.float64)
        out = np.zeros(len(blocks))
        for b, name in enumerate(blocks):
            mine = np.array([n == name or n.startswith(name + ".") for n in self.names])
            if mine.any():
                out[b] = float(N[mine] @ rho[mine] / max(N[mine].sum(), 1.0))
        return out

    def __len__(self) -> int:
        return len(self.layers)

    @classmethod
    def uniform(cls, names: Sequence[str], params: Sequence[int], sparsity: float) -> "PruningRatios":
        """Every layer at the target sparsity (needs no scores)."""
        if not (0.0 <= float(sparsity) <= 1.0):
            raise LayercapError(f"sparsity = {sparsity!r} must lie in [0, 1] (e.g. 0.5 for half the weights).")
        if len(names) != len(params) or not len(names):
            raise LayercapError("uniform ratios: give one params count per layer name (and at least one layer).")
        layers = [RatioLayer(str(n), float(sparsity), int(p)) for n, p in zip(names, params)]
        return cls(rule="uniform", sparsity=float(sparsity), mode="rule", layers=layers, achieved=float(sparsity),
                   nu=None, clipped=0, warnings=[], metadata={})

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RATIOS_SCHEMA, "rule": self.rule, "sparsity": float(self.sparsity), "mode": self.mode,
            "layers": [l.to_dict() for l in self.layers], "achieved": float(self.achieved),
            "nu": None if self.nu is None else float(self.nu), "clipped": int(self.clipped),
            "warnings": list(self.warnings), "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, doc: Any, source: str = "ratios") -> "PruningRatios":
        doc = _obj(doc, source, RATIOS_SCHEMA)
        layers = []
        for i, item in enumerate(_layers(doc, source)):
            where = f"{source}: layers[{i}]"
            ratio = _num(item, "ratio", where, lo=0.0, hi=1.0)
            p = item.get("params")
            if isinstance(p, bool) or not isinstance(p, int) or p < 1:
                raise LayercapError(f"{where}: field 'params' = {p!r} must be an integer >= 1.")
            layers.append(RatioLayer(item["name"], ratio, p))
        warnings = doc.get("warnings", [])
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise LayercapError(f"{source}: field 'warnings' must be a list of strings.")
        clipped = doc.get("clipped", 0)
        if isinstance(clipped, bool) or not isinstance(clipped, int) or clipped < 0:
            raise LayercapError(f"{source}: field 'clipped' = {clipped!r} must be an integer >= 0.")
        return cls(
            rule=_str(doc, "rule", source), sparsity=_num(doc, "sparsity", source, lo=0.0, hi=1.0),
            mode=_str(doc, "mode", source, RATIO_MODES), layers=layers,
            achieved=_num(doc, "achieved", source, lo=0.0, hi=1.0), nu=_num(doc, "nu", source, allow_none=True, optional=True),
            clipped=clipped, warnings=warnings, metadata=_meta(doc, source),
        )

    def save(self, path: str | Path) -> Path:
        """JSON (the record), or CSV ``name,ratio,params`` when the suffix is .csv (atomic)."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            rows = [[l.name, repr(float(l.ratio)), int(l.params)] for l in self.layers]
            return atomic_write_csv(path, ["name", "ratio", "params"], rows)
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "PruningRatios":
        doc, src = _read_json(path, "ratios", "Create one with `layercap prune-ratios SCORES --sparsity 0.5 -o ratios.json`.")
        return cls.from_dict(doc, src)


# ---- transfer -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferLayer:
    name: str
    q_source: float
    q_target: float
    x_source: float
    x_target: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "q_source": float(self.q_source), "q_target": float(self.q_target),
                "x_source": float(self.x_source), "x_target": float(self.x_target)}


@dataclass
class TransferResult:
    """Regret of deciding with source scores on a target (Theorem 4; schema ``layercap.transfer/v1``).

    regret = F(x*(q_S); q_T) - F(x*(q_T); q_T) >= 0, in the program's objective units.
    bound = (L/2) (L_q/m)^2 ||q_T - q_S||^2 (None when a constant is undefined, e.g. m = 0).
    ``assumptions_hold`` is False when the theorem's hypotheses fail (non-interior solutions,
    beta < 1 without a positive q_min, ...); ``assumption_notes`` says which. ``bound_holds``:
    regret <= bound (+ round-off), or None when there is no bound.
    """

    program: str
    regret: float
    bound: float | None
    bound_holds: bool | None
    assumptions_hold: bool
    assumption_notes: list[str]
    constants: dict[str, float | None]
    q_distance2: float
    objective_source: float
    objective_target: float
    layers: list[TransferLayer]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": TRANSFER_SCHEMA, "program": self.program, "regret": float(self.regret),
            "bound": None if self.bound is None else float(self.bound),
            "bound_holds": None if self.bound_holds is None else bool(self.bound_holds),
            "assumptions_hold": bool(self.assumptions_hold), "assumption_notes": list(self.assumption_notes),
            "constants": {k: (None if v is None else float(v)) for k, v in self.constants.items()},
            "q_distance2": float(self.q_distance2), "objective_source": float(self.objective_source),
            "objective_target": float(self.objective_target), "layers": [l.to_dict() for l in self.layers],
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, doc: Any, source: str = "transfer") -> "TransferResult":
        doc = _obj(doc, source, TRANSFER_SCHEMA)
        layers = []
        for i, item in enumerate(_layers(doc, source)):
            where = f"{source}: layers[{i}]"
            layers.append(TransferLayer(item["name"], *(_num(item, k, where) for k in ("q_source", "q_target", "x_source", "x_target"))))
        notes = doc.get("assumption_notes", [])
        if not isinstance(notes, list) or not all(isinstance(w, str) for w in notes):
            raise LayercapError(f"{source}: field 'assumption_notes' must be a list of strings.")
        consts = doc.get("constants", {})
        if not isinstance(consts, dict):
            raise LayercapError(f"{source}: field 'constants' must be an object {{\"m\", \"L\", \"L_q\"}}.")
        constants = {k: _num(consts, k, f"{source}: constants", allow_none=True, optional=True) for k in consts}
        bh = doc.get("bound_holds")
        if bh is not None and not isinstance(bh, bool):
            raise LayercapError(f"{source}: field 'bound_holds' must be true, false or null.")
        return cls(
            program=_str(doc, "program", source, PROGRAMS), regret=_num(doc, "regret", source),
            bound=_num(doc, "bound", source, allow_none=True), bound_holds=bh,
            assumptions_hold=_bool(doc, "assumptions_hold", source), assumption_notes=notes, constants=constants,
            q_distance2=_num(doc, "q_distance2", source, lo=0.0), objective_source=_num(doc, "objective_source", source),
            objective_target=_num(doc, "objective_target", source), layers=layers, metadata=_meta(doc, source),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix.lower() == ".csv":
            rows = [[l.name, repr(l.q_source), repr(l.q_target), repr(l.x_source), repr(l.x_target)] for l in self.layers]
            return atomic_write_csv(path, ["name", "q_source", "q_target", "x_source", "x_target"], rows)
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "TransferResult":
        doc, src = _read_json(path, "transfer", "Create one with `layercap transfer SOURCE TARGET --program allocation -o transfer.json`.")
        return cls.from_dict(doc, src)
