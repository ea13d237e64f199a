"""Built-in estimators of zeta_k^2 = g_k^T (C_k + lambda_k I)^-1 g_k (SPEC section 1).

gradnorm  C = 0, lambda = 1: ||g_k||^2.
diag      C = diag F (per-window Fisher, see :mod:`layercap.scores.engine`).
kfac      per Linear: C = A (x) G with A = (1/N) sum_t a_t a_t^T (inputs, plus a ones column
          when the Linear has a bias) and G = (1/N) sum_t d_t d_t^T (d_t = gradient of the summed
          NLL w.r.t. the Linear's output at token t); other parameters of the group use diag F.
ekfac     K-FAC eigenbases, eigenvalues re-fitted as (1/N) sum_x (U_G^T S_x U_A)^2 with S_x the
          window's weight gradient (a second pass over the data).
exact     see :mod:`layercap.scores.exact`.

Scale: only predicted positions (all but the last of each window) enter A and G, and both are
divided by the predicted-token count N. For one window with one predicted token A (x) G equals
the per-window Fisher s s^T exactly, and for a window of T tokens K-FAC approximates
(1/N) sum_t (a_t a_t^T) (x) (d_t d_t^T), the token-wise Fisher; with sampled labels ("true") its
expectation is the GGN restricted to the Linear, on the same scale as ``diag`` and ``exact``.

Damping: relative (default) lambda_k = rho * trace(C_k) / dim_k, the mean eigenvalue of the
group's whole curvature (Kronecker pieces, corrected eigenvalues and diagonal entries
together); absolute: lambda_k = rho.

Windows are processed one at a time inside a micro-batch for diag/kfac/ekfac (per-window
gradients are needed for the Fisher and for the diagonal part of kfac); ``--batch-size`` then
only sets the checkpoint/progress granularity. gradnorm batches its forward passes.
Memory: a pass keeps the running sums of A and G (and g, diag F) of the groups it scores;
after it, the groups are eigendecomposed one at a time (freed before the next); ekfac's second
pass needs the eigenbases of all the pass's groups at once. ``options.max_factor_gb`` streams
the groups in chunks that fit that budget, one statistics pass (two for ekfac) per chunk, so a
7B model's factors (tens of GiB for all blocks) never need to be resident together. A pass
asks autograd only for its chunk's gradients, so it backpropagates no deeper than its lowest block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from layercap.errors import LayercapError
from layercap.models.blocks import LINEAR_TYPES
from layercap.scores.engine import (
    GradMode,
    RunContext,
    dist_info,
    logits_of,
    make_context,
    sample_labels,
    summed_nll,
    unique_params,
    zeros_like_f32,
)
from layercap.scores.registry import ScoreOptions, register

Step = dict[str, torch.Tensor]  # parameter name -> damped Newton step -(C + lambda I)^-1 g (float32)


class Piece(NamedTuple):
    """One part of a group's curvature: its trace, lambda -> zeta2 contribution and, where the
    part knows its parameters' names, lambda -> its damped Newton step (for the trust region)."""

    trace: float
    zeta2: Callable[[float], float]
    step: Callable[[float], Step] | None = None


# ---- damping and assembly -------------------------------------------------------------------
def damping_value(options: ScoreOptions, trace: float, dim: int) -> float:
    """lambda_k: rho * trace / dim (relative) or rho (absolute)."""
    if options.damping_mode == "absolute":
        return float(options.damping)
    return float(options.damping) * float(trace) / max(int(dim), 1)


def assemble(pieces: list[Piece], dim: int, options: ScoreOptions) -> tuple[float, float]:
    """(zeta2, lambda) of one group from its pieces."""
    lam = group_damping(pieces, dim, options)
    return group_zeta2(pieces, lam), lam


def group_damping(pieces: list[Piece], dim: int, options: ScoreOptions) -> float:
    """lambda_k of the damping rule from the group's total curvature trace."""
    return damping_value(options, sum(p.trace for p in pieces), dim)


