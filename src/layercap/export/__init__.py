"""Export layercap's decisions to the tools people already use.

One module per format, and a registry ``FORMATS`` (name -> :class:`Format`):

- ``llmcompressor``: a recipe YAML (SparseGPT / Wanda modifiers with per-layer sparsities), from ratios
- ``peft``:          ``adapter_config.json`` (LoraConfig with rank_pattern / alpha_pattern), from an allocation
- ``csv``, ``json``: the per-module table (module name, ratio or rank), from either

plus ``compressed_tensors``: saving a pruned model in compressed-tensors' sparse bitmask
checkpoint format (used by ``layercap prune --save-format compressed-tensors``).

:func:`export` is the one call behind ``layercap export``: it reads the record, checks it against
the model when one is given, refuses to overwrite an input, and writes atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from layercap.errors import LayercapError
from layercap.export.inputs import allocation_counts, check_not_input, load_decisions, model_skeleton, require_kind
from layercap.programs.records import Allocation, PruningRatios

STRUCTURES = ("unstructured", "2:4", "4:8")


@dataclass
class ExportOptions:
    """Format options. ``method``/``structure``/``dampening_frac``/``block_size``: llmcompressor;
    ``rank_unit``/``targets``/``alpha_ratio``/``dropout``: peft and the rank table; ``blocks``/
    ``modules``: block and Linear regexes for the ratio table (as ``layercap prune``)."""

    method: str = "sparsegpt"
    structure: str = "unstructured"
    dampening_frac: float = 0.01
    block_size: int = 128
    rank_unit: int = 8
    targets: tuple[str, ...] | None = None
    alpha_ratio: float = 2.0
    dropout: float = 0.0
    blocks: str | None = None
    modules: str | None = None

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise LayercapError(f"--structure {self.structure!r}; allowed: {', '.join(STRUCTURES)}.")
        if self.rank_unit < 1:
            raise LayercapError(f"--rank-unit must be >= 1, got {self.rank_unit}.")
        if not self.alpha_ratio > 0:
            raise LayercapError(f"--alpha-ratio must be > 0, got {self.alpha_ratio}.")
        if not 0.0 <= self.dropout < 1.0:
            raise LayercapError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if not 0.0 < self.dampening_frac < 1.0 or self.block_size < 1:
            raise LayercapError("--dampening-frac must be in (0, 1) and --block-size >= 1.")


@dataclass(frozen=True)
class Format:
    """``reads``: the record kind(s) accepted; ``needs_model``: the model is required (else optional);
    ``directory``: the output is a directory (else a file)."""

    name: str
    reads: tuple[type, ...]
    needs_model: bool
    directory: bool
    write: Callable = field(repr=False)
    summary: str = ""


def _llmcompressor(decisions, source, output, model, spec, opts: ExportOptions) -> Path:
    from layercap.export.llmcompressor import build_recipe, write_recipe

    recipe = build_recipe(decisions, model, opts.method, opts.structure, opts.dampening_frac, opts.block_size)
    return write_recipe(recipe, output, decisions, source)


def _peft(decisions, source, output, model, spec, opts: ExportOptions) -> Path:
    from layercap.export.peft import build_lora_config, write_adapter_config

    counts = allocation_counts(decisions, source)
    config = build_lora_config(model, counts, opts.rank_unit, opts.targets, opts.alpha_ratio, opts.dropout, base_model=spec)
    return write_adapter_config(config, output)


def _table(fmt: str):
    def write(decisions, source, output, model, spec, opts: ExportOptions) -> Path:
        from layercap.export.table import rank_rows, ratio_rows, write_table

        if isinstance(decisions, PruningRatios):
            if model is None:
                from layercap.apply.prune import check_ratio_values

                check_ratio_values(decisions.ratios(), opts.structure)
            rows, kind = ratio_rows(decisions, model, opts.structure, opts.blocks, opts.modules), "ratios"
        else:
            counts = allocation_counts(decisions, source)
            rows, kind = rank_rows(decisions, counts, model, opts.rank_unit, opts.targets, opts.alpha_ratio), "ranks"
        return write_table(rows, output, fmt, kind, source)

    return write


FORMATS: dict[str, Format] = {
    "llmcompressor": Format("llmcompressor", (PruningRatios,), False, False, _llmcompressor,
                            "llm-compressor recipe YAML (SparseGPT/Wanda, per-layer sparsity)"),
    "peft": Format("peft", (Allocation,), True, True, _peft, "PEFT adapter_config.json (per-module LoRA rank)"),
    "csv": Format("csv", (PruningRatios, Allocation), False, False, _table("csv"), "per-module table, CSV"),
    "json": Format("json", (PruningRatios, Allocation), False, False, _table("json"), "per-module table, JSON"),
}


def export(decisions_path: str | os.PathLike, fmt: str, output: str | os.PathLike, model_spec: str | None = None,
           options: ExportOptions | None = None, model=None) -> Path:
    """Write ``decisions_path`` (ratios or allocation) in format ``fmt`` to ``output``; returns the written path.

    ``model_spec``: a model to resolve and check the layer names against (required by ``peft``).
    ``model``: an already loaded model (tests, library use); its modules are used instead of loading
    ``model_spec``.
    """
    if fmt not in FORMATS:
        raise LayercapError(f"--format {fmt!r}; allowed: {', '.join(FORMATS)}.")
    spec = FORMATS[fmt]
    options = options or ExportOptions()
    from layercap.io import check_input_file

    check_input_file(decisions_path, "decisions file")
    check_not_input(output, [decisions_path, model_spec if model_spec and Path(model_spec).exists() else None])
    from layercap.io import check_output_file

    target = Path(output) / "adapter_config.json" if spec.directory else Path(output)
    if spec.directory and Path(output).exists() and not Path(output).is_dir():
        raise LayercapError(f"-o {output} is a file; --format {fmt} writes a directory.")
    if not spec.directory and Path(output).is_dir():
        raise LayercapError(f"-o {output} is a directory; --format {fmt} writes a file.")
    check_output_file(target, "-o", [decisions_path])
    decisions = load_decisions(decisions_path)
    if not isinstance(decisions, spec.reads):
        require_kind(decisions, spec.reads[0], fmt, decisions_path)
    if spec.needs_model and model is None and model_spec is None:
        raise LayercapError(f"--format {fmt} needs the model (module names and shapes): pass --model MODEL.")
    if model is None and model_spec is not None:
        model = model_skeleton(model_spec)
    return spec.write(decisions, decisions_path, output, model, model_spec, options)


__all__ = ["FORMATS", "Format", "ExportOptions", "STRUCTURES", "export", "load_decisions"]
