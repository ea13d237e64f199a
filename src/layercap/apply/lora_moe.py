"""LoRA-MoE with a per-layer number of experts (MoLA semantics).

Every adapted Linear of block k is wrapped by :class:`LoraMoELinear`: n_k LoRA experts of rank r
(A_e: r x in, B_e: out x r, B zero-initialised so the wrapped model starts equal to the base),
a router (Linear in -> n_k, no bias), top-k routing with the softmax renormalised over the
selected experts, and the output

    y = base(x) + (alpha / r) * sum_{e in topk(x)} w_e(x) B_e A_e x,
    w_e(x) = softmax(router(x))_e / sum_{j in topk(x)} softmax(router(x))_j

(the renormalised softmax equals a softmax over the selected logits). With top-k >= n_k every
expert is used.

Load balancing (Switch / Mixtral form, as in the MoLA implementation of moe_peft):
``n * sum_e f_e P_e`` where P_e is the mean router probability of expert e over the (non-pad)
tokens and f_e the fraction of tokens whose **top-k** selection contains e (top-k assignment,
so sum_e f_e = k and a perfectly balanced router scores k; Mixtral's
``load_balancing_loss_func``). :func:`load_balancing_loss` averages this over all wrapped
modules so the coefficient does not depend on how many modules are adapted.

Expert weights are stacked into (n, r, in) and (n, out, r) tensors; no Python loop over experts
in the forward pass. Two kernels: ``dense`` computes every expert through two plain matmuls
(h @ A_flat^T -> (T, n r), gate, @ B_flat^T) which, for the small n used here, costs the same
as one LoRA of rank n r; ``grouped`` dispatches each token only to its selected experts
(sort by expert, padded batched matmul, index_add back). ``benchmarks/moe.py`` measures both
against a Python loop over experts (:meth:`LoraMoELinear.forward_loop`, the reference).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from layercap.errors import LayercapError
from layercap.io import atomic_directory, atomic_write_json, read_json
from layercap.models import find_blocks, linear_weight
from layercap.models.load import model_source

SCHEMA = "layercap.lora_moe/v1"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "lora_moe_config.json"
KERNELS = ("dense", "grouped")

# Target module names per model_type; anything else gets the Llama-style default.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "default": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The default adapted module names (last name component) for ``model``'s architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return DEFAULT_TARGETS.get(model_type, DEFAULT_TARGETS["default"])


def parse_targets(text: str | None, model: nn.Module) -> tuple[str, ...]:
    """``"q_proj,v_proj"`` -> ("q_proj", "v_proj"); None/empty -> the architecture default."""
    if not text:
        return default_targets(model)
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise LayercapError(f"--targets {text!r} names no module; pass e.g. q_proj,v_proj.")
    return names


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> dict[str, dict[str, nn.Module]]:
    """block name -> {full module name -> Linear/Conv1D} for the modules whose last name component is in ``targets``.

    Raises LayercapError naming the available names when a target matches no module.
    """
    blocks = find_blocks(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    wanted = set(targets)
    out: dict[str, dict[str, nn.Module]] = {}
    seen: set[str] = set()
    for block in blocks:
        chosen = {}
        for rel, module in block.linears.items():
            last = rel.rsplit(".", 1)[-1]
            if last in wanted:
                chosen[prefix[id(module)]] = module
                seen.add(last)
        out[block.name] = chosen
    missing = sorted(wanted - seen)
    if missing:
        available = sorted({rel.rsplit(".", 1)[-1] for b in blocks for rel in b.linears})
        raise LayercapError(
            f"target module(s) {missing} match no Linear in the blocks of {type(model).__name__}; "
            f"available names: {', '.join(available)}. Fix --targets."
        )
    return out


def check_counts(model_blocks: list[str], counts: dict[str, int], *, minimum: int) -> dict[str, int]:
    """Validate an allocation against a model's block names; return counts in block order."""
    unknown = [n for n in counts if n not in model_blocks]
    if unknown:
        raise LayercapError(
            f"the allocation names {len(unknown)} layer(s) the model lacks ({', '.join(unknown[:4])}); "
            f"the model's blocks are {model_blocks[0]} .. {model_blocks[-1]}. Recompute the allocation "
            "from scores of this model."
        )
    missing = [n for n in model_blocks if n not in counts]
    if missing:
        raise LayercapError(
            f"the allocation has no count for {len(missing)} block(s) of the model ({', '.join(missing[:4])}); "
            "it must give every block a count (0 only where the adapter allows it)."
        )
    out = {}
    for name in model_blocks:
        n = counts[name]
        if isinstance(n, bool) or not float(n).is_integer():
            raise LayercapError(f"allocation count for {name} is {n!r}; counts must be integers (allocate with integer=True).")
        n = int(n)
        if n < minimum:
            raise LayercapError(
                f"allocation gives {name} {n} unit(s) but this adapter needs at least {minimum} per block; "
                f"re-allocate with lower bound >= {minimum}."
            )
        out[name] = n
    return out


