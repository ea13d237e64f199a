"""``score_model``: one call from a model and calibration data to a :class:`LayerScores` record."""

from __future__ import annotations

import platform
import resource
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from layercap.errors import LayercapError
from layercap.models.load import model_source as _model_source
from layercap.scorefile import LayerScore, LayerScores
from layercap.scores.groups import param_groups
from layercap.scores.registry import ScoreOptions, get_method


def peak_memory_bytes(device: str | torch.device) -> int:
    """torch.cuda.max_memory_allocated on CUDA, else the process's peak RSS (ru_maxrss)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def versions() -> dict[str, str]:
    import transformers

    from layercap import __version__

    return {"layercap": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def model_source(model: nn.Module) -> str:
    return str(_model_source(model))


def score_model(
    model: nn.Module,
    method: str,
    calib=None,
    *,
    granularity: str | dict[str, str] = "block",
    options: ScoreOptions | None = None,
    blocks_regex: str | None = None,
    modules_regex: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> LayerScores:
    """Score every parameter group of ``model`` with ``method`` (a registry name).

    ``calib``: a CalibrationSet (windows of token ids) for data-driven methods. The model is
    not modified (parameters' requires_grad flags and train/eval mode are restored). Under an
    initialised torch.distributed group every rank processes its shard of ``calib`` and all
    ranks return the same scores. zeta2 is in nats/token x 2 (SPEC section 1).
    """
    options = options or ScoreOptions()
    options.validate()
    score_method = get_method(method)
    if score_method.needs_data and calib is None:
        raise LayercapError(f"method {method!r} needs calibration data; pass --data PATH.")
    groups = param_groups(model, granularity, blocks_regex=blocks_regex, modules_regex=modules_regex)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = score_method(model, groups, calib, options)
    wall = time.perf_counter() - start
    zeta2, info = (result if isinstance(result, tuple) else (result, {}))
    zeta2 = np.asarray(zeta2, dtype=np.float64)
    if zeta2.shape != (len(groups),):
        raise LayercapError(f"method {method!r} returned shape {zeta2.shape}, expected ({len(groups)},); this is a bug in the method.")
    bad = [g.name for g, z in zip(groups, zeta2) if not np.isfinite(z) or z < 0]
    if bad:
        raise LayercapError(
            f"method {method!r} gave non-finite or negative zeta2 for {bad[:3]}; the model may have diverged "
            "or overflowed (try --dtype float32) or the damping is too small."
        )
    meta: dict[str, Any] = {
        "method": method,
        "model": model_source(model),
        "granularity": granularity if isinstance(granularity, str) else {"groups": granularity},
        "blocks_regex": blocks_regex,
        "modules_regex": modules_regex,
        "damping": options.damping,
        "damping_mode": options.damping_mode,
        "fisher": options.fisher,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "device": str(device),
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "wall_time_s": wall,
        "peak_memory_bytes": peak_memory_bytes(device),
        "versions": versions(),
    }
    if calib is not None:
        meta.update({"data": calib.source, "data_sha256": calib.sha256, "nsamples": int(calib.input_ids.shape[0]),
                     "seqlen": int(calib.input_ids.shape[1]), "tokens": calib.num_tokens,
                     "predicted_tokens": int(calib.input_ids.shape[0] * (calib.input_ids.shape[1] - 1)),
                     "bos": calib.bos.to_dict()})
    if info:
        meta["method_info"] = info
    meta.update(metadata or {})
    layers = [LayerScore(g.name, float(z), g.num_params) for g, z in zip(groups, zeta2)]
    return LayerScores(layers, method=method, metadata=meta)
