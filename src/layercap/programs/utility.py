"""Measured utility curves and the allocation program with per-block concave utilities (numpy only).

The allocation analogue of the pruning damage curves (:mod:`layercap.programs.damage`).

Record ``UtilityTable`` (schema ``layercap.utility/v1``)::

    {"schema": "layercap.utility/v1", "model", "fingerprint": {...}, "adapter", "blocks": [names],
     "costs": [c_k], "levels": [n_j], "reduction": [[K x L]], "base_nll", "tolerance",
     "settings": {...}, "data": {"train": {...}, "heldout": {...}}, "cost": {...},
     "complete": bool, "metadata": {}}

``reduction[k][j]`` = u_k(n_j): the held-out NLL of the unadapted model minus the held-out NLL
after a short adaptation of block k alone with ``levels[j]`` capacity units (nats per token;
u_k(0) = 0). ``costs[k]``: adapter parameters of one unit in block k. ``fingerprint``: what
identifies the weights the table was measured on (parameter count and a hash of sampled
weights); a table from another model is refused. A partial (resumable) table has ``complete``
false and ``null`` where not measured. In a complete table values may decrease with the level
by at most ``tolerance`` nats/token (measurement noise); a larger decrease is an error naming
the block and the level (the adaptation overshoots: lower the learning rate or change the steps).

Program (``solve_utility_program``)::

    maximise   sum_k u_k(n_k)
    subject to sum_k c_k n_k = B   (mode "exact"; "<= B" for "at-most")
               l_k <= n_k <= min(h_k, largest level)

u_k is the upper concave envelope of the measured points {(0, 0)} U {(n_j, u_kj)} (piecewise
linear, no extrapolation past the largest level). Continuous solution, exact: the Lagrangian
decouples per block, max_n u_k(n) - lambda c_k n, whose maximiser walks the envelope's
segments in order of gain per cost; sorting every segment of every block by that ratio and
taking them until the budget is spent (the last one partially) is the dual search carried out
exactly (fractional knapsack, :func:`layercap.programs.damage.take_segments`); lambda* is the
gain per cost of the last segment taken. "at-most" also stops at the first segment that gains
nothing.

Integer solution: the greedy that takes, one unit at a time, the unit with the largest
marginal gain per cost u_k(n+1) - u_k(n) over c_k that still fits. The envelope is concave, so
each block's marginal gains do not increase; with equal costs (c_k = c for every block, e.g.
``costs="count"``) the greedy is optimal for this separable concave objective under one budget
(an exchange argument), ``gap`` = 0. With unequal costs it is a heuristic and ``gap`` =
objective(continuous) - objective(integer) >= 0 certifies how far from the integer optimum it
can be.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from layercap.errors import LayercapError
from layercap.io import atomic_write_json, read_json
from layercap.programs.damage import _clip_envelope, _matrix, lower_envelope, take_segments
from layercap.programs.records import AllocatedLayer, Allocation, jsonable

UTILITY_SCHEMA = "layercap.utility/v1"
UTILITY_MODES = ("exact", "at-most")
DEFAULT_TOLERANCE = 0.005  # nats/token a measured curve may dip with the level


def check_unit_levels(levels: Sequence[Any], where: str = "--levels") -> list[int]:
    """Levels as whole numbers >= 0, strictly increasing, at least one > 0; LayercapError otherwise."""
    try:
        out = [float(x) for x in levels]
    except (TypeError, ValueError) as exc:
        raise LayercapError(f"{where}: levels must be whole numbers of units, got {levels!r}.") from exc
    if not out or max(out) <= 0:
        raise LayercapError(f"{where}: give at least one level > 0, e.g. --levels 0 1 2 4 8.")
    for x in out:
        if not math.isfinite(x) or x < 0 or not x.is_integer():
            raise LayercapError(f"{where}: level {x!r} must be a whole number of units >= 0.")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise LayercapError(f"{where}: levels {[int(x) for x in out]} must be strictly increasing (no repeats).")
    return [int(x) for x in out]


@dataclass
class UtilityTable:
    """Per-block utility at a grid of capacity units (schema ``layercap.utility/v1``; module doc).

    Shapes: ``blocks``, ``costs``: (K,); ``levels``: (L,); ``reduction``: K x L nested lists
    (None where not measured). Units: nats per held-out token. ``cost``: ``fwdbwd_s`` (one plain
    forward + backward over the training windows), ``wall_s``, ``fwdbwd_equivalents`` =
    wall_s / fwdbwd_s, ``evaluations`` (block, level) pairs trained.
    """

    model: str
    blocks: list[str]
    costs: list[float]
    levels: list[int]
    reduction: list[list[float | None]]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    adapter: str = "lora"
    base_nll: float | None = None
    tolerance: float = DEFAULT_TOLERANCE
    settings: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    complete: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "utility"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        src = self.source
        fix = "re-measure with `layercap utility MODEL --data TEXT -o utility.json`"
        if not isinstance(self.model, str) or not self.model:
            raise LayercapError(f"{src}: field 'model' must be a non-empty string (the model id).")
        if not isinstance(self.adapter, str) or not self.adapter:
            raise LayercapError(f"{src}: field 'adapter' must name the adapter kind (lora, moe).")
        if not isinstance(self.blocks, list) or not self.blocks or not all(isinstance(b, str) and b for b in self.blocks):
            raise LayercapError(f"{src}: field 'blocks' must be a non-empty list of block names.")
        if len(set(self.blocks)) != len(self.blocks):
            raise LayercapError(f"{src}: field 'blocks' names a block twice.")
        K = len(self.blocks)
        if (not isinstance(self.costs, list) or len(self.costs) != K
                or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0
                       for c in self.costs)):
            raise LayercapError(f"{src}: field 'costs' must list {K} finite numbers > 0 (adapter parameters per unit).")
        self.costs = [float(c) for c in self.costs]
        self.levels = check_unit_levels(self.levels, f"{src}: field 'levels'")
        L = len(self.levels)
        if not isinstance(self.complete, bool):
            raise LayercapError(f"{src}: field 'complete' must be true or false.")
        if (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
                or not math.isfinite(self.tolerance) or self.tolerance < 0):
            raise LayercapError(f"{src}: field 'tolerance' = {self.tolerance!r} must be a finite number >= 0 (nats/token).")
        self.reduction = _matrix(self.reduction, K, L, src, "reduction", allow_none=not self.complete, command="utility")
        for k, row in enumerate(self.reduction):
            prev_n, prev = 0, 0.0  # u_k(0) = 0: no adapter, no change
            for j, v in enumerate(row):
                if v is None:
                    continue
                if self.levels[j] == 0 and v != 0.0:
                    raise LayercapError(f"{src}: reduction[{k}][{j}] (block {self.blocks[k]}, level 0) = {v!r}; "
                                        "level 0 means no adapter, so it must be 0. Fix the file or " + fix + ".")
                if self.complete and v < prev - self.tolerance:  # a partial table is not yet a curve
                    raise LayercapError(
                        f"{src}: block {self.blocks[k]} (reduction[{k}][{j}]): the utility decreases with the level, "
                        f"{prev:.4g} nats/token at {prev_n} units but {v:.4g} at {self.levels[j]} units (more than the "
                        f"tolerance {self.tolerance:g}). The short adaptation overshoots at the larger rank: "
                        f"{fix} at a lower --lr or other --steps.")
                prev_n, prev = self.levels[j], v
        if self.base_nll is not None and (isinstance(self.base_nll, bool) or not isinstance(self.base_nll, (int, float))
                                          or not math.isfinite(self.base_nll)):
            raise LayercapError(f"{src}: field 'base_nll' = {self.base_nll!r} must be a finite number.")
        for key in ("fingerprint", "settings", "data", "cost", "metadata"):
            if not isinstance(getattr(self, key), dict):
                raise LayercapError(f"{src}: field {key!r} must be an object.")

    # ---- views ----
    @property
    def c(self) -> np.ndarray:
        """(K,) float64 adapter parameters per unit."""
        return np.asarray(self.costs, dtype=np.float64)

    def values(self) -> np.ndarray:
        """(K, L) float64 measured reductions; NaN where unmeasured."""
        return np.array([[np.nan if v is None else v for v in row] for row in self.reduction], dtype=np.float64)

    def check_compatible(self, names: Sequence[str], fingerprint: dict | None = None, model: str | None = None) -> None:
        """Raise LayercapError unless this table was measured on these blocks (and weights / model)."""
        fix = "Measure this model with `layercap utility MODEL --data TEXT -o utility.json`."
        if model is not None and model != self.model:
            raise LayercapError(f"{self.source}: utility table measured on model {self.model!r}, not {model!r}. {fix}")
        if list(names) != self.blocks:
            got = f"{names[0]} ... {names[-1]}, {len(names)}" if len(names) else "none"
            raise LayercapError(f"{self.source}: utility table blocks ({self.blocks[0]} ... {self.blocks[-1]}, "
                                f"{len(self.blocks)}) differ from the model's ({got}): a table from another model? {fix}")
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise LayercapError(f"{self.source}: field 'fingerprint' {self.fingerprint} differs from this model's "
                                f"{fingerprint}: the table was measured on other weights. {fix}")

    # ---- JSON ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": UTILITY_SCHEMA, "model": self.model, "fingerprint": self.fingerprint, "adapter": self.adapter,
            "blocks": list(self.blocks), "costs": list(self.costs), "levels": list(self.levels),
            "reduction": self.reduction, "base_nll": self.base_nll, "tolerance": self.tolerance,
            "settings": self.settings, "data": self.data, "cost": self.cost, "complete": self.complete,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, doc: Any, source: str = "utility") -> "UtilityTable":
        if not isinstance(doc, dict):
            raise LayercapError(f"{source}: expected a JSON object with \"schema\": {UTILITY_SCHEMA!r}.")
        if doc.get("schema") != UTILITY_SCHEMA:
            raise LayercapError(f"{source}: field 'schema' is {doc.get('schema')!r}; expected {UTILITY_SCHEMA!r} "
                                "(create one with `layercap utility MODEL --data TEXT -o utility.json`).")
        missing = [k for k in ("model", "blocks", "costs", "levels", "reduction") if k not in doc]
        if missing:
            raise LayercapError(f"{source}: missing field(s) {', '.join(missing)}.")
        return cls(model=doc["model"], blocks=doc["blocks"], costs=doc["costs"], levels=doc["levels"],
                   reduction=doc["reduction"], fingerprint=doc.get("fingerprint", {}), adapter=doc.get("adapter", "lora"),
                   base_nll=doc.get("base_nll"), tolerance=doc.get("tolerance", DEFAULT_TOLERANCE),
                   settings=doc.get("settings", {}), data=doc.get("data", {}), cost=doc.get("cost", {}),
                   complete=doc.get("complete", True), metadata=doc.get("metadata", {}), source=source)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "UtilityTable":
        doc = read_json(path, "utility table", "Create one with `layercap utility MODEL --data TEXT -o utility.json`.")
        return cls.from_dict(doc, str(path))


def load_for(path: str | Path, names: Sequence[str], fingerprint: dict | None = None,
             model: str | None = None) -> UtilityTable:
    """Load a utility table and check it was measured on these blocks (LayercapError otherwise)."""
    table = UtilityTable.load(path)
    table.check_compatible(names, fingerprint, model)
    return table


# ---- concave envelopes ----------------------------------------------------------------------
def upper_envelope(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (xs, ys) of the upper concave hull of (x_i, y_i) with (0, 0) added (xs[0] = 0)."""
    xs, ys = lower_envelope(x, -np.asarray(y, dtype=np.float64))
    return xs, -ys


