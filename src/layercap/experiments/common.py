"""What every job and sweep shares: device choice, model fingerprints, scores as a stage,
block-size views of scores, and the machine description recorded with results."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from layercap.errors import LayercapError
from layercap.experiments.runner import hash_output

VOLATILE_KEYS = frozenset({"timing", "timings", "wall_time_s", "seconds", "peak_memory_bytes"})


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; other values unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str, field: str = "device") -> str:
    """``device`` (``auto`` resolved) if torch can use it; a LayercapError naming ``field`` otherwise."""
    from layercap.models.checks import check_device as _check

    return _check(resolve_device(device), field)


def is_tiny(spec: str) -> bool:
    return str(spec).startswith("tiny-") and not Path(spec).exists()


def model_fingerprint(spec: str) -> dict[str, Any]:
    """Identifies the model weights without reading gigabytes: file names, sizes, mtimes; plus
    the full SHA-256 of small models (under 1 GiB). ``tiny-<family>`` specs are their own id."""
    if is_tiny(spec):
        return {"tiny": str(spec)}
    from layercap.models import resolve_model

    source = resolve_model(spec)
    root = source.directory / source.gguf_file if source.gguf_file else source.directory
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    entries = [[str(p.relative_to(root.parent if root.is_file() else root)), p.stat().st_size] for p in files]
    total = sum(size for _, size in entries)
    fp: dict[str, Any] = {"source": source.label, "files": entries}
    if total < (1 << 30):
        fp["sha256"] = hash_output(root)
    else:
        fp["mtimes"] = [p.stat().st_mtime_ns for p in files]
    return fp


def file_hash(path: str | Path, field: str) -> str:
    """SHA-256 of an input file or folder; a LayercapError naming ``field`` when it is missing."""
    path = Path(path)
    if not path.exists():
        raise LayercapError(f"{field}: {path} does not exist; fix the path.")
    return hash_output(path)


def drop_timings(doc: Any) -> Any:
    """``doc`` without timing and memory fields, at any depth. They live in ``stages.json``;
    keeping them out of the artefacts makes a resumed run's files byte-identical to an
    uninterrupted run's (and keeps downstream cache keys stable)."""
    if isinstance(doc, dict):
        return {k: drop_timings(v) for k, v in doc.items() if k not in VOLATILE_KEYS}
    if isinstance(doc, list):
        return [drop_timings(v) for v in doc]
    return doc


def read_json(path: Path) -> Any:
    """A JSON artefact of a run, checked (binary, truncated or malformed: a LayercapError naming it)."""
    from layercap.io import read_json as checked

    return checked(path, "run artefact", "It may be damaged; delete it to recompute, or choose a new -o.")


def prunable_scores(scores, prunable: dict[str, int]):
    """The same scores with ``params`` = each block's prunable (Linear) weights N_k, as the
    pruning program's constraint sum N_k rho_k = s sum N_k counts them (SPEC 3)."""
    from layercap.scorefile import LayerScore, LayerScores

    missing = [n for n in scores.names if n not in prunable]
    if missing:
        raise LayercapError(f"scores name block {missing[0]!r}, which the model does not have; rescore with block granularity.")
    layers = [LayerScore(l.name, l.zeta2, int(prunable[l.name]), l.cost) for l in scores.layers]
    return LayerScores(layers, scores.method, dict(scores.metadata))


def placeholder_scores(model):
    """Scores (all 1) naming the model's blocks, for rules that read no scores."""
    from layercap.models import find_blocks
    from layercap.scorefile import LayerScore, LayerScores

    return LayerScores([LayerScore(b.name, 1.0, b.num_params) for b in find_blocks(model)], method="none",
                       metadata={"note": "placeholder: this rule uses no scores"})


def compute_scores(model, method: str, calib, path: Path, *, batch_size: int = 4, seed: int = 0, device: str = "cpu",
                   progress: bool = False, validation=None, metadata: dict | None = None, **options) -> list[str]:
    """Score ``model`` with ``method`` on ``calib`` and save ``path`` (``layercap.scores/v1``,
    timings dropped). The scoring stage of every job and sweep. ``validation``: influence's
    held-out windows. ``options``: further :class:`~layercap.scores.ScoreOptions` fields."""
    from layercap.scores import ScoreOptions, get_method, score_model

    extra = {"validation": validation} if method == "influence" else {}
    opts = ScoreOptions(batch_size=batch_size, seed=seed, device=device, progress=progress, extra=extra, **options)
    data = calib if get_method(method).needs_data else None
    scores = score_model(model, method, data, options=opts, metadata=metadata)
    scores.metadata = drop_timings(scores.metadata)
    scores.save(path)
    return [str(path)]


def machine() -> dict[str, Any]:
    import os

    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