class LoraMoELinear(nn.Module):
    """A frozen Linear/Conv1D plus n LoRA experts and a top-k router. Input (..., in) -> (..., out)."""

    def __init__(
        self,
        base: nn.Module,
        num_experts: int,
        rank: int,
        alpha: float,
        top_k: int = 2,
        kernel: str = "dense",
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_experts < 1 or rank < 1:
            raise LayercapError(f"LoRA-MoE needs >= 1 expert and rank >= 1 (got {num_experts} experts, rank {rank}).")
        if kernel not in KERNELS:
            raise LayercapError(f"unknown LoRA-MoE kernel {kernel!r}; choose one of {', '.join(KERNELS)}.")
        weight = linear_weight(base)
        out_f, in_f = weight.shape
        dtype = dtype or weight.dtype
        device = weight.device
        self.base = base
        self.num_experts = int(num_experts)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = float(alpha) / rank
        self.top_k = min(int(top_k), self.num_experts)
        self.kernel = kernel
        self.in_features, self.out_features = in_f, out_f
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_f, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_f, rank, device=device, dtype=dtype))
        self.router = nn.Linear(in_f, num_experts, bias=False, device=device, dtype=dtype)
        for e in range(num_experts):  # init only, not the hot path; PEFT's LoRA A init
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        # routing statistics of the last forward, for the load-balancing loss
        self.last_probs: torch.Tensor | None = None  # (T, n) float32
        self.last_topk: torch.Tensor | None = None  # (T, k) int64

    def __getstate__(self):
        # routing statistics are non-leaf tensors of the last forward: not state, and deepcopy
        # of a non-leaf tensor fails
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["last_probs"] = state["last_topk"] = None
        return state

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
                f"rank={self.rank}, top_k={self.top_k}, scaling={self.scaling:g}, kernel={self.kernel}")

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (T, in) -> (probs (T, n) float32, topk indices (T, k), renormalised weights (T, k) float32)."""
        logits = self.router(h).float()
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
        return probs, top_i, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        probs, top_i, weights = self.route(h)
        self.last_probs, self.last_topk = probs, top_i
        if self.kernel == "dense":
            delta = self._dense(h, top_i, weights)
        else:
            delta = self._grouped(h, top_i, weights)
        return y + (self.scaling * delta).to(y.dtype).reshape(y.shape)

    def _dense(self, h, top_i, weights) -> torch.Tensor:
        """Every expert through two matmuls, unselected experts gated to zero. (T, out)."""
        n, r = self.num_experts, self.rank
        gates = torch.zeros(h.shape[0], n, device=h.device, dtype=weights.dtype).scatter(1, top_i, weights)
        z = h @ self.lora_A.reshape(n * r, -1).t()  # (T, n r)
        z = (z.reshape(-1, n, r) * gates.to(z.dtype).unsqueeze(-1)).reshape(-1, n * r)
        # B stacked (n, out, r) -> (out, n r) so that column block e multiplies z's block e
        b_flat = self.lora_B.permute(1, 0, 2).reshape(self.out_features, n * r)
        return z @ b_flat.t()

    def _grouped(self, h, top_i, weights) -> torch.Tensor:
        """Only the selected experts: tokens sorted by expert into an (n, C, in) padded batch. (T, out)."""
        T, k, n = h.shape[0], self.top_k, self.num_experts
        flat_e = top_i.reshape(-1)  # (T k)
        flat_t = torch.arange(T, device=h.device).repeat_interleave(k)
        flat_w = weights.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        e_sorted, t_sorted, w_sorted = flat_e[order], flat_t[order], flat_w[order]
        counts = torch.bincount(e_sorted, minlength=n)
        capacity = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(e_sorted.numel(), device=h.device) - starts[e_sorted]
        # padded slots point at an all-zero extra row T with weight 0
        idx = torch.full((n, capacity), T, device=h.device, dtype=torch.long)
        idx[e_sorted, slot] = t_sorted
        wpad = torch.zeros(n, capacity, device=h.device, dtype=h.dtype)
        wpad[e_sorted, slot] = w_sorted.to(h.dtype)
        h_pad = torch.cat([h, h.new_zeros(1, h.shape[1])], 0)[idx]  # (n, C, in)
        z = torch.bmm(h_pad, self.lora_A.transpose(1, 2))  # (n, C, r)
        out = torch.bmm(z, self.lora_B.transpose(1, 2)) * wpad.unsqueeze(-1)  # (n, C, out)
        acc = h.new_zeros(T + 1, self.out_features)
        acc.index_add_(0, idx.reshape(-1), out.reshape(-1, self.out_features))
        return acc[:T]

    def forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: a Python loop over experts (tests and benchmark only, never the hot path)."""
        y = self.base(x)
        h = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        _, top_i, weights = self.route(h)
        delta = h.new_zeros(h.shape[0], self.out_features)
        for e in range(self.num_experts):
            sel = top_i == e  # (T, k)
            tok = sel.any(-1).nonzero(as_tuple=True)[0]
            if tok.numel() == 0:
                continue
            w = (weights * sel).sum(-1)[tok].to(h.dtype)
            delta[tok] += w.unsqueeze(-1) * ((h[tok] @ self.lora_A[e].t()) @ self.lora_B[e].t())
        return y + (self.scaling * delta).to(y.dtype).reshape(y.shape)


