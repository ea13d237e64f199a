"""The adapter registry: how per-block capacity becomes trainable modules.

An adapter is ``attach(model, counts, options) -> (model_to_train, moe_config | None)``,
``minimum`` (the fewest units a block may get) and ``save(model_to_train, moe_config, directory)``.
Built in: ``moe`` (n_k LoRA experts per adapted Linear, :mod:`layercap.apply.lora_moe`) and
``lora`` (PEFT LoRA of rank rank*n_k, :mod:`layercap.apply.peft_lora`). Adding an adapter is one
module plus one :func:`register_adapter` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from layercap.errors import LayercapError


@dataclass(frozen=True)
class Adapter:
    name: str
    attach: Callable[..., tuple]
    save: Callable[..., Path]
    minimum: int
    description: str = ""


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str, attach, save, minimum: int, description: str = "") -> Adapter:
    ADAPTERS[name] = adapter = Adapter(name, attach, save, minimum, description)
    return adapter


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise LayercapError(f"adapter {name!r} is unknown; choose one of {', '.join(ADAPTERS)}.")
    return ADAPTERS[name]


def _targets(model: nn.Module, options) -> list[str]:
    from layercap.apply.lora_moe import parse_targets

    return list(parse_targets(",".join(options.targets) if options.targets else None, model))


def _attach_moe(model: nn.Module, counts: dict[str, int], options):
    from layercap.apply.lora_moe import LoraMoEConfig, apply_lora_moe

    config = LoraMoEConfig(
        counts=dict(counts), targets=_targets(model, options), rank=options.rank, alpha=options.lora_alpha(),
        top_k=options.top_k, aux_coef=options.aux_coef, kernel=options.kernel,
    )
    apply_lora_moe(model, config)
    return model, config


def _save_moe(train_model: nn.Module, moe_config, directory: Path) -> Path:
    from layercap.apply.lora_moe import save_lora_moe

    return save_lora_moe(train_model, moe_config, directory)


def _attach_lora(model: nn.Module, counts: dict[str, int], options):
    from layercap.apply.peft_lora import apply_peft_lora

    peft_model, _ = apply_peft_lora(model, counts, rank_unit=options.rank, targets=_targets(model, options),
                                    alpha_ratio=options.lora_alpha() / options.rank)
    return peft_model, None


def _save_peft(train_model: nn.Module, moe_config, directory: Path) -> Path:
    from layercap.io import atomic_directory

    with atomic_directory(directory) as tmp:
        train_model.save_pretrained(tmp)
    return directory


register_adapter("moe", _attach_moe, _save_moe, minimum=0, description="LoRA-MoE: n_k experts per adapted Linear")
register_adapter("lora", _attach_lora, _save_peft, minimum=0, description="PEFT LoRA: rank rank*n_k")


def attach_adapter(model: nn.Module, counts: dict[str, int], options):
    """Inject ``options.adapter``. Returns ``(model_to_train, moe_config | None)``."""
    return get_adapter(options.adapter).attach(model, counts, options)


# an adapter larger than this many times the base model is an edited or mistaken allocation
MAX_ADAPTER_TO_MODEL = 4.0


def adapter_params(per_block: dict[str, dict[str, nn.Module]], counts: dict[str, int], rank: int) -> int:
    """Trainable LoRA parameters of an allocation: n_k x rank x (in + out) per adapted Linear of
    block k (LoRA-MoE experts and PEFT rank units alike; routers are a rounding error)."""
    from layercap.models import linear_weight

    total = 0
    for block, modules in per_block.items():
        for module in modules.values():
            out_f, in_f = linear_weight(module).shape
            total += int(counts.get(block, 0)) * rank * (int(in_f) + int(out_f))
    return total


def check_counts_for(model: nn.Module, counts: dict[str, int], options) -> dict[str, int]:
    """Validate the allocation and targets against ``model`` without modifying it (also refuses an
    adapter more than ``MAX_ADAPTER_TO_MODEL`` times the size of the model, before building it)."""
    from layercap.apply.lora_moe import check_counts, resolve_targets

    per_block = resolve_targets(model, _targets(model, options))
    counts = check_counts(list(per_block), counts, minimum=get_adapter(options.adapter).minimum)
    size, base = adapter_params(per_block, counts, options.rank), sum(p.numel() for p in model.parameters())
    if size > MAX_ADAPTER_TO_MODEL * base:
        raise LayercapError(
            f"the allocation asks for {sum(counts.values()):,} units ({size:,} adapter parameters at rank {options.rank}), "
            f"more than {MAX_ADAPTER_TO_MODEL:g} x the model's {base:,}; check the allocation file (units per block "
            f"now up to {max(counts.values(), default=0):,}).")
    return counts


def save_adapter(train_model: nn.Module, moe_config, directory: Path, adapter: str) -> Path:
    """Write the trained adapter as one atomic directory (LoRA-MoE safetensors + config, or PEFT)."""
    return get_adapter(adapter).save(train_model, moe_config, directory)