# ---- the program ----------------------------------------------------------------------------
@dataclass(frozen=True)
class UtilitySolution:
    """Continuous and integer solutions of the utility program.

    n: (K,) continuous units (sum c n = B exactly in mode exact); lam: the budget's dual price
    (nats/token per cost unit); objective: sum u_k(n_k). n_integer: (K,) whole units by the
    greedy, sum c n <= B; objective_integer; gap = objective - objective_integer >= 0 (a bound on
    the integer solution's distance to the integer optimum; ``optimal`` when costs are equal,
    then the greedy is provably optimal). upper: the effective upper bounds (K,).
    """

    n: np.ndarray
    lam: float
    objective: float
    n_integer: np.ndarray
    objective_integer: float
    gap: float
    optimal: bool
    spent: float
    spent_integer: float
    upper: np.ndarray


def _bounds(K, lower, upper, top):
    l = np.broadcast_to(np.asarray(lower, dtype=np.float64), (K,)).copy()
    u = np.full(K, float(top)) if upper is None else np.broadcast_to(np.asarray(upper, dtype=np.float64), (K,)).copy()
    if not np.all(np.isfinite(l)) or np.any(l < 0):
        raise LayercapError(f"lower bound(s) {lower!r} must be finite and >= 0 (--min).")
    if np.any(np.isnan(u)):
        raise LayercapError(f"upper bound(s) {upper!r} must be numbers (--max).")
    u = np.minimum(u, float(top))
    if np.any(l > u):
        raise LayercapError(f"lower bound(s) {lower!r} exceed the upper bound(s) or the largest measured level {top}: "
                            "measure higher levels (--levels ... 16) or lower --min.")
    return l, u


