"""Measured utility curves: what adapting one block alone buys, at a few capacities (issue 14).

For every block k and level n (capacity units), a LoRA of rank ``unit_rank * n`` is attached to
block k's target Linears only (the same targets as ``layercap finetune``), trained for a fixed
number of full-batch Adam steps on the training windows with every other weight frozen, and
the held-out NLL is measured; ``reduction[k][j]`` = NLL(unadapted) - NLL(adapted), nats per
held-out token. Level 0 is the unadapted model (0 by definition, nothing is trained).

Adapter. One LoRA of rank ``unit_rank * n`` stands for both adapter kinds of the registry
(:mod:`layercap.apply.finetune.adapters`): for ``lora`` it is exactly PEFT LoRA with rank
``rank * n_k`` (A Kaiming-uniform, B zero, scaling alpha / r = 2 as ``layercap finetune``'s
default alpha = 2 x rank); for ``moe`` (n experts of rank ``unit_rank``) it is the LoRA with the
same adapter parameters and no router, an approximation chosen for speed and stated in the
table (``settings.approximation``). Seeded per (block, level), so a resumed table is the same.

Cost. One capture pass caches every block's input hidden states and call arguments on the
training and held-out windows (:func:`layercap.apply.prune.sequential.capture_block_calls`,
replayed by the damage pass's :class:`~layercap.apply.prune.damage._Chain`): a step for block k
reruns only blocks k..K-1 and the head forward and backward (the base weights need no
gradients). The cost is recorded as a multiple of one plain forward + backward (every weight
trainable, as a fine-tuning step) over the same training windows, timed in the same run.

Resumable: after every (block, level) the partial table is written atomically to
``checkpoint`` (``complete`` false, null where not measured); a rerun with the same model,
settings and windows continues from it.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from layercap.apply.prune.damage import _Chain
from layercap.apply.prune.sequential import capture_block_calls
from layercap.data.calibration import CalibrationSet
from layercap.errors import LayercapError
from layercap.models import Block, find_blocks, linear_weight
from layercap.models.load import model_source
from layercap.programs.utility import DEFAULT_TOLERANCE, UtilityTable, check_unit_levels

DEFAULT_LEVELS = (0, 1, 2, 4, 8)
ADAPTER_KINDS = ("lora", "moe")
LORA_SCALE = 2.0  # alpha / r with layercap finetune's default alpha = 2 x rank


def weights_fingerprint(model: nn.Module, stride: int = 4099) -> dict[str, Any]:
    """What identifies the weights cheaply: parameter count and the SHA-256 of the names, shapes
    and every ``stride``-th value of every parameter (float32 bytes)."""
    h = hashlib.sha256()
    total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().reshape(-1)[::stride].float().cpu().numpy().tobytes())
    return {"params": int(total), "sha256": h.hexdigest()}


def block_targets(model: nn.Module, block: Block, targets: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Block ``block``'s Linears named in ``targets`` (default: the architecture's LoRA targets)."""
    from layercap.apply.lora_moe import parse_targets

    wanted = set(parse_targets(",".join(targets) if targets else None, model))
    chosen = {rel: m for rel, m in block.linears.items() if rel.rsplit(".", 1)[-1] in wanted}
    if not chosen:
        raise LayercapError(f"--targets {sorted(wanted)} match no Linear of {block.name} "
                            f"(it has {', '.join(sorted({r.rsplit('.', 1)[-1] for r in block.linears}))}).")
    return chosen


def unit_params(modules: dict[str, nn.Module], unit_rank: int) -> int:
    """Adapter parameters of one unit: unit_rank x (in + out) per adapted Linear."""
    return sum(unit_rank * sum(linear_weight(m).shape) for m in modules.values())


