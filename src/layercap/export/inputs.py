"""Inputs of ``layercap export``: the decision record (ratios or allocation) and, optionally, a model.

``load_decisions(path)`` reads a ``layercap.ratios/v1`` or ``layercap.allocation/v1`` file,
dispatching on its ``schema`` field; anything else is a LayercapError naming the file, the field
and the command that makes the right file. ``model_skeleton(spec)`` gives the module structure
the exporters need (names, weight shapes) without reading weights when it can: a
``save_pretrained`` directory is built from its ``config.json`` on the meta device, so a 7B model
costs nothing; other specs (``smollm2``, ``tiny-llama``, ``.gguf``) are loaded normally.
"""

from __future__ import annotations

import os
from pathlib import Path

from layercap.errors import LayercapError
from layercap.io import read_json
from layercap.programs.records import ALLOCATION_SCHEMA, RATIOS_SCHEMA, Allocation, PruningRatios

HINT = ("Pass a ratios file from `layercap prune-ratios SCORES --sparsity 0.5 -o ratios.json` or an allocation "
        "from `layercap allocate SCORES --budget B -o allocation.json`.")


def load_decisions(path: str | os.PathLike) -> PruningRatios | Allocation:
    """The record in ``path``: PruningRatios or Allocation (validated on load)."""
    doc = read_json(path, "decisions file", HINT)
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema == RATIOS_SCHEMA:
        return PruningRatios.from_dict(doc, str(path))
    if schema == ALLOCATION_SCHEMA:
        return Allocation.from_dict(doc, str(path))
    raise LayercapError(
        f"{path}: field 'schema' is {schema!r}; expected {RATIOS_SCHEMA!r} or {ALLOCATION_SCHEMA!r}. {HINT}"
    )


def require_kind(decisions, kind: type, fmt: str, path: str | os.PathLike) -> None:
    """Raise unless ``decisions`` is a ``kind`` record (each format reads one kind)."""
    if not isinstance(decisions, kind):
        want = RATIOS_SCHEMA if kind is PruningRatios else ALLOCATION_SCHEMA
        raise LayercapError(f"{path}: --format {fmt} needs a {want} file, not a {type(decisions).__name__} record. {HINT}")


def allocation_counts(allocation: Allocation, path: str | os.PathLike) -> dict[str, int]:
    """Block name -> whole number of units; a fractional allocation is refused (PEFT ranks are integers)."""
    out = {}
    for layer in allocation.layers:
        if not float(layer.n).is_integer():
            raise LayercapError(
                f"{path}: layers[{layer.name!r}].n = {layer.n!r} is not a whole number; LoRA ranks are integers. "
                "Re-allocate with integer units (`layercap allocate SCORES --budget B`, without --continuous)."
            )
        out[layer.name] = int(layer.n)
    return out


def model_skeleton(spec: str | os.PathLike, dtype: str = "float32"):
    """The model's modules (weights on the meta device for a ``save_pretrained`` directory)."""
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise LayercapError(f"--model {spec}: cannot read config.json ({exc}).") from exc
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return model
    from layercap.models import load_model

    model, _ = load_model(spec, dtype=dtype, device="cpu", with_tokenizer=False)
    return model


def check_not_input(output: str | os.PathLike, inputs: list[str | os.PathLike | None]) -> None:
    """Refuse an output path that is one of the inputs, or lies inside an input model directory."""
    out = Path(output).resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if out == src or (src.is_dir() and src in out.parents):
            raise LayercapError(
                f"-o {output} would overwrite or write into the input {item}; choose another output path."
            )
