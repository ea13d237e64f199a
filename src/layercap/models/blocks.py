"""Find a causal LM's decoder blocks and the Linear modules inside them, for any family.

Discovery is structural, not a table of architectures: the decoder blocks are the children of
the ``nn.ModuleList`` whose length equals the config's layer count (``num_hidden_layers`` /
``n_layer`` / ``num_layers``) and whose children hold Linear modules. This covers Llama,
Mistral, Gemma 1-3, Qwen 2/3, Phi, GPT-2 (``transformer.h``, Conv1D), OPT
(``model.decoder.layers``) and most other Hugging Face decoders. When it does not, pass
``blocks_regex`` (full module names, e.g. ``r"model\\.layers\\.\\d+"``).

GPT-2 style ``Conv1D`` stores its weight as (in, out); :func:`linear_weight` always returns
an (out, in) view so every consumer sees the ``nn.Linear`` convention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from layercap.errors import LayercapError

try:  # transformers' GPT-2 style linear
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


@dataclass
class Block:
    """One decoder block. ``linears`` maps names relative to the block to Linear/Conv1D modules."""

    name: str
    index: int
    module: nn.Module
    linears: dict[str, nn.Module] = field(default_factory=dict)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{self.name}.{n}", p) for n, p in self.module.named_parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for _, p in self.named_parameters())

    @property
    def num_prunable(self) -> int:
        """Weights of the Linear modules (what pruning ratios apply to); biases excluded."""
        return sum(linear_weight(m).numel() for m in self.linears.values())


def _num_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    return _num_layers(text_config) if text_config is not None else None


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, LINEAR_TYPES) for m in module.modules())


def find_blocks(model: nn.Module, blocks_regex: str | None = None, modules_regex: str | None = None) -> list[Block]:
    """Return the model's decoder blocks in forward order, each with its Linear modules."""
    from layercap.models.checks import check_regex

    check_regex(blocks_regex, "--blocks")
    check_regex(modules_regex, "--modules")
    if blocks_regex:
        pattern = re.compile(blocks_regex)
        found = [(n, m) for n, m in model.named_modules() if n and pattern.fullmatch(n)]
        if not found:
            raise LayercapError(
                f"--blocks {blocks_regex!r} matches no module of {type(model).__name__}. "
                f"Module names look like: {', '.join(_sample_names(model))}."
            )
    else:
        expected = _num_layers(getattr(model, "config", None))
        candidates = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) > 0 and all(_has_linear(c) for c in m)
        ]
        if expected is not None:
            exact = [(n, m) for n, m in candidates if len(m) == expected]
            candidates = exact or candidates
        if not candidates:
            raise LayercapError(
                f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
                "Linear-bearing layers. Pass --blocks REGEX naming them (e.g. 'model\\.layers\\.\\d+'); "
                f"module names look like: {', '.join(_sample_names(model))}."
            )
        # several matches (e.g. encoder + decoder): the longest list, first in module order
        list_name, module_list = max(candidates, key=lambda nm: len(nm[1]))
        found = [(f"{list_name}.{i}", child) for i, child in enumerate(module_list)]
    blocks = [Block(name=n, index=i, module=m, linears=find_linears(m, modules_regex)) for i, (n, m) in enumerate(found)]
    empty = [b.name for b in blocks if not b.linears]
    if empty:
        raise LayercapError(
            f"blocks {empty[:3]} contain no Linear modules"
            + (f" matching --modules {modules_regex!r}" if modules_regex else "")
            + "; check --blocks / --modules."
        )
    return blocks


def find_linears(block: nn.Module, modules_regex: str | None = None) -> dict[str, nn.Module]:
    """Linear/Conv1D modules of a block, by name relative to it, in module order."""
    from layercap.models.checks import check_regex

    check_regex(modules_regex, "--modules")
    pattern = re.compile(modules_regex) if modules_regex else None
    out = {}
    for name, module in block.named_modules():
        if not name or not isinstance(module, LINEAR_TYPES):
            continue
        if pattern is not None and not pattern.search(name):
            continue
        out[name] = module
    return out


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an (out_features, in_features) tensor view (Conv1D is transposed)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if LINEAR_TYPES[1:] and isinstance(module, LINEAR_TYPES[1:]):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D module")


def block_param_count(block: Block) -> int:
    return block.num_params


def _sample_names(model: nn.Module, limit: int = 6) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    return names[:limit]
