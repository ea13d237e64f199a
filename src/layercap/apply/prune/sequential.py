"""Block-by-block calibrated pruning of a whole model (in place): ``prune_model``.

As in the SparseGPT / Wanda reference code, block k is calibrated on the outputs of blocks
0..k-1 *already pruned*: run block k on its inputs with hooks on its Linears (input
statistics), prune its Linears, re-run the pruned block to get the next block's inputs.

Generic block calls. Decoder layers take family-specific arguments (attention mask,
``position_embeddings``, ``position_ids``, ``cache_position``, GPT-2's positional
``layer_past`` / mask ...), and some families give each layer its own (Gemma 2/3 and Qwen
alternate sliding-window and full masks; Gemma 3 alternates local and global RoPE). So one
cheap capture pass per micro-batch records the exact ``(args, kwargs)`` that *every* block
receives from the model: each block's forward is temporarily replaced by a pass-through
(returning its input hidden states in the block's own output format), forward pre-hooks record
the call, and a sentinel exception raised at the last block stops the model before the head.
The captured calls are then replayed, block by block, with the running hidden states. The
blocks must be the model's decoder chain in forward order (the default discovery; with
``--blocks`` name all of them, giving ratio 0 to blocks to leave dense).

Memory: only the block being pruned, its Linears' statistics and the hidden states of the
calibration windows live on ``device``; every other block stays where it was (e.g. on CPU).
Magnitude pruning needs no data: it skips all of the above.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from layercap.apply.prune.masks import STRUCTURES, parse_structure
from layercap.apply.prune.plan import module_ratios
from layercap.apply.prune.pruners import get_pruner
from layercap.apply.prune.report import ModuleSparsity, PruningReport
from layercap.apply.prune.sparsegpt import hessian_factor
from layercap.apply.prune.stats import InputStats, attach_input_stats
from layercap.data.calibration import CalibrationSet
from layercap.errors import LayercapError
from layercap.models import Block, find_blocks, linear_weight
from layercap.models.load import model_source


class _StopForward(Exception):
    """Raised by the capture hook once the last block's call is recorded."""


