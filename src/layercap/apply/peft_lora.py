"""PEFT LoRA with a per-layer rank r_k = rank_unit * n_k (the allocation as LoRA rank units).

PEFT 0.21 matches ``rank_pattern`` / ``alpha_pattern`` keys with
``re.match(rf"(.*\\.)?({key})$", module_name)``: a key is a regex matched at the end of the
full module name, after any dotted prefix. So "layers.1.self_attn.q_proj" would also match
"model.layers.1.self_attn.q_proj" but a short key like "1.self_attn.q_proj" also matches
"layers.11.self_attn.q_proj". We therefore write every key as the escaped full module name
anchored with ``^...$`` (the leading ``^`` forces the optional prefix group to be empty) and pass
``target_modules`` as the exact list of full names (PEFT matches list entries by equality or a
"." + name suffix, exact for full names). After ``get_peft_model`` :func:`verify_ranks` reads
every adapted module's rank back and raises if anything differs, because PEFT silently ignores
pattern keys that match nothing.
"""

from __future__ import annotations

import re

from torch import nn

from layercap.apply.lora_moe import check_counts, resolve_targets
from layercap.errors import LayercapError


def _key(full_name: str) -> str:
    return "^" + re.escape(full_name) + "$"


def lora_config_from_allocation(
    model: nn.Module,
    counts: dict[str, int],
    rank_unit: int = 8,
    targets: tuple[str, ...] | list[str] | None = None,
    alpha_ratio: float = 2.0,
    dropout: float = 0.0,
):
    """A ``peft.LoraConfig`` giving block k rank ``rank_unit * counts[k]`` (lora_alpha = alpha_ratio * rank).

    Blocks with count 0 are not adapted. ``targets``: last name components (default: the
    architecture's, see :func:`layercap.apply.lora_moe.default_targets`).
    """
    from peft import LoraConfig

    from layercap.apply.lora_moe import default_targets

    if rank_unit < 1 or alpha_ratio <= 0:
        raise LayercapError(f"rank unit must be >= 1 and alpha ratio > 0 (got {rank_unit}, {alpha_ratio}).")
    per_block = resolve_targets(model, tuple(targets) if targets else default_targets(model))
    counts = check_counts(list(per_block), counts, minimum=0)
    ranks = {full: rank_unit * counts[b] for b, mods in per_block.items() for full in mods if counts[b] > 0}
    if not ranks:
        raise LayercapError("the allocation gives every block 0 units: nothing to adapt. Use a budget >= 1.")
    base_r = max(ranks.values())
    return LoraConfig(
        r=base_r,
        lora_alpha=alpha_ratio * base_r,
        target_modules=list(ranks),
        rank_pattern={_key(n): r for n, r in ranks.items()},
        alpha_pattern={_key(n): alpha_ratio * r for n, r in ranks.items()},
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )


def intended_ranks(config) -> dict[str, int]:
    """Full module name -> rank the config asks for (from its anchored rank_pattern)."""
    return {re.sub(r"\\(.)", r"\1", k[1:-1]): int(r) for k, r in config.rank_pattern.items()}


def read_ranks(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Full base-model module name -> LoRA rank actually built by PEFT."""
    from peft.tuners.lora import LoraLayer

    out = {}
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            out[name] = int(module.r[adapter_name])
    return out


def verify_ranks(peft_model: nn.Module, config) -> dict[str, int]:
    """Raise LayercapError unless every targeted module got exactly its intended rank; return the ranks."""
    want, got = intended_ranks(config), read_ranks(peft_model)
    wrong = {n: (want.get(n), got.get(n)) for n in set(want) | set(got) if want.get(n) != got.get(n)}
    if wrong:
        sample = ", ".join(f"{n}: wanted {w}, got {g}" for n, (w, g) in sorted(wrong.items())[:4])
        raise LayercapError(f"PEFT built {len(wrong)} module(s) with the wrong LoRA rank ({sample}); check the targets.")
    return got


def apply_peft_lora(model: nn.Module, counts: dict[str, int], rank_unit: int = 8, targets=None, alpha_ratio: float = 2.0):
    """``get_peft_model`` with per-layer ranks, verified. Returns ``(peft_model, lora_config)``."""
    from peft import get_peft_model

    config = lora_config_from_allocation(model, counts, rank_unit=rank_unit, targets=targets, alpha_ratio=alpha_ratio)
    peft_model = get_peft_model(model, config)
    verify_ranks(peft_model, config)
    return peft_model, config


def block_ranks(peft_model: nn.Module, block_names: list[str]) -> dict[str, int]:
    """Block name -> rank (0 if not adapted), read back; raises if a block's modules disagree."""
    ranks = read_ranks(peft_model)
    out = {}
    for b in block_names:
        rs = {r for n, r in ranks.items() if n.startswith(b + ".")}
        if len(rs) > 1:
            raise LayercapError(f"block {b} has LoRA modules of different ranks {sorted(rs)}.")
        out[b] = rs.pop() if rs else 0
    return out
