"""The scores file: the interface between scoring (torch) and the programs (numpy).

JSON schema (``layercap.scores/v1``)::

    {
      "schema": "layercap.scores/v1",
      "method": "kfac",                 # what produced zeta2 (optional)
      "metadata": {...},                # free-form: model, data, data_sha256, damping, tokens,
                                        # wall_time_s, peak_memory_bytes, versions (optional)
      "layers": [
        {"name": "model.layers.0",      # unique, non-empty
         "zeta2": 0.0123,               # finite, >= 0; nats/token (x2) for curvature methods,
                                        # the raw per-layer score for baseline sources
         "params": 1769472,             # int >= 1: trainable parameters of the block
         "cost": 1.0},                  # optional, > 0: resource cost of one capacity unit
        ...
      ]
    }

Per-layer extras live in ``metadata.method_info``: any list there of length K is aligned with
``layers`` (same order). The built-in methods write ``damping_lambda`` (lambda_k); the
calibrated methods (``diag-tr``, ``kfac-tr``, ``ekfac-tr``, ``exact-tr``, ``gain``; see
``layercap.scores.trust_region``) add ``initial_lambda`` (the damping rule's lambda_k),
``tr_ratio`` (r_k = measured decrease / (zeta2 / 2) at the accepted lambda), ``tr_accepted``,
``tr_evals`` (forward passes of the search), ``predicted_decrease`` (zeta2 / 2 of the accepted
step), ``measured_decrease`` and ``tr_history`` (per layer a list of [lambda, r] trials); ``gain``
adds ``gain_scale`` (line-search t) and ``gain_decrease``. Scalars there (``base_loss``,
``forward_passes``, ``tr_band``, ``timing``) describe the run. Readers ignore what they do not know.

``q`` (the normalised quality scores, on the simplex) is derived, never stored.
CSV in and out: a header ``name,zeta2,params`` with an optional ``cost`` column.
No torch here: programs/ and the CLI's program commands import this module alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layercap.errors import LayercapError
from layercap.io import atomic_write_csv, atomic_write_json, check_number, read_csv, read_json

SCHEMA = "layercap.scores/v1"


@dataclass(frozen=True)
class LayerScore:
    name: str
    zeta2: float
    params: int
    cost: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "zeta2": float(self.zeta2), "params": int(self.params)}
        if self.cost is not None:
            d["cost"] = float(self.cost)
        return d


@dataclass
class LayerScores:
    """Per-layer scores of one model (K layers, in model order)."""

    layers: list[LayerScore]
    method: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived views (numpy arrays of shape (K,)) -------------------------------------
    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def zeta2(self) -> np.ndarray:
        return np.array([layer.zeta2 for layer in self.layers], dtype=np.float64)

    @property
    def params(self) -> np.ndarray:
        return np.array([layer.params for layer in self.layers], dtype=np.int64)

    @property
    def q(self) -> np.ndarray:
        """zeta2 / sum(zeta2): non-negative, sums to 1."""
        z = self.zeta2
        with np.errstate(over="ignore"):
            total = z.sum()
        if not np.isfinite(total):  # huge scores (e.g. 1e308 each) overflow the sum: rescale first
            z = z / z.max()
            total = z.sum()
        return z / total

    def costs(self) -> np.ndarray | None:
        if self.layers[0].cost is None:
            return None
        return np.array([layer.cost for layer in self.layers], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.layers)

    # ---- validation ---------------------------------------------------------------------
    def validate(self, source: str = "scores") -> None:
        if not self.layers:
            raise LayercapError(f"{source}: 'layers' is empty; a scores file needs at least one layer.")
        seen: set[str] = set()
        has_cost = self.layers[0].cost is not None
        for i, layer in enumerate(self.layers):
            where = f"{source}: layers[{i}]"
            if not isinstance(layer.name, str) or not layer.name:
                raise LayercapError(f"{where}.name must be a non-empty string, got {layer.name!r}.")
            if layer.name in seen:
                raise LayercapError(f"{where}.name {layer.name!r} appears twice; layer names must be unique.")
            seen.add(layer.name)
            z = layer.zeta2
            if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z < 0:
                raise LayercapError(
                    f"{where}.zeta2 = {z!r} for {layer.name!r}: scores must be finite and >= 0. "
                    "Re-run scoring (NaN usually means a diverged model or fp16 overflow; try --dtype float32)."
                )
            p = layer.params
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1:
                raise LayercapError(f"{where}.params = {p!r} for {layer.name!r}: must be an integer >= 1.")
            if (layer.cost is not None) != has_cost:
                raise LayercapError(f"{where}.cost: give a cost for every layer or for none.")
            if layer.cost is not None:
                c = layer.cost
                if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
                    raise LayercapError(f"{where}.cost = {c!r} for {layer.name!r}: costs must be finite numbers > 0.")
        if not any(layer.zeta2 > 0 for layer in self.layers):
            raise LayercapError(
                f"{source}: every zeta2 is 0, so the normalised scores q are undefined. "
                "Check the calibration data (empty or all padding?) and the scoring method."
            )

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": SCHEMA}
        if self.method is not None:
            d["method"] = self.method
        if self.metadata:
            d["metadata"] = self.metadata
        d["layers"] = [layer.to_dict() for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, doc: Any, source: str = "scores") -> "LayerScores":
        if not isinstance(doc, dict):
            raise LayercapError(f"{source}: expected a JSON object with a 'layers' list, got {type(doc).__name__}.")
        schema = doc.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise LayercapError(f"{source}: unknown schema {schema!r}; this layercap reads {SCHEMA!r}.")
        layers_doc = doc.get("layers")
        if not isinstance(layers_doc, list):
            raise LayercapError(
                f"{source}: missing 'layers' list. Expected {{\"layers\": [{{\"name\": ..., \"zeta2\": ..., \"params\": ...}}]}}."
            )
        layers = []
        for i, item in enumerate(layers_doc):
            if not isinstance(item, dict):
                raise LayercapError(f"{source}: layers[{i}] must be an object, got {type(item).__name__}.")
            for key in ("name", "zeta2", "params"):
                if key not in item:
                    raise LayercapError(f"{source}: layers[{i}] has no {key!r} field; every layer needs name, zeta2, params.")
            unknown = set(item) - {"name", "zeta2", "params", "cost"}
            if unknown:
                raise LayercapError(
                    f"{source}: layers[{i}] has unknown field(s) {sorted(unknown)}; allowed: name, zeta2, params, cost."
                )
            zeta2 = item["zeta2"]
            if zeta2 is None:
                zeta2 = float("nan")
            layers.append(LayerScore(name=item["name"], zeta2=zeta2, params=item["params"], cost=item.get("cost")))
        method = doc.get("method")
        if method is not None and not isinstance(method, str):
            raise LayercapError(f"{source}: 'method' = {method!r} must be a string (the score method's name) or absent.")
        metadata = doc.get("metadata", {})
        if not isinstance(metadata, dict):
            raise LayercapError(f"{source}: 'metadata' must be an object.")
        out = cls.__new__(cls)
        out.layers, out.method, out.metadata = layers, doc.get("method"), metadata
        out.validate(source)
        return out

    # ---- files --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write JSON, or CSV when the suffix is .csv (atomically)."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            has_cost = self.layers[0].cost is not None
            header = ["name", "zeta2", "params"] + (["cost"] if has_cost else [])
            rows = [[l.name, repr(float(l.zeta2)), int(l.params)] + ([repr(float(l.cost))] if has_cost else []) for l in self.layers]
            return atomic_write_csv(path, header, rows)
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "LayerScores":
        path = Path(path)
        hint = f"Create one with `layercap score MODEL --data PATH -o {path.name}`."
        if path.suffix.lower() == ".csv":
            return cls._load_csv(path)
        doc = read_json(path, "scores file", hint)
        return cls.from_dict(doc, source=str(path))

    @classmethod
    def _load_csv(cls, path: Path) -> "LayerScores":
        rows = read_csv(path, "scores file", required=("name", "zeta2", "params"),
                        hint="Expected a header 'name,zeta2,params' (optional 'cost').",
                        allowed=("name", "zeta2", "params", "cost"))
        layers = []
        for i, row in enumerate(rows, start=1):
            where = f"{path}: row {i} ({row['name']!r})"
            zeta2 = check_number(row["zeta2"], "zeta2", where, minimum=0)
            params = check_number(row["params"], "params", where, integer=True, minimum=1)
            cost = check_number(row["cost"], "cost", where, minimum=0, exclusive_minimum=True) if row.get("cost") else None
            layers.append(LayerScore(name=row["name"], zeta2=float(zeta2), params=params, cost=None if cost is None else float(cost)))
        out = cls.__new__(cls)
        out.layers, out.method, out.metadata = layers, None, {}
        out.validate(str(path))
        return out

    def with_costs(self, costs: np.ndarray | None) -> "LayerScores":
        layers = [LayerScore(l.name, l.zeta2, l.params, None if costs is None else float(c)) for l, c in zip(self.layers, costs if costs is not None else [None] * len(self.layers))]
        return LayerScores(layers, self.method, dict(self.metadata))