@dataclass
class BlockCall:
    """How the model called one block for one micro-batch, minus the hidden states.

    ``hidden_kw``: the hidden states were passed as ``hidden_states=`` rather than first.
    """

    args: tuple
    kwargs: dict
    hidden_kw: bool = False

    def run(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Call ``module`` on ``hidden``; returns the output hidden states (first element of a tuple)."""
        if self.hidden_kw:
            out = module(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = module(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _move(obj: Any, device: torch.device | None, memo: dict[int, Any]) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) on ``device``; shared tensors moved once."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # keep obj alive so its id stays unique
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(_move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def capture_block_calls(
    model: nn.Module, blocks: list[Block], batches: list[torch.Tensor], device: torch.device | None = None
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Return ``(inputs, calls)``: block 0's input hidden states per micro-batch, and
    ``calls[k][j]`` = the call block k receives for micro-batch j. Tensors are moved to
    ``device`` (None: left where the model made them). See the module docstring."""
    in_device = model.get_input_embeddings().weight.device
    inputs: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    memo: dict[int, Any] = {}
    output_format: dict[str, Any] = {}
    handles = []

    def make_pre_hook(k: int):
        def pre_hook(_module, args, kwargs):
            kwargs = dict(kwargs)
            if args:
                hidden, rest, hidden_kw = args[0], tuple(args[1:]), False
            else:
                hidden, rest, hidden_kw = kwargs.pop("hidden_states"), (), True
            calls[k].append(BlockCall(_move(rest, device, memo), _move(kwargs, device, memo), hidden_kw))
            if k == 0:
                inputs.append(hidden.detach().to(device) if device is not None else hidden.detach())
            if k == len(blocks) - 1:
                raise _StopForward
        return pre_hook

    def make_passthrough(module: nn.Module):
        original = module.forward

        def passthrough(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if "n" not in output_format:
                # learn the block's output structure once (tensor, or tuple of length n), running
                # the block where it will be pruned (a 7B block on a CPU would take minutes)
                home = _module_device(module)
                if device is not None and device != home:
                    module.to(device)
                    try:
                        out = original(*_move(args, device, {}), **_move(kwargs, device, {}))
                    finally:
                        module.to(home)
                else:
                    out = original(*args, **kwargs)
                output_format["n"] = len(out) if isinstance(out, (tuple, list)) else 0
            n = output_format["n"]
            return hidden if n == 0 else (hidden,) + (None,) * (n - 1)
        return passthrough

    try:
        for k, block in enumerate(blocks):
            handles.append(block.module.register_forward_pre_hook(make_pre_hook(k), with_kwargs=True))
            if k < len(blocks) - 1:
                block.module.forward = make_passthrough(block.module)
        for batch in batches:
            try:
                model(input_ids=batch.to(in_device), use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - a model that never reached its last block
                raise LayercapError(f"the model's forward never called block {blocks[-1].name}; check --blocks.")
    finally:
        for h in handles:
            h.remove()
        for block in blocks:
            block.module.__dict__.pop("forward", None)
    if any(len(c) != len(batches) for c in calls):
        raise LayercapError(
            "the blocks were not each called once per forward pass; --blocks must name the model's decoder blocks in order."
        )
    return inputs, calls


@torch.no_grad()
def prune_linear(
    module: nn.Module,
    ratio: float,
    method: str,
    nm: tuple[int, int] | None = None,
    stats: InputStats | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[int, int]:
    """Prune one Linear/Conv1D in place; returns ``(pruned, zeros)`` weight counts.
    ``factor``: SparseGPT's precomputed :func:`hessian_factor` of ``stats.hessian``, if any."""
    weight = linear_weight(module)
    if ratio > 0:
        new, mask = get_pruner(method).prune(weight, ratio, nm, stats, factor, blocksize, percdamp)
        if new is not None:
            weight.copy_(new.to(weight.dtype))
        else:
            weight.masked_fill_(mask, 0)
        pruned = int(mask.sum())
    else:
        pruned = 0
    return pruned, int((weight == 0).sum())


def _check_args(method: str, structure: str, calib: CalibrationSet | None, device: str | None, batch_size: int):
    pruner = get_pruner(method)
    if structure not in STRUCTURES:
        parse_structure(structure)  # raises for malformed strings; other N:M are accepted
    if pruner.needs_data and calib is None:
        raise LayercapError(f"{method} needs calibration data: pass --data PATH (text, JSON/JSONL or a directory).")
    if batch_size < 1:
        raise LayercapError(f"--batch-size must be >= 1, got {batch_size}.")
    if device and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LayercapError(f"--device {device} requested but CUDA is not available; use --device cpu.")


def prune_model(
    model: nn.Module,
    ratios: Mapping[str, float],
    method: str = "wanda",
    calib: CalibrationSet | None = None,
    structure: str = "unstructured",
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
    blocks: list[Block] | None = None,
    blocks_regex: str | None = None,
    modules_regex: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> PruningReport:
    """Prune ``model`` in place at ``ratios`` (block name or full module name -> ratio in [0, 1)).

    ``calib``: calibration windows (needed by wanda / sparsegpt, ignored by magnitude).
    ``device``: where each block is pruned (moved there one at a time, then back); None =
    wherever each block already is. ``batch_size``: calibration windows per forward call.
    Returns the :class:`PruningReport` (per-module, per-block and overall sparsity).
    """
    t0 = time.perf_counter()
    _check_args(method, structure, calib, None if device is None else str(device), batch_size)
    nm = parse_structure(structure)
    blocks = blocks if blocks is not None else find_blocks(model, blocks_regex, modules_regex)
    per_module = module_ratios(blocks, ratios, structure)
    target = torch.device(device) if device is not None else None
    was_training = model.training
    model.eval()
    records: list[ModuleSparsity] = []
    bar = tqdm(blocks, desc=f"prune ({method})", file=sys.stderr, disable=not progress, unit="block")
    try:
        if not get_pruner(method).needs_data:
            for block in bar:
                records += _prune_block(block, per_module, method, nm, None, target, blocksize, percdamp)
        else:
            batches = list(calib.batches(batch_size))
            inputs, calls = capture_block_calls(model, blocks, batches, target)
            for k, block in enumerate(bar):
                block_records, inputs = _calibrate_and_prune_block(
                    block, per_module, method, nm, inputs, calls[k], target, blocksize, percdamp, last=k == len(blocks) - 1
                )
                records += block_records
    finally:
        bar.close()
        model.train(was_training)
    calibration = None
    if get_pruner(method).needs_data:
        calibration = calib.metadata()
    return PruningReport(
        method=method, structure=structure, modules=records, calibration=calibration,
        wall_time_s=time.perf_counter() - t0,
        device=str(target) if target is not None else str(_module_device(model)),
        model=str(model_source(model)),
        metadata={"blocksize": blocksize, "percdamp": percdamp} if method == "sparsegpt" else {},
    )


def _records(block: Block, per_module: Mapping[str, float], counts: dict[str, tuple[int, int]]) -> list[ModuleSparsity]:
    out = []
    for rel, module in block.linears.items():
        full = f"{block.name}.{rel}"
        pruned, zeros = counts[rel]
        out.append(ModuleSparsity(full, block.name, per_module[full], linear_weight(module).numel(), pruned, zeros))
    return out


@torch.no_grad()
def _prune_block(block, per_module, method, nm, stats, target, blocksize, percdamp) -> list[ModuleSparsity]:
    """Magnitude path: no data, just each Linear (on ``target`` if given)."""
    home = _module_device(block.module)
    if target is not None:
        block.module.to(target)
    try:
        counts = {rel: prune_linear(m, per_module[f"{block.name}.{rel}"], method, nm, None, blocksize, percdamp)
                  for rel, m in block.linears.items()}
    finally:
        if target is not None:
            block.module.to(home)
    return _records(block, per_module, counts)


@torch.no_grad()
def _calibrate_and_prune_block(block, per_module, method, nm, inputs, calls, target, blocksize, percdamp, last):
    """Stats pass, prune, re-run: returns (records, this block's outputs = next block's inputs)."""
    home = _module_device(block.module)
    if target is not None:
        block.module.to(target)
    device = target if target is not None else home
    try:
        active = {rel: m for rel, m in block.linears.items() if per_module[f"{block.name}.{rel}"] > 0}
        in_features = {rel: linear_weight(m).shape[1] for rel, m in active.items()}
        stats, handles = attach_input_stats(active, in_features, device, want_hessian=get_pruner(method).needs_hessian)
        try:
            outputs = []
            for hidden, call in zip(inputs, calls):
                out = call.run(block.module, hidden)
                # a block with nothing to prune: its dense outputs are already the next inputs
                outputs.append(None if active else out)
        finally:
            for h in handles:
                h.remove()
        counts = {}
        factors: list[tuple[InputStats, tuple]] = []  # Linears fed the same input share H^-1
        for rel, m in block.linears.items():
            st, factor = stats.get(rel), None
            if get_pruner(method).needs_hessian and st is not None:
                factor = next((f for other, f in factors if torch.equal(other.hessian, st.hessian)), None)
                if factor is None:
                    factor = hessian_factor(st.hessian, percdamp)
                    factors.append((st, factor))
            counts[rel] = prune_linear(m, per_module[f"{block.name}.{rel}"], method, nm, st, blocksize, percdamp, factor)
        del stats, factors
        if active and not last:
            outputs = [call.run(block.module, hidden) for hidden, call in zip(inputs, calls)]
    finally:
        if target is not None:
            block.module.to(home)
    return _records(block, per_module, counts), outputs
