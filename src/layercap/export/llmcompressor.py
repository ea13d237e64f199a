"""``--format llmcompressor``: an llm-compressor recipe that prunes each layer at layercap's ratio.

llm-compressor's sparsity modifiers (``SparseGPTModifier``, ``WandaPruningModifier``; 0.14)
take ``sparsity`` as one float or a *list*, and ``targets``: the modules matched by ``targets``
(in ``model.named_modules()`` order) are the "target layers", and the i-th target layer's Linear
modules are pruned at ``sparsity[i]`` (``SparsityModifierBase.on_calibration_start``). So we
write ``targets`` as the exact full names of the layers to prune (exact names match by equality;
no regex, so "model.layers.1" cannot catch "model.layers.11") **in the model's module order**,
and ``sparsity`` as their ratios in the same order. The order comes from the model when one is
given, otherwise from a natural sort of the names (numbers compared as numbers), which is module
order for the usual ``model.layers.<i>`` names. Layers with ratio 0 are left out (they stay dense).

``mask_structure`` is ``"0:0"`` (unstructured) or ``"N:M"``; for N:M every ratio must be N/M
(checked). ``lm_head`` is never a target; ``ignore: ["re:.*lm_head"]`` keeps it so.

Shape of the file (``Recipe.create_instance(path)`` loads it)::

    sparsity_stage:
      sparsity_modifiers:
        SparseGPTModifier:
          sparsity: [0.41, 0.57, ...]
          mask_structure: "0:0"
          targets: [model.layers.0, model.layers.1, ...]
          ignore: ["re:.*lm_head"]
          dampening_frac: 0.01
          block_size: 128
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import yaml

from layercap.errors import LayercapError
from layercap.io import atomic_write_text
from layercap.programs.records import PruningRatios

MODIFIERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def mask_structure(structure: str) -> str:
    """layercap structure ("unstructured", "2:4") -> llm-compressor ``mask_structure`` ("0:0", "2:4")."""
    from layercap.apply.prune.masks import parse_structure

    nm = parse_structure(structure)
    return "0:0" if nm is None else f"{nm[0]}:{nm[1]}"


def recipe_targets(ratios: PruningRatios, model=None, structure: str = "unstructured") -> list[tuple[str, float]]:
    """(full layer name, ratio) pairs in module order, ratio > 0 only."""
    from layercap.apply.prune import check_ratio_values

    wanted = ratios.ratios()
    check_ratio_values(wanted, structure)
    names = list(wanted)
    nested = sorted(a for a in names for b in names if a != b and b.startswith(a + "."))
    if model is None:
        if nested:
            raise LayercapError(
                f"the ratios name both a layer and modules inside it (e.g. {nested[0]!r}); llm-compressor would "
                "prune those modules twice. Pass --model MODEL so that the ratios are resolved per module."
            )
        order = sorted(names, key=_natural)
        return [(n, wanted[n]) for n in order if wanted[n] > 0]
    from layercap.apply.prune import module_ratios
    from layercap.models import find_blocks

    blocks = find_blocks(model)
    per_module = module_ratios(blocks, wanted, structure)  # unknown names raise, N:M shapes checked
    foreign = [f"{b.name}.{rel}" for b in blocks for rel, m in b.linears.items() if not isinstance(m, torch.nn.Linear)]
    if foreign:
        raise LayercapError(
            f"{foreign[0]} is a {type(dict(model.named_modules())[foreign[0]]).__name__}, not torch.nn.Linear; llm-compressor's "
            "pruning modifiers only prune Linear/Conv layers, so the recipe would leave it dense. Prune this model "
            "with `layercap prune` instead."
        )
    if nested:
        return [(n, r) for n, r in per_module.items() if r > 0]
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return [(n, wanted[n]) for n in sorted(names, key=lambda n: position[n]) if wanted[n] > 0]


def build_recipe(ratios: PruningRatios, model=None, method: str = "sparsegpt", structure: str = "unstructured",
                 dampening_frac: float = 0.01, block_size: int = 128) -> dict:
    """The recipe as a dict (see module docstring)."""
    if method not in MODIFIERS:
        raise LayercapError(f"--method {method!r}: llm-compressor recipes support {', '.join(MODIFIERS)}.")
    pairs = recipe_targets(ratios, model, structure)
    if not pairs:
        raise LayercapError("every ratio is 0: nothing to prune, so no recipe to write.")
    args: dict = {
        "sparsity": [round(float(r), 12) for _, r in pairs],
        "mask_structure": mask_structure(structure),
        "targets": [n for n, _ in pairs],
        "ignore": ["re:.*lm_head"],
    }
    if method == "sparsegpt":
        args.update(dampening_frac=float(dampening_frac), block_size=int(block_size))
    return {"sparsity_stage": {"sparsity_modifiers": {MODIFIERS[method]: args}}}


def write_recipe(recipe: dict, output: str | os.PathLike, ratios: PruningRatios, source: str | os.PathLike) -> Path:
    """YAML with a comment header saying where the sparsities came from (atomic)."""
    header = (
        f"# llm-compressor recipe written by `layercap export --format llmcompressor` from {source}\n"
        f"# rule {ratios.rule}, target sparsity {ratios.sparsity:g}, achieved {ratios.achieved:.6g}; one sparsity per target,\n"
        "# in the model's module order (llm-compressor pairs sparsity[i] with the i-th matched target).\n"
    )
    return atomic_write_text(output, header + yaml.safe_dump(recipe, sort_keys=False, width=120))
