"""compressed-tensors' sparse bitmask checkpoint formats: encode, decode, load.

The layout is compressed-tensors' (``sparse_compressors`` of compressed-tensors <= 0.14; the
formats are still named in ``compressed_tensors.config`` of 0.20, whose compressors and
transformers 5's loader no longer read them). For a Linear ``X`` with dense weight ``W``
(shape (rows, cols)) the safetensors key ``X.weight`` is replaced by

``sparse-bitmask`` (any zero pattern)
    ``X.shape``        int64 (2,)              the dense shape
    ``X.compressed``   W.dtype (nnz,)          the non-zero values, row-major
    ``X.bitmask``      uint8 (rows, ceil(cols/8))  ``numpy.packbits(W != 0, axis=-1, bitorder="little")``
    ``X.row_offsets``  int64 (rows,)           index in ``compressed`` where each row starts

``sparse-24-bitmask`` (every group of 4 consecutive weights of a row has at most 2 non-zeros)
    ``X.shape``        int64 (2, 1)
    ``X.compressed``   W.dtype (rows, cols/2)  the 2 kept values of each group of 4 (zeros among
                                               them stored as zeros), row-major
    ``X.bitmask``      uint8 (rows, ceil(cols/8))  the kept positions, packed as above

and ``config.json`` gets ``quantization_config = {"quant_method": "compressed-tensors",
"version", "sparsity_config": {"format", "global_sparsity", "sparsity_structure", "targets",
"ignore", "registry_requires_subclass"}, "transform_config": {}}`` (what compressed-tensors'
``ModelCompressor.update_config`` writes). Bytes per weight at sparsity s with b-byte values:
bitmask (1 - s) b + 1/8 (+ 8 per row), 2:4 b/2 + 1/8; dense b.

This module is pure torch/numpy (no compressed-tensors needed), so :func:`layercap.models.load_model`
can read such checkpoints; the writer is :mod:`layercap.export.compressed_tensors`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from layercap.errors import LayercapError
from layercap.io import read_json

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
SPARSE_FORMATS = (BITMASK, BITMASK_24)
PARAMS = {BITMASK: ("shape", "compressed", "bitmask", "row_offsets"), BITMASK_24: ("shape", "compressed", "bitmask")}


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool -> (rows, ceil(cols/8)) uint8, little bit order."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(bits.reshape(shape).astype(bool))


def encode(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Local names ("shape", "compressed", ...) -> tensors of ``weight`` in ``fmt``."""
    w = weight.detach().cpu()
    if w.dim() != 2:
        raise LayercapError(f"sparse formats store 2-D weights; got shape {tuple(w.shape)}.")
    rows, cols = w.shape
    if fmt == BITMASK:
        mask = w != 0
        counts = mask.sum(dim=-1)
        return {"shape": torch.tensor([rows, cols]), "compressed": w[mask].contiguous(), "bitmask": pack_mask(mask),
                "row_offsets": torch.cumsum(counts, 0) - counts}
    if fmt == BITMASK_24:
        if cols % 4:
            raise LayercapError(f"2:4 needs a multiple of 4 input features, got {cols}.")
        groups = w.reshape(-1, 4)
        if int(((groups != 0).sum(dim=1) > 2).sum()):
            raise LayercapError("weight is not 2:4 sparse (a group of 4 has more than 2 non-zeros); use sparse-bitmask.")
        # keep the 2 largest |w| of each group (the non-zeros, plus a zero where a group has fewer)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().float().topk(2, dim=1).indices, True)
        mask = keep.reshape(rows, cols)
        return {"shape": torch.tensor([rows, cols]).reshape(-1, 1), "compressed": w[mask].reshape(rows, cols // 2).contiguous(),
                "bitmask": pack_mask(mask)}
    raise LayercapError(f"unknown sparse format {fmt!r}; known: {', '.join(SPARSE_FORMATS)}.")


def decode(params: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    """The dense weight back from :func:`encode`'s tensors."""
    shape = [int(x) for x in params["shape"].flatten().tolist()]
    mask = unpack_mask(params["bitmask"], shape)
    out = torch.zeros(shape, dtype=params["compressed"].dtype)
    out[mask] = params["compressed"].flatten()
    return out


def sparsity_config(directory: str | os.PathLike) -> dict | None:
    """The ``sparsity_config`` of a checkpoint directory's config.json, if it is in a bitmask format."""
    cfg_path = Path(directory) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = read_json(cfg_path, "model config")
    except json.JSONDecodeError:
        return None
    sc = ((cfg.get("quantization_config") or cfg.get("compression_config") or {}).get("sparsity_config") or {})
    return sc if sc.get("format") in SPARSE_FORMATS else None


def shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / f for f in read_json(index, "weight index")["weight_map"].values()})
    single = directory / "model.safetensors"
    if not single.is_file():
        raise LayercapError(f"{directory}: no model.safetensors (or index); a compressed-tensors checkpoint is safetensors.")
    return [single]


def decoded_state_dict(directory: str | os.PathLike, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """Dense state dict of a bitmask checkpoint (every ``X.compressed`` group decoded to ``X.weight``)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    fmt = fmt or (sparsity_config(directory) or {}).get("format")
    if fmt not in SPARSE_FORMATS:
        raise LayercapError(f"{directory}: config.json has no sparse bitmask sparsity_config.")
    raw: dict[str, torch.Tensor] = {}
    for shard in shard_files(directory):
        raw.update(load_file(str(shard)))
    names = PARAMS[fmt]
    out, groups = {}, {}
    for key, t in raw.items():
        prefix, _, last = key.rpartition(".")
        if last in names and f"{prefix}.compressed" in raw:
            groups.setdefault(prefix, {})[last] = t
        else:
            out[key] = t
    for prefix, params in groups.items():
        missing = [n for n in names if n not in params]
        if missing:
            raise LayercapError(f"{directory}: {prefix} lacks {missing} for format {fmt}; the checkpoint is incomplete.")
        out[f"{prefix}.weight"] = decode(params, fmt)
    return out


def load_sparse_checkpoint(directory: str | os.PathLike, dtype: torch.dtype | None = None):
    """A ``transformers`` causal LM built from the checkpoint's config, with the decoded weights.

    transformers 5 hands a config with ``quantization_config`` to compressed-tensors >= 0.15,
    which no longer decodes sparsity formats (the weights would be missing), so the config is
    read without it and the dense state dict is loaded strictly (tied weights re-tied).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = decoded_state_dict(directory)
    model_dtype = dtype or next(iter(state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=model_dtype)
    result = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))]
    if missing or result.unexpected_keys:
        raise LayercapError(f"{directory}: checkpoint does not match its config (missing {missing[:3]}, unexpected "
                            f"{result.unexpected_keys[:3]}).")
    model.tie_weights()
    return model.eval()
