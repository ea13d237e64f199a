"""Save a pruned checkpoint in compressed-tensors' sparse bitmask format (``prune --save-format compressed-tensors``).

:func:`compress_checkpoint` rewrites a dense ``save_pretrained`` directory in place (call it on
the temporary directory of an atomic write): the weight of every listed Linear is replaced by its
bitmask encoding (``sparse-bitmask``; ``sparse-24-bitmask`` for 2:4) and config.json gets the
``quantization_config`` / ``sparsity_config`` entry compressed-tensors writes. The layout and the
config are those of compressed-tensors <= 0.14 (see :mod:`layercap.models.sparse_format`, which
also decodes them; ``layercap.models.load_model`` reads such checkpoints back).

Why not compressed-tensors' own compressor: compressed-tensors 0.15+ removed the sparse
compressors (0.20 keeps only the config classes), transformers 5 requires compressed-tensors >= 0.15,
and compressed-tensors 0.14 requires transformers < 5, so no installable pair encodes or decodes
these formats next to this project's transformers. The test suite checks the layout bit by bit
against the format definition and the round trip to identical logits.

A module is only encoded when that makes it smaller: unstructured bitmask storage costs
(1 - s) b + 1/8 bytes per weight (+ 8 bytes per row), so a module below about 1/(8 b) sparsity
(3 % in float32, 6 % in bfloat16) stays dense.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from layercap.errors import LayercapError
from layercap.io import atomic_write_json, read_json
from layercap.models.sparse_format import BITMASK, BITMASK_24, shard_files, encode

LAYOUT_VERSION = "0.14.0"  # compressed-tensors release whose sparse layout this writes
FORMAT_FOR = {"unstructured": BITMASK, "2:4": BITMASK_24}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def check_structure(structure: str) -> None:
    """Raise (before any pruning work) unless compressed-tensors has a sparse format for ``structure``."""
    if structure not in FORMAT_FOR:
        raise LayercapError(f"--save-format compressed-tensors supports unstructured and 2:4 sparsity, not {structure!r} "
                            "(compressed-tensors has no N:M format other than 2:4); save with --save-format dense.")


def compress_checkpoint(directory: str | os.PathLike, modules: list[str], structure: str = "unstructured") -> dict:
    """Encode the weights of ``modules`` (full Linear names) in ``directory``; returns a summary.

    Summary: ``{"format", "modules": [encoded names], "dense_bytes", "stored_bytes"}`` (tensor
    bytes of the encoded weights before and after) and ``"global_sparsity"`` (zero fraction of all
    floating-point parameters, as compressed-tensors reports it).
    """
    from safetensors.torch import load_file, save_file

    check_structure(structure)
    fmt = FORMAT_FOR[structure]
    directory = Path(directory)
    wanted = {f"{m}.weight" for m in modules}
    index_path = directory / "model.safetensors.index.json"
    index = read_json(index_path, "weight index") if index_path.is_file() else None
    encoded, seen, dense_bytes, stored_bytes, zeros, total = [], set(), 0, 0, 0, 0
    for shard in shard_files(directory):
        tensors = load_file(str(shard))
        metadata = _metadata(shard)
        out = {}
        for key, t in tensors.items():
            if t.is_floating_point():
                zeros += int((t == 0).sum())
                total += t.numel()
            if key not in wanted:
                out[key] = t
                continue
            seen.add(key)
            prefix = key[: -len(".weight")]
            params = encode(t, fmt)  # 2:4 raises unless every group of 4 keeps at most 2
            if fmt == BITMASK and _nbytes(params.values()) >= _nbytes([t]):
                out[key] = t  # too dense to gain
                continue
            dense_bytes += _nbytes([t])
            stored_bytes += _nbytes(params.values())
            encoded.append(prefix)
            for name, value in params.items():
                out[f"{prefix}.{name}"] = value
                if index is not None:
                    index["weight_map"][f"{prefix}.{name}"] = shard.name
            if index is not None:
                index["weight_map"].pop(key, None)
        tmp = shard.with_name(f".{shard.name}.tmp")
        save_file(out, str(tmp), metadata=metadata)
        os.replace(tmp, shard)
    missing = sorted(wanted - seen)
    if missing:
        raise LayercapError(f"{directory}: no weight {missing[0]!r} in the checkpoint; cannot compress it.")
    if index is not None:
        atomic_write_json(index_path, index)
    global_sparsity = zeros / total if total else 0.0
    _update_config(directory, fmt, structure, sorted(encoded), global_sparsity)
    return {"format": fmt, "modules": sorted(encoded), "dense_bytes": dense_bytes, "stored_bytes": stored_bytes,
            "global_sparsity": global_sparsity}


def _metadata(shard: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        return dict(f.metadata() or {"format": "pt"})


def _update_config(directory: Path, fmt: str, structure: str, targets: list[str], global_sparsity: float) -> None:
    cfg_path = directory / "config.json"
    cfg = read_json(cfg_path, "model config")
    if cfg.get("quantization_config"):
        raise LayercapError(f"{directory}: the model already has a quantization_config; sparse compression of a quantized "
                            "model is not supported, save with --save-format dense.")
    cfg["quantization_config"] = {
        "version": LAYOUT_VERSION,
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": fmt, "targets": targets, "ignore": [], "global_sparsity": float(global_sparsity),
            "sparsity_structure": "2:4" if structure == "2:4" else "unstructured", "registry_requires_subclass": False,
        },
        "transform_config": {},
    }
    atomic_write_json(cfg_path, cfg)


def compress_pruned(directory: str | os.PathLike, blocks, ratios, structure: str = "unstructured") -> dict:
    """:func:`compress_checkpoint` for every Linear that ``ratios`` (block or module name -> ratio, as
    given to ``prune_model``) prunes in ``blocks`` (``find_blocks`` of the model); dense ones stay dense."""
    from layercap.apply.prune import module_ratios

    per_module = module_ratios(blocks, ratios, structure)
    return compress_checkpoint(directory, [m for m, r in per_module.items() if r > 0], structure)