def switch_balance_loss(probs: torch.Tensor, top_i: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """n * sum_e f_e P_e over tokens (T rows); f_e: share of tokens with e in their top-k; P_e: mean prob.

    ``mask`` (T,) bool selects the tokens that count (padding excluded).
    """
    assign = F.one_hot(top_i, num_experts).sum(dim=1).float()  # (T, n): 1 where e is in the token's top-k
    if mask is not None:
        probs, assign = probs[mask], assign[mask]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    f = assign.mean(dim=0)
    p = probs.mean(dim=0)
    return num_experts * (f * p).sum()


def lora_moe_modules(model: nn.Module) -> dict[str, LoraMoELinear]:
    """Full module name -> wrapper, for every LoRA-MoE layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraMoELinear)}


def load_balancing_loss(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Switch loss over all LoRA-MoE modules for the last forward pass (scalar, float32).

    ``attention_mask`` (batch, seq) of that forward excludes padding tokens from the statistics.
    """
    mods = [m for m in lora_moe_modules(model).values() if m.last_probs is not None]
    if not mods:
        raise LayercapError("no LoRA-MoE routing statistics: run a forward pass of the wrapped model first.")
    mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
    losses = [switch_balance_loss(m.last_probs, m.last_topk, m.num_experts, mask) for m in mods]
    return torch.stack(losses).mean()


@dataclass
class LoraMoEConfig:
    """What was injected where. ``counts``: block name -> experts per adapted Linear of that block."""

    counts: dict[str, int]
    targets: list[str]
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    aux_coef: float = 0.01
    kernel: str = "dense"
    model_source: str | None = None
    modules: list[str] = field(default_factory=list)  # full names of wrapped modules (filled by apply)
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "model_source": self.model_source, "targets": list(self.targets),
            "rank": self.rank, "alpha": self.alpha, "top_k": self.top_k, "aux_coef": self.aux_coef,
            "kernel": self.kernel, "counts": dict(self.counts), "modules": list(self.modules),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LoraMoEConfig":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not a LoRA-MoE config: schema {d.get('schema')!r}, expected {SCHEMA!r}.")
        try:
            return cls(
                counts={str(k): int(v) for k, v in d["counts"].items()}, targets=list(d["targets"]),
                rank=int(d["rank"]), alpha=float(d["alpha"]), top_k=int(d["top_k"]),
                aux_coef=float(d["aux_coef"]), kernel=d.get("kernel", "dense"),
                model_source=d.get("model_source"), modules=list(d.get("modules", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LayercapError(f"malformed LoRA-MoE config ({exc!r}); re-save the adapter.") from exc

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LoraMoEConfig":
        return cls.from_dict(read_json(path, "LoRA-MoE config", "Pass the adapter directory written by `layercap finetune`."))


def apply_lora_moe(model: nn.Module, config: LoraMoEConfig) -> dict[str, LoraMoELinear]:
    """Wrap ``model``'s target Linears in place, freeze everything else; return name -> wrapper.

    Validates first (unknown layers, missing counts, all-zero counts, unknown targets) so a bad
    allocation leaves the model untouched. A block with 0 experts keeps its Linears unwrapped. Sets ``config.modules`` and ``config.model_source``.
    """
    if lora_moe_modules(model):
        raise LayercapError("model already has LoRA-MoE adapters; load a fresh base model.")
    if config.rank < 1 or config.top_k < 1 or config.alpha <= 0 or config.aux_coef < 0:
        raise LayercapError(
            f"LoRA-MoE needs rank >= 1, top_k >= 1, alpha > 0, aux_coef >= 0 (got rank {config.rank}, "
            f"top_k {config.top_k}, alpha {config.alpha}, aux_coef {config.aux_coef})."
        )
    per_block = resolve_targets(model, config.targets)
    # 0 experts leaves a block without an adapter, as PEFT LoRA's rank 0 does: a control that puts
    # the whole budget in a few blocks needs it, and the MoLA floor of 1 stays the default lower bound.
    counts = check_counts(list(per_block), config.counts, minimum=0)
    if not any(counts.values()):
        raise LayercapError("the allocation gives every block 0 experts; there is nothing to adapt.")
    for p in model.parameters():
        p.requires_grad_(False)
    parents = dict(model.named_modules())
    wrapped = {}
    for block_name, modules in per_block.items():
        if counts[block_name] == 0:
            continue
        for full, module in modules.items():
            parent_name, _, child = full.rpartition(".")
            wrapper = LoraMoELinear(module, counts[block_name], config.rank, config.alpha, config.top_k, config.kernel)
            setattr(parents[parent_name], child, wrapper)
            wrapped[full] = wrapper
    config.counts = counts
    config.modules = list(wrapped)
    config.model_source = config.model_source or model_source(model)
    return wrapped


def expert_counts(model: nn.Module) -> dict[str, int]:
    """Block name -> number of experts, read back from the wrapped modules (all modules of a block
    agree; a block without wrappers has 0). Empty for a model without LoRA-MoE adapters."""
    out = {}
    for b in find_blocks(model):
        ns = {m.num_experts for m in b.module.modules() if isinstance(m, LoraMoELinear)}
        if len(ns) > 1:
            raise LayercapError(f"block {b.name} has modules with different expert counts {sorted(ns)}.")
        out[b.name] = ns.pop() if ns else 0
    return out if any(out.values()) else {}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable LoRA-MoE tensors (experts and routers), by full parameter name."""
    out = {}
    for name, mod in lora_moe_modules(model).items():
        out[f"{name}.lora_A"] = mod.lora_A.detach()
        out[f"{name}.lora_B"] = mod.lora_B.detach()
        out[f"{name}.router.weight"] = mod.router.weight.detach()
    return out


def write_lora_moe_files(model: nn.Module, config: LoraMoEConfig, directory: str | os.PathLike) -> Path:
    """Write the two adapter files into an existing or new ``directory``, each file atomically.

    Used inside Trainer checkpoints (which hold other files too); :func:`save_lora_moe` makes
    the whole directory atomic.
    """
    from safetensors.torch import save as st_save

    from layercap.io import atomic_write_bytes

    directory = Path(directory)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, st_save(tensors, metadata={"schema": SCHEMA}))
    config.save(directory / CONFIG_FILE)
    return directory


def save_lora_moe(model: nn.Module, config: LoraMoEConfig, directory: str | os.PathLike) -> Path:
    """Write ``adapter_model.safetensors`` + ``lora_moe_config.json`` as one atomic directory."""
    with atomic_directory(directory) as tmp:
        write_lora_moe_files(model, config, tmp)
    return Path(directory)


def load_lora_moe_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy saved expert/router tensors into the LoRA-MoE layers already in ``model`` (exactly)."""
    from safetensors.torch import load_file

    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise LayercapError(f"{weights_path} not found; the adapter directory is incomplete.")
    tensors = load_file(str(weights_path))
    wrapped = lora_moe_modules(model)
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        diff = sorted(set(tensors) ^ expected)[:4]
        raise LayercapError(f"adapter weights do not match the model's LoRA-MoE layout (e.g. {diff}); wrong base model?")
    with torch.no_grad():
        for name, mod in wrapped.items():
            for attr, target in (("lora_A", mod.lora_A), ("lora_B", mod.lora_B), ("router.weight", mod.router.weight)):
                src = tensors[f"{name}.{attr}"]
                if src.shape != target.shape:
                    raise LayercapError(f"{name}.{attr}: saved shape {tuple(src.shape)} != model {tuple(target.shape)}; wrong base model?")
                target.copy_(src.to(target.dtype))


def load_lora_moe(model: nn.Module, directory: str | os.PathLike) -> LoraMoEConfig:
    """Inject the saved adapters into a fresh base ``model`` and load their weights exactly."""
    directory = Path(directory)
    config = LoraMoEConfig.load(directory / CONFIG_FILE)
    if not (directory / WEIGHTS_FILE).is_file():
        raise LayercapError(f"{directory / WEIGHTS_FILE} not found; the adapter directory is incomplete.")
    apply_lora_moe(model, config)
    load_lora_moe_weights(model, directory)
    return config


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
