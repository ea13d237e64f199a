"""Measured damage curves: what pruning one block alone costs, at a grid of ratios (issue 13).

For every block k and level rho_j, block k's Linears are pruned (magnitude / Wanda / SparseGPT,
masks from *dense* calibration inputs, as if it were the only block pruned), every other block
stays dense, and we measure on the calibration tokens

* ``kl[k][j]``: mean over next-token positions of KL(p_dense || p_pruned), nats per token;
* ``dnll[k][j]``: mean NLL(pruned) - NLL(dense) on the observed next tokens, nats per token.

Cost. One capture pass records each block's call (:func:`capture_block_calls`); one dense
replay caches the hidden states at every block input, H_k (K+1 tensors of shape
(nsamples, seqlen, d), float32), and the dense log-probs (nsamples, seqlen-1, V) once. An
evaluation of (k, rho) then reruns only blocks k..K-1 from H_k plus the final norm and head,
one micro-batch at a time (logits never exceed (batch_size, seqlen, V)). The head is reached
generically: every block's forward is replaced by a pass-through (the last one returns the
precomputed hidden states) and the model's own forward runs (embedding lookup + final norm +
head + any logit soft-capping). The cost is recorded as a multiple of one plain forward pass
over the same tokens, timed in the same run.

In context (``context`` = per-block ratios, e.g. uniform at the target sparsity): the model is
first pruned at those ratios (ordinary sequential pruning on ``context_calib``), H_k are the
*pruned* model's block inputs, and (k, rho) re-prunes block k alone from its dense weights at
rho (masks from the pruned prefix's inputs, as sequential pruning would) while every other block
keeps its context mask; KL is still measured against the dense model. Each block is also
measured dense in that context (level 0), and the table holds the increase over it:
``kl[k][j] = KL(k at rho_j | context) - KL(k dense | context)``, ``dnll`` likewise, so the
program's anchor psi_k(0) = 0 is a measured point. This is the damage model linearised at the
operating point instead of at the dense model: at 60-70 % sparsity the blocks' damages interact
(an early block's error is amplified by the pruned blocks after it), which curves measured with
every other block dense cannot see. ``metadata["context"]`` keeps the ratios, the context's KL
and the per-block level-0 values.

Resumable: after every (block, level) the partial table is written atomically to
``checkpoint`` (``complete`` false, null where not measured); a rerun with the same model,
pruner, levels and calibration windows continues from it.

OBD. With curvature statistics (:func:`curvature_stats`: the scorer's per-window Fisher pass,
:func:`layercap.scores.methods.fisher_pass`), each (block, level) also gets the second-order
estimate 1/2 dW^T C dW for the pruner's actual weight change dW (= -W on the pruned entries
for magnitude / Wanda; SparseGPT also updates the kept weights): diagonal Fisher
sum_ij F_ij dW_ij^2 / 2, or K-FAC tr(G dW A dW^T) / 2 per Linear, summed over the block. With
sampled labels (``fisher="true"``) C is the Fisher of the model's own predictive distribution,
whose quadratic form is the second-order expansion of the same KL, so the units match.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from layercap.apply.prune.masks import parse_structure
from layercap.apply.prune.report import METHODS
from layercap.apply.prune.sequential import BlockCall, capture_block_calls, prune_linear
from layercap.apply.prune.sparsegpt import hessian_factor
from layercap.apply.prune.stats import attach_input_stats
from layercap.data.calibration import CalibrationSet
from layercap.errors import LayercapError
from layercap.models import Block, find_blocks, linear_weight
from layercap.models.load import model_source
from layercap.programs.damage import OBD_KINDS, DamageTable, check_levels, spearman

DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# ---- generic partial forward --------------------------------------------------------------
class _Chain:
    """The model's decoder chain replayed from cached calls: partial forwards and the head."""

    def __init__(self, model: nn.Module, blocks: list[Block], calls: list[list[BlockCall]], batches: list[torch.Tensor]):
        self.model, self.blocks, self.calls, self.batches = model, blocks, calls, batches
        self.out_len: int | None = None  # block output: tensor (0) or tuple of this length

    def run_block(self, k: int, j: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block k on micro-batch j's hidden states (B, T, d) -> its output hidden states."""
        call = self.calls[k][j]
        module = self.blocks[k].module
        out = module(*call.args, hidden_states=hidden, **call.kwargs) if call.hidden_kw else module(hidden, *call.args, **call.kwargs)
        if self.out_len is None:
            self.out_len = len(out) if isinstance(out, (tuple, list)) else 0
        return out[0] if isinstance(out, (tuple, list)) else out

    def run_from(self, k: int, j: int, hidden: torch.Tensor) -> torch.Tensor:
        """Blocks k..K-1 on micro-batch j starting from ``hidden`` = H_k -> H_K."""
        for i in range(k, len(self.blocks)):
            hidden = self.run_block(i, j, hidden)
        return hidden

    def head(self, j: int, final: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of micro-batch j from the last block's output ``final`` (B, T, d)."""
        n = self.out_len or 0
        wrap = (lambda h: h) if n == 0 else (lambda h: (h,) + (None,) * (n - 1))

        def passthrough(*args, **kwargs):
            return wrap(args[0] if args else kwargs["hidden_states"])

        def last(*args, **kwargs):
            return wrap(final)

        try:
            for i, block in enumerate(self.blocks):
                block.module.forward = last if i == len(self.blocks) - 1 else passthrough
            ids = self.batches[j].to(self.model.get_input_embeddings().weight.device)
            out = self.model(input_ids=ids, use_cache=False)
        finally:
            for block in self.blocks:
                block.module.__dict__.pop("forward", None)
        return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def _replay(model: nn.Module, blocks: list[Block], batches: list[torch.Tensor]) -> tuple[_Chain, list[list[torch.Tensor]]]:
    """The chain and the hidden states at every block input, H_0..H_K (K+1 lists of (B, T, d))."""
    inputs, calls = capture_block_calls(model, blocks, batches)
    chain = _Chain(model, blocks, calls, batches)
    states = [inputs]
    for k in range(len(blocks)):
        states.append([chain.run_block(k, j, h) for j, h in enumerate(states[-1])])
    return chain, states


def _check_context(context: Mapping[str, float], blocks: list[Block]) -> dict[str, float]:
    """Ratios of every block, each in [0, 1) (LayercapError naming the block otherwise)."""
    names = [b.name for b in blocks]
    missing, extra = [n for n in names if n not in context], [n for n in context if n not in names]
    if missing or extra:
        raise LayercapError(f"context ratios must name every block once: missing {missing[:3]}, unknown {extra[:3]}.")
    out = {}
    for n in names:
        v = context[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v < 1.0:
            raise LayercapError(f"context ratio of {n} = {v!r} must be a number in [0, 1).")
        out[n] = float(v)
    return out


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(B, T-1, V) log-probabilities of the next token at the predicted positions (float32 or wider)."""
    return torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _kl_nll(logp: torch.Tensor, logq: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Summed KL(p || q) and summed NLL of q at ``labels`` over all positions (float64)."""
    kl = (logp.exp() * (logp - logq)).sum(-1).double().sum()
    nll = -logq.gather(-1, labels.unsqueeze(-1)).double().sum()
    return float(kl), float(nll)


# ---- curvature for OBD --------------------------------------------------------------------
@dataclass
class Curvature:
    """Per-Linear curvature (qualified module name -> tensors, float32, (out, in) layout).

    ``diag``: diagonal Fisher of the weight, (out, in). ``kfac``: (A, G) with A (in, in)
    input second moments (bias column dropped) and G (out, out) output-gradient second
    moments; both scaled per predicted token (see :mod:`layercap.scores.methods`).
    """

    diag: dict[str, torch.Tensor]
    kfac: dict[str, tuple[torch.Tensor, torch.Tensor]]
    fisher: str
    wall_s: float

    @property
    def kinds(self) -> list[str]:
        return [k for k in OBD_KINDS if getattr(self, k)]


def curvature_stats(model: nn.Module, calib: CalibrationSet, kinds: Sequence[str] = ("diag",), *, blocks: list[Block] | None = None,
                    fisher: str = "true", seed: int = 0, batch_size: int = 4) -> Curvature:
    """The scorer's Fisher statistics of every block's Linears: one per-window pass per kind."""
    from layercap.scores.engine import make_context
    from layercap.scores.groups import param_groups
    from layercap.scores.methods import fisher_pass, is_conv1d, kron_linears
    from layercap.scores.registry import ScoreOptions

    bad = [k for k in kinds if k not in OBD_KINDS]
    if bad or not kinds:
        raise LayercapError(f"--obd {bad or kinds}: choose among {', '.join(OBD_KINDS)}.")
    t0 = time.perf_counter()
    groups = param_groups(model, "block")
    if blocks is not None and [g.name for g in groups] != [b.name for b in blocks]:
        raise LayercapError("OBD curvature needs the model's default decoder blocks (no --blocks override).")
    options = ScoreOptions(batch_size=batch_size, fisher=fisher, seed=seed)
    ctx = make_context(calib, options, "obd", groups, model)
    linears = kron_linears(groups)
    diag: dict[str, torch.Tensor] = {}
    kfac: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if "diag" in kinds:
        stats = fisher_pass(model, groups, ctx, linears={}, phase="obd-diag")
        for name, m in linears.items():
            f = stats.fisher_diag[f"{name}.weight"]
            diag[name] = f.t().contiguous() if is_conv1d(m) else f
        del stats
    if "kfac" in kinds:
        stats = fisher_pass(model, groups, ctx, linears, phase="obd-kfac")
        for name, m in linears.items():
            _, in_f = linear_weight(m).shape
            kfac[name] = (stats.a[name][:in_f, :in_f].contiguous(), stats.gg[name])
        del stats
    return Curvature(diag, kfac, fisher, time.perf_counter() - t0)


def _obd(curv: Curvature, block: Block, delta: dict[str, torch.Tensor]) -> dict[str, float]:
    """1/2 dW^T C dW of a block's weight changes ``delta`` (rel name -> (out, in)), per kind."""
    out = {}
    if curv.diag:
        out["diag"] = 0.5 * sum(float((curv.diag[f"{block.name}.{rel}"].double() * d.double().pow(2)).sum())
                                for rel, d in delta.items())
    if curv.kfac:
        total = 0.0
        for rel, d in delta.items():
            a, g = curv.kfac[f"{block.name}.{rel}"]
            d64 = d.double()
            total += 0.5 * float(((g.double() @ d64) * (d64 @ a.double())).sum())  # tr(G dW A dW^T), A sym
        out["kfac"] = total
    return out


# ---- the units ----------------------------------------------------------------------------
UNITS = ("block", "linear")


@dataclass(frozen=True)
class Unit:
    """What one row of a damage table prunes: the Linears ``rels`` of block ``block`` (index),
    ``params`` weights in all, named ``name`` (the block's name, or the Linear's full name)."""

    block: int
    name: str
    rels: tuple[str, ...]
    params: int


def prunable_units(blocks: Sequence[Block], units: str = "block") -> list[Unit]:
    """The rows of a damage table in ``units``: one per block (every Linear of it at one ratio) or,
    as EvoPress does, one per Linear (``model.layers.3.mlp.down_proj``; the pruners take full module
    names as well as block names)."""
    if units not in UNITS:
        raise LayercapError(f"units {units!r} is unknown; use one of {', '.join(UNITS)}.")
    if units == "block":
        return [Unit(k, b.name, tuple(b.linears), int(b.num_prunable)) for k, b in enumerate(blocks)]
    return [Unit(k, f"{b.name}.{rel}", (rel,), int(linear_weight(m).numel()))
            for k, b in enumerate(blocks) for rel, m in b.linears.items()]


# ---- the pass -----------------------------------------------------------------------------
def _calibration_record(calib: CalibrationSet) -> dict[str, Any]:
    n, seqlen = calib.input_ids.shape
    return {"sha256": calib.sha256, "source": calib.source, "nsamples": int(n), "seqlen": int(seqlen),
            "seed": int(calib.seed), "tokens": calib.num_tokens}


def _check_resume(old: DamageTable, new: DamageTable, path: Path) -> None:
    for key in ("model", "method", "structure", "blocks", "params", "levels"):
        if getattr(old, key) != getattr(new, key):
            raise LayercapError(f"{path}: the partial damage table has a different {key!r} ({getattr(old, key)!r}, now "
                                f"{getattr(new, key)!r}); delete it (or pass --fresh) to start over.")
    old_ctx, new_ctx = old.metadata.get("context") or {}, new.metadata.get("context") or {}
    if old_ctx.get("ratios") != new_ctx.get("ratios") or old_ctx.get("calibration_sha256") != new_ctx.get("calibration_sha256"):
        raise LayercapError(f"{path}: the partial damage table was measured in another context (pruned at other ratios, "
                            "or dense); delete it (or pass --fresh) to start over.")
    if old.calibration.get("sha256") != new.calibration.get("sha256"):
        raise LayercapError(f"{path}: the partial damage table was measured on other calibration windows; delete it "
                            "(or pass --fresh) to start over, or pass the same --data/--nsamples/--seqlen/--seed.")
    if set(old.obd) != set(new.obd):
        raise LayercapError(f"{path}: the partial damage table has OBD kinds {sorted(old.obd)}, now {sorted(new.obd)}; "
                            "delete it (or pass --fresh) to start over.")


@torch.no_grad()
def damage_curves(
    model: nn.Module,
    calib: CalibrationSet,
    levels: Sequence[float] = DEFAULT_LEVELS,
    method: str = "wanda",
    *,
    structure: str = "unstructured",
    blocks: list[Block] | None = None,
    batch_size: int = 4,
    curvature: Curvature | None = None,
    measure: bool = True,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    blocksize: int = 128,
    percdamp: float = 0.01,
    model_id: str | None = None,
    context: Mapping[str, float] | None = None,
    context_calib: CalibrationSet | None = None,
    units: str = "block",
) -> DamageTable:
    """The damage table of ``model`` on ``calib`` (see module docstring); the model is unchanged.

    ``units``: ``block`` (a row per block, every Linear of it pruned at the level) or ``linear``
    (a row per Linear, the rest of its block dense: 7x the rows on Llama blocks, each rerun from
    the same block input, so about 7x the cost; :func:`prunable_units`).

    ``context``: block name -> ratio of the operating point the curves are measured at (every
    block named; see the module docstring), pruned with ``context_calib`` (default ``calib``);
    None measures around the dense model.

    ``levels``: ratios in [0, 1), increasing. ``measure``: False skips the forward passes (OBD
    estimates only; kl/dnll then stay null and the table is marked incomplete). ``checkpoint``:
    the partial-table path (resumed from when it matches). Runs where the model is (CPU or GPU).
    """
    levels = check_levels(levels)
    if method not in METHODS:
        raise LayercapError(f"--method {method!r} is not a pruner; choose one of {', '.join(METHODS)}.")
    nm = parse_structure(structure)
    if nm is not None and any(abs(x - nm[0] / nm[1]) > 1e-9 for x in levels):
        raise LayercapError(f"{structure} sparsity fixes the ratio at {nm[0] / nm[1]:g}; pass --levels {nm[0] / nm[1]:g}.")
    if batch_size < 1:
        raise LayercapError(f"--batch-size must be >= 1, got {batch_size}.")
    if not measure and curvature is None:
        raise LayercapError("nothing to do: measure=False needs curvature statistics (--obd diag/kfac).")
    t_start = time.perf_counter()
    blocks = blocks if blocks is not None else find_blocks(model)
    unit_list = prunable_units(blocks, units)
    K, L, U = len(blocks), len(levels), len(unit_list)
    ctx_record = None
    if context is not None and units != "block":
        raise LayercapError("damage in context is measured per block; drop --units linear, or the context.")
    if context is not None:
        context = _check_context(context, blocks)
        if curvature is not None or not measure:
            raise LayercapError("damage in context is measured only (no OBD estimate): drop --obd, or the context.")
        ctx_calib = context_calib if context_calib is not None else calib
        ctx_record = {"ratios": context, "calibration_sha256": ctx_calib.sha256, "kl": None, "dnll": None,
                      "kl_block_dense": [None] * K, "dnll_block_dense": [None] * K}
    was_training = model.training
    model.eval()
    table = DamageTable(
        model=model_id or str(model_source(model)), method=method, structure=structure, blocks=[u.name for u in unit_list],
        params=[u.params for u in unit_list], levels=levels, kl=[[None] * L for _ in range(U)],
        dnll=[[None] * L for _ in range(U)], obd={k: [[0.0] * L for _ in range(U)] for k in (curvature.kinds if curvature else [])},
        calibration=_calibration_record(calib), complete=False,
        metadata={"batch_size": batch_size, "measured": measure, "blocksize": blocksize, "percdamp": percdamp, "units": units,
                  **({"context": ctx_record} if ctx_record is not None else {})},
    )
    done = np.zeros((U, L), dtype=bool)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    prior_s = 0.0
    if checkpoint is not None and checkpoint.is_file():
        old = DamageTable.load(checkpoint)
        _check_resume(old, table, checkpoint)
        table.kl, table.dnll, table.obd, table.dense_nll = old.kl, old.dnll, old.obd, old.dense_nll
        done = np.array(old.metadata.get("done", np.zeros((U, L), dtype=bool).tolist()), dtype=bool).reshape(U, L)
        if ctx_record is not None:
            ctx_record = table.metadata["context"] = old.metadata["context"]
        prior_s = float(old.cost.get("wall_s", 0.0))
    batches = list(calib.batches(batch_size))
    n_pred = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    dense_weights: dict[tuple[int, str], torch.Tensor] | None = None  # in context: every Linear's dense weight (CPU)
    try:
        # one plain forward over the same tokens: the unit of the cost
        t0 = time.perf_counter()
        for b in batches:
            model(input_ids=b.to(model.get_input_embeddings().weight.device), use_cache=False)
        forward_s = time.perf_counter() - t0
        t_setup = time.perf_counter()
        chain, states = _replay(model, blocks, batches)
        dense_logp, labels, dense_nll = [], [], 0.0
        if measure:
            for j, b in enumerate(batches):
                dense_logp.append(_log_probs(chain.head(j, states[K][j])))
                labels.append(b[:, 1:].to(dense_logp[-1].device))
                dense_nll += _kl_nll(dense_logp[-1], dense_logp[-1], labels[-1])[1]
            table.dense_nll = dense_nll / n_pred

        def measure_from(k: int) -> tuple[float, float]:
            """(mean KL to dense, mean NLL) of the model as it now is, rerun from block k's input."""
            kl = nll = 0.0
            for j in range(len(batches)):
                logq = _log_probs(chain.head(j, chain.run_from(k, j, states[k][j])))
                a, b = _kl_nll(dense_logp[j], logq, labels[j])
                kl, nll = kl + a, nll + b
                del logq
            return kl / n_pred, nll / n_pred

        if ctx_record is not None:  # prune at the operating point; its block inputs replace the dense ones
            from layercap.apply.prune.sequential import prune_model

            dense_weights = {(k, rel): linear_weight(m).detach().to("cpu", copy=True)
                             for k, b in enumerate(blocks) for rel, m in b.linears.items()}
            prune_model(model, context, method, calib=ctx_calib, structure=structure, batch_size=batch_size,
                        progress=False, blocks=blocks, blocksize=blocksize, percdamp=percdamp)
            del chain, states
            chain, states = _replay(model, blocks, batches)
            if ctx_record["kl"] is None:
                ctx_record["kl"], nll = measure_from(K)
                ctx_record["dnll"] = nll - table.dense_nll
        setup_s = time.perf_counter() - t_setup
        eval_s = mask_s = 0.0
        evaluations = 0
        bar = tqdm(total=U * L, initial=int(done.sum()), desc=f"damage ({method})", file=sys.stderr,
                   disable=not progress, unit="eval")
        for k, block in enumerate(blocks):
            rows = [i for i, u in enumerate(unit_list) if u.block == k]
            if done[rows].all():
                continue
            tm = time.perf_counter()
            active = dict(block.linears)
            restore = {rel: linear_weight(m).detach().clone() for rel, m in active.items()}  # block k between measurements
            if ctx_record is not None:  # block k back to dense: its masks come from the pruned prefix's inputs
                for rel, m in active.items():
                    linear_weight(m).copy_(dense_weights[(k, rel)])
            stats, factors = {}, {}
            if method != "magnitude":
                in_features = {rel: linear_weight(m).shape[1] for rel, m in active.items()}
                device = linear_weight(next(iter(active.values()))).device
                stats, handles = attach_input_stats(active, in_features, device, want_hessian=method == "sparsegpt")
                try:
                    for j, h in enumerate(states[k]):
                        chain.run_block(k, j, h)
                finally:
                    for hd in handles:
                        hd.remove()
                if method == "sparsegpt":  # Linears fed the same input share H^-1
                    shared: list[tuple[torch.Tensor, tuple]] = []
                    for rel, st in stats.items():
                        f = next((fa for hess, fa in shared if torch.equal(hess, st.hessian)), None)
                        if f is None:
                            f = hessian_factor(st.hessian, percdamp)
                            shared.append((st.hessian, f))
                        factors[rel] = f
            originals = {rel: linear_weight(m).detach().clone() for rel, m in active.items()}  # dense
            mask_s += time.perf_counter() - tm
            try:
                if ctx_record is not None and ctx_record["kl_block_dense"][k] is None:
                    te = time.perf_counter()
                    kl0, nll0 = measure_from(k)
                    ctx_record["kl_block_dense"][k], ctx_record["dnll_block_dense"][k] = kl0, nll0 - table.dense_nll
                    eval_s += time.perf_counter() - te
                    evaluations += 1
                for i in rows:
                    unit = {rel: active[rel] for rel in unit_list[i].rels}
                    for jl, level in enumerate(levels):
                        if done[i, jl]:
                            continue
                        tm = time.perf_counter()
                        for rel, m in unit.items():
                            linear_weight(m).copy_(originals[rel])
                            prune_linear(m, level, method, nm, stats.get(rel), blocksize, percdamp, factors.get(rel))
                        if curvature is not None:
                            delta = {rel: linear_weight(m).detach() - originals[rel] for rel, m in unit.items()}
                            for kind, value in _obd(curvature, block, delta).items():
                                table.obd[kind][i][jl] = value
                            del delta
                        mask_s += time.perf_counter() - tm
                        if measure:
                            te = time.perf_counter()
                            kl, nll = measure_from(k)
                            if ctx_record is None:
                                table.kl[i][jl], table.dnll[i][jl] = kl, nll - table.dense_nll
                            else:  # the increase over block k dense in the same context (block units: i == k)
                                table.kl[i][jl] = kl - ctx_record["kl_block_dense"][k]
                                table.dnll[i][jl] = nll - table.dense_nll - ctx_record["dnll_block_dense"][k]
                            eval_s += time.perf_counter() - te
                            evaluations += 1
                        done[i, jl] = True
                        bar.update(1)
                        if checkpoint is not None:
                            table.metadata["done"] = done.tolist()
                            table.cost = {"wall_s": prior_s + time.perf_counter() - t_start}
                            table.save(checkpoint)
                    for rel, m in unit.items():  # the next unit of this block sees this one as it was
                        linear_weight(m).copy_(originals[rel])
            finally:
                for rel, m in active.items():
                    linear_weight(m).copy_(restore[rel])
            del stats, factors, originals, restore
        bar.close()
    finally:
        if dense_weights is not None:  # the model leaves as it came: dense
            for k, b in enumerate(blocks):
                for rel, m in b.linears.items():
                    linear_weight(m).copy_(dense_weights[(k, rel)])
        model.train(was_training)
    wall_s = time.perf_counter() - t_start
    table.cost = {
        "forward_s": forward_s, "wall_s": wall_s, "resumed_wall_s": prior_s, "setup_s": setup_s, "eval_s": eval_s,
        "mask_s": mask_s, "evaluations": evaluations,
        "forward_equivalents": (wall_s - forward_s) / forward_s,
        "eval_forward_equivalents": eval_s / forward_s,
        "per_eval_forward_equivalents": (eval_s / forward_s / evaluations) if evaluations else None,
        "tokens": calib.num_tokens, "device": str(linear_weight(next(iter(blocks[0].linears.values()))).device),
        "threads": torch.get_num_threads(),
    }
    if curvature is not None:
        table.cost["curvature_s"] = curvature.wall_s
        table.metadata["fisher"] = curvature.fisher
    table.metadata.pop("done", None)
    table.complete = bool(measure)
    if measure:
        table.agreement = {kind: [spearman([r[j] for r in table.obd[kind]], [r[j] for r in table.kl]) for j in range(L)]
                           for kind in table.obd}
    table.validate()
    return table


def damage_table(model: nn.Module, calib: CalibrationSet, kind: str, levels: Sequence[float] = DEFAULT_LEVELS,
                 method: str = "wanda", *, structure: str = "unstructured", batch_size: int = 4,
                 checkpoint: str | Path | None = None, progress: bool = True, model_id: str | None = None,
                 context: Mapping[str, float] | None = None, context_calib: CalibrationSet | None = None) -> DamageTable:
    """The table a damage rule reads: ``damage`` = the KL measured when each block alone is pruned
    (resumable from ``checkpoint``), ``obd`` = its free second-order estimate only (diagonal Fisher,
    no pruned forward passes), ``context`` = the measured KL increase at the operating point
    ``context`` (block -> ratio, pruned on ``context_calib``; resumable); ``damage-linear`` /
    ``obd-linear``: the same with a row per Linear instead of per block. The model is unchanged."""
    from layercap.programs.rules import DAMAGE_SOURCES, LINEAR_SOURCES, table_units

    if kind not in DAMAGE_SOURCES + LINEAR_SOURCES:
        raise LayercapError(f"damage kind {kind!r} is unknown; use one of {', '.join(DAMAGE_SOURCES + LINEAR_SOURCES)}.")
    kind, units = table_units(kind)
    if (kind == "context") != (context is not None):
        raise LayercapError("damage kind 'context' needs the operating point's ratios (context=...), and only it does.")
    if kind == "obd":
        curv = curvature_stats(model, calib, ("diag",), batch_size=batch_size)
        return damage_curves(model, calib, levels, method, structure=structure, curvature=curv, measure=False,
                             batch_size=batch_size, progress=progress, model_id=model_id, units=units)
    return damage_curves(model, calib, levels, method, structure=structure, batch_size=batch_size, progress=progress,
                         checkpoint=checkpoint, model_id=model_id, context=context, context_calib=context_calib, units=units)