def group_zeta2(pieces: list[Piece], lam: float) -> float:
    """g^T (C + lam I)^-1 g of a group at any lambda."""
    return float(sum(p.zeta2(lam) for p in pieces))


def group_step(pieces: list[Piece], lam: float) -> Step:
    """The damped Newton step -(C + lam I)^-1 g of a group, {parameter name: float32 tensor}."""
    out: Step = {}
    for p in pieces:
        if p.step is None:
            raise LayercapError("this curvature piece has no Newton step (built without parameter names); this is a bug.")
        out.update(p.step(lam))
    return out


def _ratio_sum(num: torch.Tensor, den: torch.Tensor) -> float:
    # zero curvature and zero damping only happen with zero gradient: count those as 0
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return float(torch.where(den > 0, num / safe, torch.zeros_like(num)).sum())


def diag_piece(g: torch.Tensor, fisher: torch.Tensor, name: str | None = None) -> Piece:
    """Diagonal curvature of one parameter; with ``name`` the piece also gives its Newton step."""
    g2 = g.double().pow(2)
    f = fisher.double().clamp_min(0)
    step = None if name is None else (lambda lam: {name: (-g.double() / (f + lam)).float()})
    return Piece(float(f.sum()), lambda lam: _ratio_sum(g2, f + lam), step)


def eig_psd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix in float64 (negatives from rounding -> 0).

    On CPU it runs through SciPy's LAPACK (divide and conquer, the same algorithm as
    ``torch.linalg.eigh``): measured about 2x faster than torch's build for the 1536 x 1536
    factors of SmolLM2's MLPs, which are most of a K-FAC pass's time. On GPU, torch."""
    m = m.double()
    m = 0.5 * (m + m.T)
    if m.device.type == "cpu":
        import scipy.linalg

        s, u = scipy.linalg.eigh(m.numpy(), driver="evd", check_finite=False)
        s, u = torch.from_numpy(s), torch.from_numpy(u)
    else:
        s, u = torch.linalg.eigh(m)
    return s.clamp_min(0), u


def kron_piece(grad: torch.Tensor, s_g: torch.Tensor, u_g: torch.Tensor, s_a: torch.Tensor, u_a: torch.Tensor,
               eigenvalues: torch.Tensor | None = None, split: Callable[[torch.Tensor], Step] | None = None) -> Piece:
    """zeta2 piece of one Linear: grad (out, in[+1]) in the Kronecker eigenbasis. ``split`` maps
    a step matrix (out, in[+1]) to the Linear's parameters (see :func:`linear_split`); with it the
    piece also gives its Newton step U_G ((U_G^T g U_A) / (ev + lam)) U_A^T."""
    proj = u_g.T @ grad.double() @ u_a
    proj2 = proj.pow(2)
    ev = torch.outer(s_g, s_a) if eigenvalues is None else eigenvalues.double().clamp_min(0)
    step = None if split is None else (lambda lam: split(-(u_g @ (proj / (ev + lam)) @ u_a.T)))
    return Piece(float(ev.sum()), lambda lam: _ratio_sum(proj2, ev + lam), step)


# ---- Linear bookkeeping -----------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear) and isinstance(module, LINEAR_TYPES)


def weight_matrix(module: nn.Module, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
    """[dW, db] as (out, in[+1]) whatever the module's weight layout (Conv1D is (in, out))."""
    w = weight_grad.t() if is_conv1d(module) else weight_grad
    if bias_grad is None:
        return w
    return torch.cat([w, bias_grad.reshape(-1, 1).to(w.dtype)], dim=1)


def linear_split(module: nn.Module, weight_name: str, bias_name: str | None) -> Callable[[torch.Tensor], Step]:
    """Inverse of :func:`weight_matrix`: a (out, in[+1]) matrix -> {weight name, bias name: float32
    tensors in the parameters' own layouts}."""

    def split(d: torch.Tensor) -> Step:
        dw = d[:, : d.shape[1] - (bias_name is not None)]
        out = {weight_name: (dw.t() if is_conv1d(module) else dw).float().contiguous()}
        if bias_name is not None:
            out[bias_name] = d[:, -1].float().contiguous()
        return out

    return split


