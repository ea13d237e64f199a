"""Measured damage curves and the MDL pruning program with per-block convex damage (numpy only).

Record ``DamageTable`` (schema ``layercap.damage/v1``)::

    {"schema": "layercap.damage/v1", "model", "method", "structure", "blocks": [names],
     "params": [N_k], "levels": [rho_j], "kl": [[K x L]], "dnll": [[K x L]],
     "obd": {"diag": [[K x L]], "kfac": [[K x L]]}, "agreement": {"diag": [L], "kfac": [L]},
     "dense_nll", "calibration": {...}, "cost": {...}, "complete": bool, "metadata": {}}

``kl[k][j]``: mean over calibration next-token positions of KL(p_dense || p_pruned) (nats per
token) when only block k is pruned at ``levels[j]`` (every other block dense); ``dnll[k][j]``:
the mean NLL increase on the same positions (nats per token; may be slightly negative).
``obd``: the second-order estimate 1/2 dW^T C dW (same unit) with C the diagonal Fisher or its
K-FAC form; ``agreement``: Spearman rank correlation between ``obd`` and ``kl`` across blocks,
per level. A partial (resumable) table has ``complete`` false and ``null`` where not measured.

Program (``ratios_from_damage``)::

    minimise   sum_k psi_k(rho_k) + w sum_k N_k (1 - rho_k)
    subject to sum_k N_k rho_k = s sum_k N_k   (mode "exact"; ">=" for "at-least")
               lo <= rho_k <= hi

psi_k is the lower convex envelope of the measured points {(0, 0)} U {(rho_j, d_kj)}
(piecewise linear, psi_k(0) = 0, defined on [0, max level]). Under "exact" the size term is a
constant; under "at-least" it rewards pruning more. The solution is exact: the Lagrangian
decouples per block, min_rho psi_k(rho) - lambda N_k rho, whose minimiser moves along the
envelope's segments in order of their per-parameter slope; sorting every segment of every block
by that slope and taking them in order until the budget is met (the last one partially) is the
1-D dual search carried out exactly (fractional knapsack), with lambda* the slope of the last
segment taken. The discrete solution (every block at a measured level, vertices of its
envelope) rounds the one fractional block up to its next vertex, so sum N rho >= target; its
certified gap is objective(discrete) - objective(continuous), an upper bound on its distance
to the best discrete choice (the continuous program is a relaxation of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from layercap.errors import LayercapError
from layercap.io import atomic_write_json, read_json
from layercap.programs.records import PruningRatios, RatioLayer

DAMAGE_SCHEMA = "layercap.damage/v1"
SOURCES = ("kl", "dnll", "obd-diag", "obd-kfac")
OBD_KINDS = ("diag", "kfac")
PROGRAM_MODES = ("exact", "at-least")
# the trust-region radii mdl:context tries around its operating point (None: only the box). The
# in-context curves describe the damage near the point they were measured at; how near is an
# empirical question, answered on the calibration KL as atp's step is
TRUST_RADII: tuple[float | None, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, None)


# ---- the record ---------------------------------------------------------------------------
def _matrix(value: Any, K: int, L: int, src: str, key: str, allow_none: bool,
            command: str = "damage") -> list[list[float | None]]:
    if not isinstance(value, list) or len(value) != K:
        raise LayercapError(f"{src}: field {key!r} must be a list of {K} rows (one per block), got "
                            f"{type(value).__name__}{'' if not isinstance(value, list) else f' of length {len(value)}'}.")
    out = []
    for k, row in enumerate(value):
        if not isinstance(row, list) or len(row) != L:
            raise LayercapError(f"{src}: {key}[{k}] must list one value per level ({L} levels); "
                                f"got {row if not isinstance(row, list) else f'{len(row)} values'}. "
                                f"Missing levels: re-run `layercap {command}` with the same --levels.")
        clean = []
        for j, v in enumerate(row):
            if v is None and allow_none:
                clean.append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise LayercapError(f"{src}: {key}[{k}][{j}] = {v!r} must be a finite number "
                                    + ("(or null while the table is partial)." if allow_none else
                                       f"(a complete table has every value measured; re-run `layercap {command}`)."))
            clean.append(float(v))
        out.append(clean)
    return out


def check_levels(levels: Sequence[float], where: str = "--levels") -> list[float]:
    """Levels as floats, each in [0, 1), strictly increasing; raises LayercapError otherwise."""
    try:
        out = [float(x) for x in levels]
    except (TypeError, ValueError) as exc:
        raise LayercapError(f"{where}: levels must be numbers, got {levels!r}.") from exc
    if not out:
        raise LayercapError(f"{where}: give at least one level, e.g. --levels 0.3 0.5 0.7.")
    for x in out:
        if not math.isfinite(x) or not 0.0 <= x < 1.0:
            raise LayercapError(f"{where}: level {x!r} is outside [0, 1); a ratio of 1 would remove every weight of the block.")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise LayercapError(f"{where}: levels {out} must be strictly increasing (no repeats).")
    return out


@dataclass
class DamageTable:
    """Per-block damage at a grid of pruning ratios (schema ``layercap.damage/v1``; see module doc).

    Shapes: ``blocks``, ``params``: (K,); ``levels``: (L,); ``kl``, ``dnll``: K x L nested
    lists (None where not measured; every entry set when ``complete``). Units: nats per token.
    ``cost``: ``forward_s`` (one plain forward over the same tokens), ``wall_s`` (the pass),
    ``forward_equivalents`` = wall_s / forward_s, ``evaluations`` (block, level) pairs measured.
    """

    model: str
    method: str
    blocks: list[str]
    params: list[int]
    levels: list[float]
    kl: list[list[float | None]]
    dnll: list[list[float | None]]
    structure: str = "unstructured"
    obd: dict[str, list[list[float]]] = field(default_factory=dict)
    agreement: dict[str, list[float | None]] = field(default_factory=dict)
    dense_nll: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    complete: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "damage"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        src = self.source
        if not isinstance(self.model, str) or not self.model:
            raise LayercapError(f"{src}: field 'model' must be a non-empty string (the model id).")
        if not isinstance(self.method, str) or not self.method:
            raise LayercapError(f"{src}: field 'method' must name the pruner (wanda, sparsegpt, magnitude).")
        if not isinstance(self.blocks, list) or not self.blocks or not all(isinstance(b, str) and b for b in self.blocks):
            raise LayercapError(f"{src}: field 'blocks' must be a non-empty list of block names.")
        if len(set(self.blocks)) != len(self.blocks):
            raise LayercapError(f"{src}: field 'blocks' names a block twice.")
        K = len(self.blocks)
        if (not isinstance(self.params, list) or len(self.params) != K
                or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.params)):
            raise LayercapError(f"{src}: field 'params' must list {K} integers >= 1 (prunable weights per block).")
        self.levels = check_levels(self.levels, f"{src}: field 'levels'")
        L = len(self.levels)
        if not isinstance(self.complete, bool):
            raise LayercapError(f"{src}: field 'complete' must be true or false.")
        self.kl = _matrix(self.kl, K, L, src, "kl", allow_none=not self.complete)
        self.dnll = _matrix(self.dnll, K, L, src, "dnll", allow_none=not self.complete)
        if not isinstance(self.obd, dict) or any(k not in OBD_KINDS for k in self.obd):
            raise LayercapError(f"{src}: field 'obd' must be an object with keys among {', '.join(OBD_KINDS)}.")
        self.obd = {k: _matrix(v, K, L, src, f"obd.{k}", allow_none=False) for k, v in self.obd.items()}
        if not isinstance(self.agreement, dict):
            raise LayercapError(f"{src}: field 'agreement' must be an object.")
        for k, v in self.agreement.items():
            if not isinstance(v, list) or len(v) != L or any(x is not None and not isinstance(x, (int, float)) for x in v):
                raise LayercapError(f"{src}: agreement.{k} must list one Spearman correlation (or null) per level.")
        if self.dense_nll is not None and (isinstance(self.dense_nll, bool) or not isinstance(self.dense_nll, (int, float))
                                           or not math.isfinite(self.dense_nll)):
            raise LayercapError(f"{src}: field 'dense_nll' = {self.dense_nll!r} must be a finite number.")
        for key in ("calibration", "cost", "metadata"):
            if not isinstance(getattr(self, key), dict):
                raise LayercapError(f"{src}: field {key!r} must be an object.")

    # ---- views ----
    @property
    def N(self) -> np.ndarray:
        """(K,) float64 prunable weights per block."""
        return np.asarray(self.params, dtype=np.float64)

    def values(self, source: str = "kl") -> np.ndarray:
        """(K, L) float64 damage of ``source`` (kl, dnll, obd-diag, obd-kfac); NaN where unmeasured."""
        if source not in SOURCES:
            raise LayercapError(f"damage source {source!r} is unknown; use one of {', '.join(SOURCES)}.")
        if source.startswith("obd-"):
            kind = source[4:]
            if kind not in self.obd:
                raise LayercapError(f"{self.source}: has no obd.{kind} estimate; run `layercap damage ... --obd {kind}`.")
            rows = self.obd[kind]
        else:
            rows = self.kl if source == "kl" else self.dnll
        return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)

    def check_compatible(self, names: Sequence[str], params: Sequence[int] | None = None, model: str | None = None) -> None:
        """Raise LayercapError unless this table was measured on these blocks (and model)."""
        if model is not None and model != self.model:
            raise LayercapError(f"{self.source}: damage table measured on model {self.model!r}, not {model!r}; "
                                "measure this model with `layercap damage MODEL ...`.")
        if list(names) != self.blocks:
            raise LayercapError(f"{self.source}: damage table blocks ({self.blocks[0]} ... {self.blocks[-1]}, {len(self.blocks)}) "
                                f"differ from the model's ({names[0]} ... {names[-1]}, {len(names)}): a table from another "
                                "model? Re-run `layercap damage` on this model.")
        if params is not None and [int(p) for p in params] != self.params:
            raise LayercapError(f"{self.source}: damage table 'params' differ from the model's prunable weights per "
                                "block (another model or other --modules?). Re-run `layercap damage`.")

    # ---- JSON ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": DAMAGE_SCHEMA, "model": self.model, "method": self.method, "structure": self.structure,
            "blocks": list(self.blocks), "params": [int(p) for p in self.params], "levels": list(self.levels),
            "kl": self.kl, "dnll": self.dnll, "obd": self.obd, "agreement": self.agreement,
            "dense_nll": self.dense_nll, "calibration": self.calibration, "cost": self.cost,
            "complete": self.complete, "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, doc: Any, source: str = "damage") -> "DamageTable":
        if not isinstance(doc, dict):
            raise LayercapError(f"{source}: expected a JSON object with \"schema\": {DAMAGE_SCHEMA!r}.")
        if doc.get("schema") != DAMAGE_SCHEMA:
            raise LayercapError(f"{source}: field 'schema' is {doc.get('schema')!r}; expected {DAMAGE_SCHEMA!r} "
                                "(create one with `layercap damage MODEL -o damage.json`).")
        missing = [k for k in ("model", "method", "blocks", "params", "levels", "kl", "dnll") if k not in doc]
        if missing:
            raise LayercapError(f"{source}: missing field(s) {', '.join(missing)}.")
        return cls(model=doc["model"], method=doc["method"], blocks=doc["blocks"], params=doc["params"],
                   levels=doc["levels"], kl=doc["kl"], dnll=doc["dnll"], structure=doc.get("structure", "unstructured"),
                   obd=doc.get("obd", {}), agreement=doc.get("agreement", {}), dense_nll=doc.get("dense_nll"),
                   calibration=doc.get("calibration", {}), cost=doc.get("cost", {}),
                   complete=doc.get("complete", True), metadata=doc.get("metadata", {}), source=source)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "DamageTable":
        doc = read_json(path, "damage table", "Create one with `layercap damage MODEL --data TEXT -o damage.json`.")
        return cls.from_dict(doc, str(path))


def load_for(path: str | Path, names: Sequence[str], params: Sequence[int] | None = None,
             model: str | None = None) -> DamageTable:
    """Load a damage table and check it was measured on these blocks (LayercapError otherwise)."""
    table = DamageTable.load(path)
    table.check_compatible(names, params, model)
    return table


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):  # average ties
            idx = v == val
            r[idx] = r[idx].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


# ---- convex envelopes -----------------------------------------------------------------------
def lower_envelope(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (xs, ys) of the lower convex hull of points (x_i, y_i), x increasing, with (0, 0) added.

    Points with equal x keep the lowest y. Returns float64 arrays, xs[0] = 0, ys[0] = 0.
    """
    pts = {0.0: 0.0}
    for a, b in zip(x, y):
        a, b = float(a), float(b)
        pts[a] = min(b, pts.get(a, math.inf)) if a != 0.0 else 0.0
    xs = sorted(pts)
    hull: list[tuple[float, float]] = []
    for a in xs:
        b = pts[a]
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord (cross product >= 0)
            if (x2 - x1) * (b - y1) - (y2 - y1) * (a - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append((a, b))
    return np.array([h[0] for h in hull]), np.array([h[1] for h in hull])


def envelope_value(xs: np.ndarray, ys: np.ndarray, rho: float) -> float:
    """psi(rho) by linear interpolation between the envelope vertices (rho within [0, xs[-1]])."""
    return float(np.interp(rho, xs, ys))


def _clip_envelope(xs, ys, lo, hi):
    """Envelope restricted to [lo, hi]: vertices inside plus interpolated end points."""
    inner = (xs > lo) & (xs < hi)
    nx = np.concatenate([[lo], xs[inner], [hi]])
    ny = np.concatenate([[np.interp(lo, xs, ys)], ys[inner], [np.interp(hi, xs, ys)]])
    if hi == lo:
        nx, ny = nx[:1], ny[:1]
    return nx, ny


# ---- the program ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DamageSolution:
    """Continuous and discrete solutions of the damage program.

    rho: (K,) continuous ratios (sum N rho = target exactly, mode exact); lam: the dual price per
    pruned weight (nats per token per weight) at the optimum; objective: sum psi_k(rho_k) (+ size
    term). rho_discrete: (K,) measured levels (envelope vertices), sum N rho >= target;
    objective_discrete; gap = objective_discrete - objective (certified).
    """

    rho: np.ndarray
    lam: float
    objective: float
    rho_discrete: np.ndarray
    objective_discrete: float
    gap: float
    achieved: float
    achieved_discrete: float
    hi: float


def _segments(envelopes, N):
    """All envelope segments: arrays (block, x0, x1, slope per weight), sorted by slope (ties: block, x)."""
    rows = []
    for k, (xs, ys) in enumerate(envelopes):
        for i in range(len(xs) - 1):
            dx = xs[i + 1] - xs[i]
            if dx > 0:
                rows.append((k, xs[i], xs[i + 1], (ys[i + 1] - ys[i]) / (N[k] * dx)))
    rows.sort(key=lambda r: (r[3], r[0], r[1]))
    return rows


def take_segments(envelopes, weights, start, target: float, *, beyond: float = -math.inf,
                  stop_at: float = math.inf) -> tuple[np.ndarray, float, float]:
    """The fractional knapsack over convex envelope segments: the exact dual search.

    ``envelopes``: per block (xs, ys) convex piecewise linear, starting at ``start[k]``;
    ``weights``: (K,) the constraint's weight per unit of x. Segments are taken whole in order of
    their slope per unit weight until sum weights x reaches ``target`` (the last one partially);
    a segment with slope < ``beyond`` is taken whole even past the target; none with slope >=
    ``stop_at`` is taken. Returns (x, sum weights x, the slope of the last segment taken =
    the dual price; -inf when none was)."""
    x = np.asarray(start, dtype=np.float64).copy()
    used = float(np.dot(weights, x))
    lam = -math.inf
    for k, x0, x1, slope in _segments(envelopes, weights):
        if slope >= stop_at:
            break
        room = target - used
        if room <= 0 and not slope < beyond:
            break
        take = (x1 - x0) if slope < beyond else min(x1 - x0, room / weights[k])
        x[k] = x0 + take
        used += take * weights[k]
        lam = slope
        if take < x1 - x0:
            break
    return x, used, lam


def solve_damage_program(damage: np.ndarray, levels: Sequence[float], params: Sequence[float], sparsity: float, *,
                         min_ratio: float = 0.0, max_ratio: float = 0.95, size_weight: float = 0.0,
                         mode: str = "exact", around: Sequence[float] | None = None,
                         radius: float | None = None) -> DamageSolution:
    """Solve the program of the module docstring. ``damage``: (K, L) measured values at ``levels``
    (L,); ``params``: (K,) N_k. The upper bound is min(max_ratio, max level): no extrapolation.
    ``around`` (K,) and ``radius``: a trust region, |rho_k - around_k| <= radius on top of the box
    (for curves measured at an operating point, which they describe only near it)."""
    D = np.asarray(damage, dtype=np.float64)
    N = np.asarray(params, dtype=np.float64)
    lv = np.asarray(check_levels(levels, "levels"), dtype=np.float64)
    if D.ndim != 2 or D.shape != (N.size, lv.size):
        raise LayercapError(f"damage must have shape (blocks, levels) = ({N.size}, {lv.size}), got {D.shape}.")
    if not np.all(np.isfinite(D)):
        raise LayercapError("damage values must all be finite (a partial table? finish it with `layercap damage --resume`).")
    if not np.all(np.isfinite(N)) or np.any(N < 1):
        raise LayercapError("params must be >= 1 for every block.")
    if mode not in PROGRAM_MODES:
        raise LayercapError(f"mode {mode!r} is unknown; use one of {', '.join(PROGRAM_MODES)}.")
    if not (math.isfinite(size_weight) and size_weight >= 0):
        raise LayercapError(f"size_weight = {size_weight!r} must be >= 0.")
    hi = min(float(max_ratio), float(lv[-1]))
    lo = float(min_ratio)
    if not 0.0 <= lo <= hi:
        raise LayercapError(f"need 0 <= min_ratio ({lo}) <= min(max_ratio, largest measured level) ({hi}).")
    s = float(sparsity)
    if not (math.isfinite(s) and lo <= s <= hi):
        raise LayercapError(f"sparsity {s!r} is outside [min_ratio, min(max_ratio, largest level)] = [{lo}, {hi}]; "
                            "measure higher levels (--levels ... 0.9) or change the bounds.")
    total = float(N.sum())
    target = s * total
    los, his = np.full(N.size, lo), np.full(N.size, hi)
    if (around is None) != (radius is None):
        raise LayercapError("a trust region needs both the operating point (around) and its radius.")
    if radius is not None:
        c = np.asarray(around, dtype=np.float64)
        if c.shape != N.shape or not np.all(np.isfinite(c)) or not (math.isfinite(radius) and radius > 0):
            raise LayercapError(f"trust region: around must list {N.size} finite ratios and radius must be > 0, got {radius!r}.")
        los, his = np.maximum(los, c - radius), np.minimum(his, c + radius)
        if np.any(los > his) or not float(N @ los) - 1e-9 * total <= target <= float(N @ his) + 1e-9 * total:
            raise LayercapError(f"trust region of radius {radius:g} around the operating point cannot meet sparsity {s:g} "
                                "within the bounds; widen it.")
    full = [lower_envelope(lv, D[k]) for k in range(N.size)]
    envs = [_clip_envelope(xs, ys, los[k], his[k]) for k, (xs, ys) in enumerate(full)]
    # "at-least" keeps taking segments whose slope is below the size reward w (they lower the objective)
    rho, _, lam = take_segments(envs, N, los, target, beyond=size_weight if mode == "at-least" else -math.inf)
    rho = np.clip(rho, los, his)

    def obj(r):
        return float(sum(np.interp(r[k], *full[k]) for k in range(N.size)) + size_weight * float(N @ (1.0 - r)))

    # discrete: every block at an envelope vertex; a block strictly inside a segment moves up to
    # its next vertex (so sum N rho >= target). Blocks at lo/hi that are not vertices keep them.
    disc = rho.copy()
    for k, (xs, ys) in enumerate(envs):
        if not np.any(np.isclose(xs, rho[k], rtol=0, atol=1e-12)):
            nxt = xs[xs > rho[k]]
            disc[k] = float(nxt[0]) if nxt.size else his[k]
    o, od = obj(rho), obj(disc)
    return DamageSolution(rho=rho, lam=float(lam if math.isfinite(lam) else 0.0), objective=o, rho_discrete=disc,
                          objective_discrete=od, gap=max(od - o, 0.0), achieved=float(N @ rho / total),
                          achieved_discrete=float(N @ disc / total), hi=hi)


def ratios_from_damage(table: DamageTable, sparsity: float, *, source: str = "kl", min_ratio: float = 0.0,
                       max_ratio: float = 0.95, size_weight: float = 0.0, mode: str = "exact",
                       discrete: bool = False, rule: str | None = None, radius: float | None = None) -> PruningRatios:
    """Per-block pruning ratios minimising the summed convex damage at the target sparsity.

    ``source``: kl (rule ``mdl:damage``), dnll, obd-diag / obd-kfac (rule ``mdl:obd``).
    ``discrete``: return the measured-level solution (achieved >= sparsity) instead of the
    continuous one (achieved = sparsity). Both objectives and the certified gap are in metadata.
    """
    D = table.values(source)
    if np.isnan(D).any():
        raise LayercapError(f"{table.source}: the {source} damage table is partial (unmeasured entries); finish it "
                            "with `layercap damage ... --resume` before computing ratios.")
    around = None
    if radius is not None:  # the trust region is around the table's operating point
        ctx = table.metadata.get("context")
        if not ctx:
            raise LayercapError(f"{table.source}: a trust region needs a table measured in context (layercap damage --context).")
        around = [ctx["ratios"][b] for b in table.blocks]
    sol = solve_damage_program(D, table.levels, table.params, sparsity, min_ratio=min_ratio, max_ratio=max_ratio,
                               size_weight=size_weight, mode=mode, around=around, radius=radius)
    rho = sol.rho_discrete if discrete else sol.rho
    lo, hi = float(min_ratio), sol.hi
    warnings = []
    if sol.hi < max_ratio:
        warnings.append(f"ratios capped at the largest measured level {sol.hi:g} (< max_ratio {max_ratio:g}): "
                        "the damage curves are not extrapolated.")
    layers = [RatioLayer(name, float(rho[k]), int(table.params[k])) for k, name in enumerate(table.blocks)]
    achieved = sol.achieved_discrete if discrete else sol.achieved
    name = rule or ("mdl:obd" if source.startswith("obd") else "mdl:damage")
    return PruningRatios(
        rule=name, sparsity=float(sparsity), mode=mode, layers=layers, achieved=float(min(max(achieved, 0.0), 1.0)),
        nu=sol.lam, clipped=int(np.sum((rho <= lo + 1e-12) | (rho >= hi - 1e-12))), warnings=warnings,
        metadata={"source": source, "damage_model": table.model, "damage_method": table.method, "levels": table.levels,
                  "min_ratio": lo, "max_ratio": float(max_ratio), "size_weight": size_weight, "discrete": discrete,
                  "radius": radius,
                  "objective": sol.objective, "objective_discrete": sol.objective_discrete, "gap": sol.gap,
                  "rho_continuous": sol.rho.tolist(), "rho_discrete": sol.rho_discrete.tolist()},
    )