class _Lora:
    """A LoRA x -> scale * B A x added to a Linear's output by a forward hook (no model change)."""

    def __init__(self, modules: dict[str, nn.Module], rank: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.params: list[nn.Parameter] = []
        self.handles = []
        for rel in sorted(modules):
            m = modules[rel]
            w = linear_weight(m)
            out_f, in_f = w.shape
            bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
            a = nn.Parameter((torch.rand(rank, in_f, generator=gen, dtype=torch.float32) * 2 - 1).mul_(bound).to(w.device, w.dtype))
            b = nn.Parameter(torch.zeros(out_f, rank, device=w.device, dtype=w.dtype))
            self.params += [a, b]
            self.handles.append(m.register_forward_hook(
                lambda _m, args, out, a=a, b=b: out + LORA_SCALE * ((args[0] @ a.t()) @ b.t())))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of ``ids`` (B, T) under ``logits`` (B, T, V), in float32 or wider."""
    lg = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ids = ids.to(lg.device)
    target = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # the last position predicts nothing
    return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), reduction="sum",
                                             ignore_index=-100)


def _check_resume(old: UtilityTable, new: UtilityTable, path: Path) -> None:
    for key in ("model", "fingerprint", "adapter", "blocks", "costs", "levels", "settings", "data"):
        if getattr(old, key) != getattr(new, key):
            raise LayercapError(f"{path}: the partial utility table has a different {key!r} ({getattr(old, key)!r}, now "
                                f"{getattr(new, key)!r}); delete it (or pass --fresh) to start over, or rerun with the "
                                "same arguments.")


def plain_fwdbwd_s(model: nn.Module, batches: list[torch.Tensor], reps: int = 2) -> float:
    """Seconds of one plain forward + backward over ``batches`` with every weight trainable (the
    fastest of ``reps``: the first call also pays one-off allocations)."""
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    n_tok = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    best = math.inf
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(reps):
            t0 = time.perf_counter()
            for b in batches:
                ids = b.to(model.get_input_embeddings().weight.device)
                (_nll_sum(model(input_ids=ids, use_cache=False).logits, ids) / n_tok).backward()
            best = min(best, time.perf_counter() - t0)
            for p in params:
                p.grad = None
        return best
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None


def measure_utility(
    model: nn.Module,
    train: CalibrationSet,
    heldout: CalibrationSet,
    levels: Sequence[int] = DEFAULT_LEVELS,
    *,
    steps: int = 10,
    lr: float = 1e-3,
    unit_rank: int = 4,
    adapter: str = "lora",
    targets: Sequence[str] | None = None,
    blocks: list[Block] | None = None,
    only: Sequence[int] | None = None,
    batch_size: int = 4,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    model_id: str | None = None,
) -> UtilityTable:
    """The utility table of ``model`` (module docstring); the model is left unchanged.

    ``levels``: whole units, increasing (0 = unadapted). ``steps`` full-batch Adam steps at ``lr``
    on ``train``; reductions measured on ``heldout``. ``blocks``: the model's whole decoder chain
    (default :func:`find_blocks`); ``only``: indices of the blocks to measure (the others stay
    null and the table is marked incomplete, e.g. for a cost benchmark). ``checkpoint``: the
    partial-table path (resumed from when it matches). Runs where the model is (CPU or GPU).
    """
    levels = check_unit_levels(levels)
    if adapter not in ADAPTER_KINDS:
        raise LayercapError(f"--adapter {adapter!r} is unknown; choose one of {', '.join(ADAPTER_KINDS)}.")
    for flag, value in (("--steps", steps), ("--rank-unit", unit_rank), ("--batch-size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayercapError(f"{flag} must be a whole number >= 1, got {value!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise LayercapError(f"--lr {lr!r} must be a finite number > 0.")
    if train.sha256 == heldout.sha256:
        raise LayercapError("the training and held-out windows are the same; hold out a disjoint part of the text.")
    t_start = time.perf_counter()
    blocks = blocks if blocks is not None else find_blocks(model)
    modules = [block_targets(model, b, targets) for b in blocks]
    K, L = len(blocks), len(levels)
    settings = {"steps": steps, "lr": float(lr), "unit_rank": unit_rank, "batch_size": batch_size, "seed": seed,
                "targets": sorted({rel.rsplit(".", 1)[-1] for m in modules for rel in m}), "optimizer": "adam",
                "lora_scale": LORA_SCALE,
                "approximation": None if adapter == "lora" else
                "moe measured as one LoRA of rank unit_rank * n (same adapter parameters, no router)"}
    table = UtilityTable(
        model=model_id or str(model_source(model)), fingerprint=weights_fingerprint(model), adapter=adapter,
        blocks=[b.name for b in blocks], costs=[float(unit_params(m, unit_rank)) for m in modules], levels=levels,
        reduction=[[0.0 if n == 0 else None for n in levels] for _ in range(K)], tolerance=tolerance,
        settings=settings, data={"train": train.metadata(), "heldout": heldout.metadata()},
        complete=False)
    done = np.array([[n == 0 for n in levels] for _ in range(K)], dtype=bool)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    prior: dict[str, float] = {}
    if checkpoint is not None and checkpoint.is_file():
        old = UtilityTable.load(checkpoint)
        _check_resume(old, table, checkpoint)
        table.reduction, table.base_nll = old.reduction, old.base_nll
        done = np.array([[v is not None for v in row] for row in old.reduction], dtype=bool)
        prior = {k: float(old.cost.get(k, 0.0)) for k in ("wall_s", "train_s", "eval_s", "evaluations")}
    prior_s = prior.get("wall_s", 0.0)
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.eval()
    tr_batches, ho_batches = list(train.batches(batch_size)), list(heldout.batches(batch_size))
    n_tr = sum(b.shape[0] * (b.shape[1] - 1) for b in tr_batches)
    n_ho = sum(b.shape[0] * (b.shape[1] - 1) for b in ho_batches)
    train_s, eval_s = prior.get("train_s", 0.0), prior.get("eval_s", 0.0)
    evaluations = int(prior.get("evaluations", 0))  # over every run of this table (resumes included)
    try:
        fwdbwd_s = plain_fwdbwd_s(model, tr_batches)
        for p in model.parameters():
            p.requires_grad_(False)
        t_setup = time.perf_counter()
        chains, states = [], []
        with torch.no_grad():
            for batches in (tr_batches, ho_batches):
                inputs, calls = capture_block_calls(model, blocks, batches)
                chain = _Chain(model, blocks, calls, batches)
                st = [inputs]
                for k in range(K):
                    st.append([chain.run_block(k, j, h) for j, h in enumerate(st[-1])])
                chains.append(chain)
                states.append(st)
            base_nll = sum(float(_nll_sum(chains[1].head(j, states[1][K][j]), b)) for j, b in enumerate(ho_batches)) / n_ho
        if table.base_nll is not None and abs(table.base_nll - base_nll) > 1e-4 * max(1.0, abs(base_nll)):
            raise LayercapError(f"{checkpoint}: the partial table's held-out NLL {table.base_nll:.6f} differs from this "
                                f"run's {base_nll:.6f} (other weights or dtype?); pass --fresh to start over.")
        table.base_nll = base_nll
        setup_s = time.perf_counter() - t_setup
        bar = tqdm(total=K * L, initial=int(done.sum()), desc=f"utility ({adapter})", file=sys.stderr,
                   disable=not progress, unit="eval")
        measured = range(K) if only is None else sorted(set(only))
        if any(not 0 <= k < K for k in measured):
            raise LayercapError(f"only = {list(only)}: block indices must lie in 0..{K - 1}.")
        for k in measured:
            for jl, n in enumerate(levels):
                if done[k, jl]:
                    continue
                lora = _Lora(modules[k], unit_rank * n, seed=seed * 1_000_003 + 1009 * k + n)
                try:
                    opt = torch.optim.Adam(lora.params, lr=lr)
                    tt = time.perf_counter()
                    for _ in range(steps):
                        opt.zero_grad(set_to_none=True)
                        for j, b in enumerate(tr_batches):
                            logits = chains[0].head(j, chains[0].run_from(k, j, states[0][k][j]))
                            (_nll_sum(logits, b) / n_tr).backward()
                            del logits
                        opt.step()
                    te = time.perf_counter()
                    train_s += te - tt
                    with torch.no_grad():
                        nll = sum(float(_nll_sum(chains[1].head(j, chains[1].run_from(k, j, states[1][k][j])), b))
                                  for j, b in enumerate(ho_batches)) / n_ho
                    eval_s += time.perf_counter() - te
                finally:
                    lora.remove()
                table.reduction[k][jl] = base_nll - nll
                if not math.isfinite(table.reduction[k][jl]):
                    raise LayercapError(f"block {blocks[k].name} at {n} units: the held-out NLL is {nll!r} after "
                                        f"{steps} Adam steps (diverged); lower --lr.")
                evaluations += 1
                done[k, jl] = True
                bar.update(1)
                if checkpoint is not None:
                    table.cost = {"wall_s": prior_s + time.perf_counter() - t_start, "train_s": train_s,
                                  "eval_s": eval_s, "evaluations": evaluations}
                    table.save(checkpoint)
        bar.close()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)
    wall_s = prior_s + time.perf_counter() - t_start
    table.cost = {
        "fwdbwd_s": fwdbwd_s, "wall_s": wall_s, "resumed_wall_s": prior_s, "setup_s": setup_s, "train_s": train_s,
        "eval_s": eval_s, "evaluations": evaluations, "steps": steps,
        "fwdbwd_equivalents": (wall_s - fwdbwd_s) / fwdbwd_s,
        "per_eval_fwdbwd_equivalents": ((train_s + eval_s) / fwdbwd_s / evaluations) if evaluations else None,
        "per_step_fwdbwd_equivalents": (train_s / fwdbwd_s / evaluations / steps) if evaluations else None,
        "train_tokens": train.num_tokens, "heldout_tokens": heldout.num_tokens,
        "device": str(linear_weight(next(iter(modules[0].values()))).device), "threads": torch.get_num_threads(),
    }
    table.complete = bool(done.all())
    table.validate()
    return table