def greedy_integer(envelopes, costs, lower, upper, budget: float, *, positive_only: bool = False) -> np.ndarray:
    """Whole units by the greedy on marginal gain per cost (module doc); ``lower`` / ``upper``
    whole. ``positive_only``: never take a unit that gains nothing (mode at-most)."""
    n = np.asarray(lower, dtype=np.float64).copy()
    rem = budget - float(np.dot(costs, n))

    def gain(k):
        xs, ys = envelopes[k]
        return float(np.interp(n[k] + 1, xs, ys) - np.interp(n[k], xs, ys))

    heap = [(-gain(k) / costs[k], k) for k in range(n.size) if n[k] + 1 <= upper[k] + 1e-12]
    heapq.heapify(heap)
    while heap:
        ratio, k = heapq.heappop(heap)
        if positive_only and -ratio <= 0:
            break
        if costs[k] > rem * (1 + 1e-12) + 1e-12:
            continue  # this block's unit no longer fits (cheaper ones may)
        n[k] += 1
        rem -= costs[k]
        if n[k] + 1 <= upper[k] + 1e-12:
            heapq.heappush(heap, (-gain(k) / costs[k], k))
    return n


def solve_utility_program(utility: np.ndarray, levels: Sequence[int], costs: Sequence[float], budget: float, *,
                          lower=0, upper=None, mode: str = "exact") -> UtilitySolution:
    """Solve the program of the module docstring. ``utility``: (K, L) measured u_k(n_j) at ``levels``
    (L,); ``costs``: (K,) c_k; lower/upper: scalars or (K,). Integer bounds are rounded inward."""
    U = np.asarray(utility, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    lv = np.asarray(check_unit_levels(levels, "levels"), dtype=np.float64)
    if U.ndim != 2 or U.shape != (c.size, lv.size):
        raise LayercapError(f"utility must have shape (blocks, levels) = ({c.size}, {lv.size}), got {U.shape}.")
    if not np.all(np.isfinite(U)):
        raise LayercapError("utility values must all be finite (a partial table? finish it by rerunning `layercap utility`).")
    if not np.all(np.isfinite(c)) or np.any(c <= 0):
        raise LayercapError("costs must be finite and > 0 for every block.")
    if mode not in UTILITY_MODES:
        raise LayercapError(f"mode {mode!r} is unknown; use one of {', '.join(UTILITY_MODES)}.")
    B = float(budget)
    if not (math.isfinite(B) and B > 0):
        raise LayercapError(f"budget = {budget!r} must be a finite number > 0 (e.g. --budget 60).")
    K = c.size
    l, u = _bounds(K, lower, upper, lv[-1])
    floor_spend, top_spend = float(np.dot(c, l)), float(np.dot(c, u))
    if floor_spend > B * (1 + 1e-12):
        raise LayercapError(f"infeasible: the lower bounds alone cost {floor_spend:g} > budget {B:g}. Raise --budget or lower --min.")
    if mode == "exact" and top_spend < B * (1 - 1e-12):
        raise LayercapError(f"budget {B:g} exceeds what the measured levels can hold ({top_spend:g} at the upper bounds / "
                            f"largest level {int(lv[-1])}): the curves are not extrapolated; measure higher levels, raise "
                            "--max, or use mode at-most.")
    full = [upper_envelope(lv, U[k]) for k in range(K)]
    # negated envelopes are convex: the damage program's segment walk is the dual search
    negs = [_clip_envelope(xs, -ys, l[k], u[k]) for k, (xs, ys) in enumerate(full)]
    n, spent, lam = take_segments(negs, c, l, B, stop_at=0.0 if mode == "at-most" else math.inf)
    n = np.clip(n, l, u)

    def obj(x):
        return float(sum(np.interp(x[k], *full[k]) for k in range(K)))

    li, ui = np.ceil(l - 1e-9), np.floor(u + 1e-9)
    if np.any(li > ui) or float(np.dot(c, li)) > B * (1 + 1e-12):
        raise LayercapError("no whole-unit allocation fits the bounds and the budget; use the continuous program.")
    ni = greedy_integer(full, c, li, ui, B, positive_only=mode == "at-most")
    o, oi = obj(n), obj(ni)
    # the continuous program relaxes the integer one only when their bounds agree
    optimal = bool(np.all(c == c[0]))
    return UtilitySolution(n=n, lam=float(-lam) if math.isfinite(lam) else 0.0, objective=o, n_integer=ni,
                           objective_integer=oi, gap=0.0 if optimal else max(o - oi, 0.0), optimal=optimal,
                           spent=float(np.dot(c, n)), spent_integer=float(np.dot(c, ni)), upper=u)


def resolve_utility_costs(table: UtilityTable, costs) -> np.ndarray:
    """costs: None / "count" (1 per unit), "params" (the table's adapter parameters per unit) or (K,)."""
    K = len(table.blocks)
    if costs is None or (isinstance(costs, str) and costs == "count"):
        return np.ones(K)
    if isinstance(costs, str):
        if costs == "params":
            return table.c
        raise LayercapError(f"cost {costs!r} is unknown; use count, params, or a per-layer array.")
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (K,):
        raise LayercapError(f"costs has shape {c.shape}; need one cost per block ({K}).")
    return c


def allocation_from_utility(table: UtilityTable, budget: float, *, lower=1, upper=None, integer: bool = True,
                            costs=None, mode: str = "exact", unit: str = "experts", rule: str = "mdl:measured") -> Allocation:
    """Rule ``mdl:measured``: per-block units maximising the summed measured utility on the budget.

    ``costs``: None / "count" (1 per unit, the default), "params" (adapter parameters per unit)
    or (K,). ``integer``: the greedy's whole units (optimal for equal costs), else the
    continuous solution. ``mode``: exact (spend B) or at-most (stop where units gain nothing).
    Objectives, the dual price, the gap and both solutions are in metadata.
    """
    U = table.values()
    if np.isnan(U).any():
        raise LayercapError(f"{table.source}: the utility table is partial (unmeasured entries); finish it by rerunning "
                            "`layercap utility` with the same arguments before allocating.")
    c = resolve_utility_costs(table, costs)
    sol = solve_utility_program(U, table.levels, c, budget, lower=lower, upper=upper, mode=mode)
    n = sol.n_integer if integer else sol.n
    counts = [int(round(x)) for x in n] if integer else [float(x) for x in n]
    layers = [AllocatedLayer(name, counts[k], float(c[k])) for k, name in enumerate(table.blocks)]
    spent = sol.spent_integer if integer else sol.spent
    warnings = []
    if upper is None or np.any(np.asarray(upper, dtype=np.float64) > table.levels[-1]):
        warnings.append(f"units capped at the largest measured level {table.levels[-1]}: the curves are not extrapolated.")
    cheapest = c[n < sol.upper - 1e-9]
    binds = bool(spent >= float(budget) * (1 - 1e-9) or (integer and (cheapest.size == 0 or cheapest.min() > budget - spent + 1e-9)))
    return Allocation(
        rule=rule, budget=float(budget), unit=unit, integer=bool(integer), layers=layers, mu=max(sol.lam, 0.0),
        binds=binds, spent=float(spent), gap=sol.gap if integer else None,
        metadata={"source": "utility", "utility_model": table.model, "adapter": table.adapter, "levels": table.levels,
                  "lower": jsonable(lower), "upper": jsonable(upper), "mode": mode,
                  "cost": costs if isinstance(costs, str) else ("count" if costs is None else "array"),
                  "objective": sol.objective, "objective_integer": sol.objective_integer, "optimal": sol.optimal,
                  "n_continuous": sol.n.tolist(), "n_integer": [int(x) for x in sol.n_integer],
                  "warnings": warnings},
    )