def linear_dims(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    out_f, in_f = (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])
    return out_f, in_f + (1 if getattr(module, "bias", None) is not None else 0)


def kron_linears(groups) -> dict[str, nn.Module]:
    out = {}
    for g in groups:
        out.update(g.linears)
    return out


def linear_param_ids(linears: dict[str, nn.Module]) -> set[int]:
    ids = set()
    for m in linears.values():
        ids.add(id(m.weight))
        if getattr(m, "bias", None) is not None:
            ids.add(id(m.bias))
    return ids


class KronCapture:
    """Forward/backward hooks accumulating sum_t a a^T and sum_t d d^T into ``state``.

    Only predicted positions (all but the last of each window) are kept. ``grads_on`` selects
    which backward pass contributes to G (the one with observed or with sampled labels).
    """

    def __init__(self, linears: dict[str, nn.Module], state: dict[str, torch.Tensor]):
        self.state = state
        self.grads_on = False
        self.seqlen = 0  # tokens per window of the current forward (set by the pass)
        self.handles = [m.register_forward_hook(self._forward_hook(name, m)) for name, m in linears.items()]

    def _forward_hook(self, name: str, module: nn.Module):
        has_bias = getattr(module, "bias", None) is not None
        a_key, g_key = f"A:{name}", f"G:{name}"

        def hook(mod, inputs, output):
            a = self.predicted(inputs[0].detach()).float()
            if has_bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
            self.state[a_key].addmm_(a.T, a)
            if output.requires_grad:
                def grad_hook(grad):
                    if self.grads_on:
                        d = self.predicted(grad.detach()).float()
                        self.state[g_key].addmm_(d.T, d)

                output.register_hook(grad_hook)

        return hook

    def predicted(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of the predicted positions, (tokens, features); inputs may be (B, T, F) or (B*T, F)
        (OPT flattens before its MLP)."""
        x = x.reshape(-1, self.seqlen, x.shape[-1])[:, :-1]
        return x.reshape(-1, x.shape[-1])

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# ---- passes -----------------------------------------------------------------------------------
def gradient_pass(model: nn.Module, ctx: RunContext, names: list[str], params: list[nn.Parameter], phase: str = "gradient"):
    """g (float32, per parameter, already divided by N), micro-batched forward passes."""
    state = {f"g:{n}": zeros_like_f32(p) for n, p in zip(names, params)}

    def step(ids, index):
        loss = summed_nll(logits_of(model, ids), ids)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for n, gr in zip(names, grads):
            if gr is not None:
                state[f"g:{n}"].add_(gr.float())

    ctx.stream(phase, state, step)
    n_tok = ctx.windows.total_tokens
    return {n: state[f"g:{n}"] / n_tok for n in names}


def per_window_pass(model, ctx: RunContext, phase: str, names, params, state, on_window, capture: KronCapture | None = None):
    """Forward + backward per window; ``on_window(g_x, s_x)`` gets the empirical gradient and the
    Fisher gradient (sampled labels when fisher="true", else the same tensors)."""
    opts = ctx.options
    true_fisher = opts.fisher == "true"

    def step(ids, index):
        for b in range(ids.shape[0]):
            x = ids[b : b + 1]
            if capture is not None:
                capture.grads_on = not true_fisher
                capture.seqlen = x.shape[1]
            logits = logits_of(model, x)
            grads = torch.autograd.grad(summed_nll(logits, x), params, retain_graph=true_fisher, allow_unused=True)
            if true_fisher:
                labels = sample_labels(logits, index[b : b + 1], opts.seed)
                if capture is not None:
                    capture.grads_on = True
                fisher_grads = torch.autograd.grad(summed_nll(logits, x, labels), params, allow_unused=True)
            else:
                fisher_grads = grads
            if capture is not None:
                capture.grads_on = False
            on_window(
                [zeros_like_f32(p) if gr is None else gr.float() for p, gr in zip(params, grads)],
                [zeros_like_f32(p) if gr is None else gr.float() for p, gr in zip(params, fisher_grads)],
            )

    return ctx.stream(phase, state, step)


# ---- methods ----------------------------------------------------------------------------------
def gradnorm_group_pieces(model, groups, calib, options: ScoreOptions, method: str = "gradnorm", info: dict | None = None):
    """(group, pieces) per group with C = 0 (use lambda = 1: zeta2 = ||g||^2, step -g)."""
    ctx = make_context(calib, options, method, groups, model)
    names, params = unique_params(groups)
    with GradMode(model, params):
        g = gradient_pass(model, ctx, names, params)
    for grp in groups:
        yield grp, [diag_piece(g[n], torch.zeros_like(g[n]), n) for n, _ in grp.params]


def score_gradnorm(model, groups, calib, options: ScoreOptions) -> np.ndarray:
    return np.array([group_zeta2(pieces, 1.0) for _, pieces in gradnorm_group_pieces(model, groups, calib, options)])


@dataclass
class FisherStats:
    """Results of the first per-window pass, all divided by N (tokens)."""

    g: dict[str, torch.Tensor]  # parameter name -> mean gradient
    fisher_diag: dict[str, torch.Tensor]  # parameter name -> diag F (diag-treated parameters only)
    a: dict[str, torch.Tensor]  # linear name -> A
    gg: dict[str, torch.Tensor]  # linear name -> G


def fisher_pass(model, groups, ctx: RunContext, linears: dict[str, nn.Module], phase: str = "fisher") -> FisherStats:
    names, params = unique_params(groups)
    kron_ids = linear_param_ids(linears)
    diag_names = {n for n, p in zip(names, params) if id(p) not in kron_ids}
    state = {f"g:{n}": zeros_like_f32(p) for n, p in zip(names, params)}
    state.update({f"F:{n}": zeros_like_f32(p) for n, p in zip(names, params) if n in diag_names})
    for name, m in linears.items():
        out_f, in_f = linear_dims(m)
        dev = m.weight.device
        state[f"A:{name}"] = torch.zeros(in_f, in_f, dtype=torch.float32, device=dev)
        state[f"G:{name}"] = torch.zeros(out_f, out_f, dtype=torch.float32, device=dev)
    diag_idx = [(i, f"F:{n}") for i, n in enumerate(names) if n in diag_names]

    def on_window(grads, fisher_grads):
        for n, gr in zip(names, grads):
            state[f"g:{n}"].add_(gr)
        for i, key in diag_idx:
            state[key].addcmul_(fisher_grads[i], fisher_grads[i])

    capture = KronCapture(linears, state) if linears else None
    try:
        with GradMode(model, params):
            per_window_pass(model, ctx, phase, names, params, state, on_window, capture)
    finally:
        if capture is not None:
            capture.close()
    n_tok = ctx.windows.total_tokens
    pick = lambda prefix: {k[2:]: v.div_(n_tok) for k, v in state.items() if k.startswith(prefix)}
    return FisherStats(pick("g:"), pick("F:"), pick("A:"), pick("G:"))


def _linear_grad(stats: FisherStats, name: str, module: nn.Module, pnames: dict[int, str]) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return weight_matrix(module, stats.g[pnames[id(module.weight)]], None if bias is None else stats.g[pnames[id(bias)]])


def diag_group_pieces(model, groups, calib, options: ScoreOptions, method: str = "diag", info: dict | None = None) -> Iterator[tuple]:
    """(group, pieces) per group of the diagonal-Fisher curvature (one statistics pass)."""
    ctx = make_context(calib, options, method, groups, model)
    stats = fisher_pass(model, groups, ctx, linears={})
    for grp in groups:
        yield grp, [diag_piece(stats.g[n], stats.fisher_diag[n], n) for n, _ in grp.params]


def score_diag(model, groups, calib, options: ScoreOptions) -> np.ndarray:
    out, lams = [], []
    for grp, pieces in diag_group_pieces(model, groups, calib, options):
        z, lam = assemble(pieces, grp.num_params, options)
        out.append(z)
        lams.append(lam)
    return np.array(out), {"damping_lambda": lams}


def statistics_bytes(group) -> int:
    """Bytes of a group's float32 statistics in a kfac/ekfac pass: A and G of each Linear, the
    mean gradient of every parameter and diag F of the non-Linear ones (bounded by 2x params)."""
    factors = sum(4 * (i * i + o * o) for o, i in (linear_dims(m) for m in group.linears.values()))
    return factors + 8 * group.num_params


def factor_budget_bytes(model: nn.Module, options: ScoreOptions) -> int | None:
    """``options.max_factor_gb`` in bytes; on CUDA without one, 60% of the free device memory
    (the smallest over the ranks under torch.distributed: every rank must chunk alike, or the
    all-reduces of the passes would not pair up)."""
    if options.max_factor_gb is not None:
        return int(options.max_factor_gb * 2**30)
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    budget = torch.tensor([int(0.6 * free)], dtype=torch.int64, device=device)
    if dist_info()[1] > 1:
        torch.distributed.all_reduce(budget, op=torch.distributed.ReduceOp.MIN)
    return int(budget.item())


def chunk_groups(groups, budget: int | None) -> list[list]:
    """Consecutive groups packed greedily into chunks of at most ``budget`` statistics bytes (a
    group larger than the budget gets a chunk of its own); one chunk when there is no budget."""
    if budget is None:
        return [list(groups)]
    chunks, current, used = [], [], 0
    for grp in groups:
        size = statistics_bytes(grp)
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(grp)
        used += size
    if current:
        chunks.append(current)
    return chunks


def kfac_group_pieces(model, groups, calib, options: ScoreOptions, method: str, refit: bool,
                      info: dict | None = None) -> Iterator[tuple]:
    """(group, pieces) per group of the K-FAC (``refit``: EK-FAC) curvature, in group order.

    Groups are streamed in chunks that fit ``options.max_factor_gb`` (one statistics pass per
    chunk, two for EK-FAC); one group's eigendecompositions are alive at a time (the consumer
    should drop a group's pieces before asking for the next). ``info`` (a dict) receives the
    timings and the number of statistics passes."""
    ctx = make_context(calib, options, method, groups, model)
    chunks = chunk_groups(groups, factor_budget_bytes(model, options))
    info = {} if info is None else info
    timing = info.setdefault("timing", {"fisher_pass_s": 0.0, "ekfac_pass_s": 0.0, "solve_s": 0.0})
    info["statistics_passes"] = len(chunks)
    start = 0
    for chunk in chunks:
        # phase names carry the chunk so that --resume never mixes checkpoints of other chunkings
        suffix = "" if len(chunks) == 1 else f"[{start}:{start + len(chunk)}]"
        start += len(chunk)
        t0 = time.perf_counter()
        linears = kron_linears(chunk)
        stats = fisher_pass(model, chunk, ctx, linears, phase="fisher" + suffix)
        t1 = time.perf_counter()
        names, params = unique_params(chunk)
        pnames = {id(p): n for n, p in zip(names, params)}
        kron_ids = linear_param_ids(linears)
        corrected = None
        if refit:
            corrected = ekfac_pass(model, ctx, linears, stats, names, params, pnames, phase="ekfac" + suffix)
        t2 = time.perf_counter()
        # timings (s): statistics passes, EK-FAC passes (incl. their eigendecompositions), solve
        # (K-FAC: eigendecompositions + projections), summed over chunks
        timing["fisher_pass_s"] += t1 - t0
        timing["ekfac_pass_s"] += t2 - t1
        for grp in chunk:
            t3 = time.perf_counter()
            pieces = [diag_piece(stats.g[n], stats.fisher_diag[n], n) for n, p in grp.params if id(p) not in kron_ids]
            for name, module in grp.linears.items():
                bias = getattr(module, "bias", None)
                split = linear_split(module, pnames[id(module.weight)], None if bias is None else pnames[id(bias)])
                grad = _linear_grad(stats, name, module, pnames)
                if refit:
                    s_g, u_g, s_a, u_a = corrected["bases"].pop(name)
                    pieces.append(kron_piece(grad, s_g, u_g, s_a, u_a, corrected["E"].pop(name), split=split))
                else:
                    s_a, u_a = eig_psd(stats.a.pop(name))
                    s_g, u_g = eig_psd(stats.gg.pop(name))
                    pieces.append(kron_piece(grad, s_g, u_g, s_a, u_a, split=split))
                del s_a, u_a, s_g, u_g
            timing["solve_s"] += time.perf_counter() - t3
            yield grp, pieces
            del pieces
        del stats, corrected


def _kfac_like(model, groups, calib, options: ScoreOptions, method: str, refit: bool):
    info: dict = {}
    out, lams = [], []
    for grp, pieces in kfac_group_pieces(model, groups, calib, options, method, refit, info):
        t = time.perf_counter()
        z, lam = assemble(pieces, grp.num_params, options)
        info["timing"]["solve_s"] += time.perf_counter() - t
        out.append(z)
        lams.append(lam)
    return np.array(out), {"damping_lambda": lams, **info}


def ekfac_pass(model, ctx: RunContext, linears, stats: FisherStats, names, params, pnames, phase: str = "ekfac") -> dict:
    """Second pass: E[(U_G^T S_x U_A)^2] per Linear (the EK-FAC eigenvalue correction)."""
    bases = {}
    for name in linears:
        s_a, u_a = eig_psd(stats.a.pop(name))
        s_g, u_g = eig_psd(stats.gg.pop(name))
        bases[name] = (s_g, u_g.float(), s_a, u_a.float())
    state = {f"E:{name}": torch.zeros(bases[name][1].shape[0], bases[name][3].shape[0], dtype=torch.float32,
                                      device=m.weight.device) for name, m in linears.items()}
    index = {n: i for i, n in enumerate(names)}
    plan = []
    for name, m in linears.items():
        bias = getattr(m, "bias", None)
        plan.append((name, m, index[pnames[id(m.weight)]], None if bias is None else index[pnames[id(bias)]]))

    def on_window(grads, fisher_grads):
        for name, m, wi, bi in plan:
            s = weight_matrix(m, fisher_grads[wi], None if bi is None else fisher_grads[bi])
            _, u_g, _, u_a = bases[name]
            state[f"E:{name}"].add_((u_g.T @ s @ u_a).pow_(2))

    with GradMode(model, params):
        per_window_pass(model, ctx, phase, names, params, state, on_window)
    n_tok = ctx.windows.total_tokens
    bases = {k: (s_g, u_g.double(), s_a, u_a.double()) for k, (s_g, u_g, s_a, u_a) in bases.items()}
    return {"bases": bases, "E": {name: state[f"E:{name}"] / n_tok for name in linears}}


def score_kfac(model, groups, calib, options: ScoreOptions):
    return _kfac_like(model, groups, calib, options, "kfac", refit=False)


def score_ekfac(model, groups, calib, options: ScoreOptions):
    return _kfac_like(model, groups, calib, options, "ekfac", refit=True)


register("gradnorm", score_gradnorm, description="||g_k||^2 (C = 0, lambda = 1)")
register("diag", score_diag, description="diagonal Fisher")
register("kfac", score_kfac, description="Kronecker-factored Fisher per Linear, diagonal elsewhere")
register("ekfac", score_ekfac, description="K-FAC eigenbasis with re-fitted eigenvalues")
