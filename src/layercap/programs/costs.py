"""Per-layer unit costs from a file (``--cost FILE``), read through the checked input layer.

Formats: CSV with columns ``name,cost``; JSON ``{name: cost}``; a JSON list of K costs in layer
order; or a scores/allocation JSON whose ``layers`` entries carry ``cost``. Every layer of the
scores file needs a cost, and a cost for a layer that the scores file does not have is an error
(a typo would otherwise be ignored silently). numpy only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from layercap.errors import LayercapError
from layercap.io import check_number, read_csv, read_json

HINT = "Use count, params, or a CSV (name,cost) / JSON {name: cost} file."


def read_costs(path: str, names: Sequence[str], flag: str = "--cost") -> np.ndarray:
    """(K,) float64 costs, one per name of ``names`` (in that order), each finite and > 0."""
    file = Path(path)
    what = f"{flag} file"
    if file.suffix.lower() == ".csv":
        rows = read_csv(file, what, required=("name", "cost"), hint=HINT)
        by_name = {}
        for i, row in enumerate(rows, start=1):
            if row["name"] in by_name:
                raise LayercapError(f"{flag} {path}: layer {row['name']!r} has two costs (row {i}); give one per layer.")
            by_name[row["name"]] = row["cost"]
    else:
        doc = read_json(file, what, HINT)
        if isinstance(doc, dict) and isinstance(doc.get("layers"), list):  # a scores/allocation file with costs
            by_name = {}
            for i, item in enumerate(doc["layers"]):
                if not isinstance(item, dict) or "name" not in item or "cost" not in item:
                    raise LayercapError(f"{flag} {path}: layers[{i}] needs 'name' and 'cost'.")
                by_name[str(item["name"])] = item["cost"]
        elif isinstance(doc, dict):
            by_name = doc
        elif isinstance(doc, list):
            if len(doc) != len(names):
                raise LayercapError(f"{flag} {path}: list has {len(doc)} costs for {len(names)} layers; give one per layer.")
            by_name = dict(zip(names, doc))
        else:
            raise LayercapError(f"{flag} {path}: expected {{name: cost}} or a list of costs, got {type(doc).__name__}.")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise LayercapError(f"{flag} {path}: no cost for layer(s) {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                            "give one per layer of the scores file.")
    unknown = [n for n in by_name if n not in set(names)]
    if unknown:
        raise LayercapError(f"{flag} {path}: cost for layer(s) {unknown[:3]} that the scores file does not have; "
                            "fix the names (they must match the scores file).")
    return np.array([float(check_number(by_name[n], f"cost of {n!r}", f"{flag} {path}", minimum=0, exclusive_minimum=True))
                     for n in names], dtype=np.float64)
