"""``exact``: zeta_k^2 with the block's generalised Gauss-Newton matrix, matrix-free.

C_k = (1/N) sum_t J_t^T H_t J_t, J_t = d logits_t / d theta_k (other parameters fixed),
H_t = diag(p_t) - p_t p_t^T the softmax cross-entropy Hessian of token t. Products C_k v are
formed with one forward-mode (jvp) and one reverse-mode (vjp) pass per micro-batch via
torch.func (the math attention kernel is forced: fused CPU attention has no forward-mode AD).
(C_k + lambda_k I) x = g_k is solved by conjugate gradients (stop when ||r|| <= cg_tol ||g||
or after cg_max_iter iterations), zeta_k^2 = g_k^T x.

Relative damping needs trace(C_k). It is estimated without forming C_k: with labels y sampled
from the model, E_y ||grad_theta_k sum_t nll_t(y)||^2 = sum_t tr(J_t^T H_t J_t), so
trace(C_k) ~= (1/N) sum_x mean over ``trace_samples`` draws of ||s_x||^2 (unbiased; one
extra per-window pass; every token contributes an independent draw). Tests that compare with
a dense solve use absolute damping, or the same estimate.

Each CG iteration is a full pass over the calibration data, so this is the reference for small
models and tests, not a production path. Resume covers the gradient and trace passes; CG
restarts.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from layercap.scores.engine import (
    GradMode,
    RunContext,
    all_reduce_,
    logits_of,
    make_context,
    sample_labels,
    sdpa_math,
    summed_nll,
    unique_params,
)
from layercap.scores.methods import Piece, gradient_pass, group_damping, group_step, group_zeta2
from layercap.scores.registry import ScoreOptions, register


def trace_pass(model, groups, ctx: RunContext, names, params) -> list[float]:
    """Unbiased estimates of trace(C_k) for every group (see module docstring)."""
    opts = ctx.options
    state = {f"T:{k}": torch.zeros(1, dtype=torch.float64, device=ctx.device) for k in range(len(groups))}
    index = {n: i for i, n in enumerate(names)}
    members = [[index[n] for n, _ in grp.params] for grp in groups]

    def step(ids, idx):
        for b in range(ids.shape[0]):
            x = ids[b : b + 1]
            logits = logits_of(model, x)
            for draw in range(opts.trace_samples):
                labels = sample_labels(logits, idx[b : b + 1], opts.seed, draw=1 + draw)
                last = draw == opts.trace_samples - 1
                grads = torch.autograd.grad(summed_nll(logits, x, labels), params, retain_graph=not last, allow_unused=True)
                for k, ids_k in enumerate(members):
                    sq = sum(float(grads[i].double().pow(2).sum()) for i in ids_k if grads[i] is not None)
                    state[f"T:{k}"] += sq / opts.trace_samples

    ctx.stream("trace", state, step)
    n_tok = ctx.windows.total_tokens
    return [float(state[f"T:{k}"]) / n_tok for k in range(len(groups))]


def ggn_vp(model, ctx: RunContext, params: list[torch.nn.Parameter], vec: list[torch.Tensor]) -> list[torch.Tensor]:
    """C v for one group (float32, one tensor per parameter), summed over all ranks' windows.

    J v comes from the double-backward identity J v = d/du [(J^T u) . v] (one forward pass with
    graph; forward-mode AD through Hugging Face models is slower on CPU), then C v = J^T (H J v).
    Needs grad enabled on ``params`` (caller's GradMode).
    """
    out = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    tangents = [v.to(p.dtype) for p, v in zip(params, vec)]
    for ids, _ in ctx.windows.batches(ctx.options.batch_size):
        ids = ids.to(ctx.device)
        with sdpa_math():
            logits = logits_of(model, ids)
            u = torch.zeros_like(logits, requires_grad=True)
            jtu = torch.autograd.grad(logits, params, u, create_graph=True, allow_unused=True)
            pairs = [(j, t) for j, t in zip(jtu, tangents) if j is not None]
            (jv,) = torch.autograd.grad([j for j, _ in pairs], u, [t for _, t in pairs], retain_graph=True)
            probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)
            w = jv[:, :-1].float()
            hu = probs * w - probs * (probs * w).sum(-1, keepdim=True)
            cot = torch.zeros_like(logits)
            cot[:, :-1] = hu.to(logits.dtype)
            grads = torch.autograd.grad(logits, params, cot, allow_unused=True)
        for o, gr in zip(out, grads):
            if gr is not None:
                o.add_(gr.detach().float())
    state = {str(i): o for i, o in enumerate(out)}
    all_reduce_(state)
    n_tok = ctx.windows.total_tokens
    return [o / n_tok for o in out]


def conjugate_gradients(matvec, b: torch.Tensor, lam: float, tol: float, max_iter: int) -> tuple[torch.Tensor, int, float]:
    """Solve (C + lam I) x = b (float64 vectors); returns (x, iterations, relative residual)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float(r @ r)
    b_norm = rs ** 0.5
    if b_norm == 0:
        return x, 0, 0.0
    it = 0
    for it in range(1, max_iter + 1):
        ap = matvec(p) + lam * p
        denom = float(p @ ap)
        if denom <= 0:  # C is PSD and lam > 0; only rounding can get here
            break
        alpha = rs / denom
        x += alpha * p
        r -= alpha * ap
        rs_new = float(r @ r)
        if rs_new ** 0.5 <= tol * b_norm:
            rs = rs_new
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, it, rs ** 0.5 / b_norm


def exact_group_pieces(model, groups, calib, options: ScoreOptions, method: str = "exact", info: dict | None = None):
    """(group, [piece]) per group: one :class:`~layercap.scores.methods.Piece` whose zeta2(lam)
    and step(lam) share one CG solve of (C_k + lam I) x = g_k per lambda (the step is -x).
    ``info`` (a dict) receives per solve the lambda, CG iterations and residual, and the trace
    estimates (relative damping)."""
    ctx = make_context(calib, options, method, groups, model)
    names, params = unique_params(groups)
    with GradMode(model, params):
        g = gradient_pass(model, ctx, names, params)
        traces = trace_pass(model, groups, ctx, names, params) if options.damping_mode == "relative" else None
    info = {} if info is None else info
    if traces is not None:
        info["trace_estimate"] = traces
    solves = info.setdefault("cg_solves", [])
    from tqdm import tqdm

    for k, grp in enumerate(tqdm(groups, desc="exact CG", unit="group", file=sys.stderr,
                                 disable=not options.progress or ctx.rank != 0, leave=False)):
        gparams = [p for _, p in grp.params]
        sizes = [p.numel() for p in gparams]
        b = torch.cat([g[n].reshape(-1) for n, _ in grp.params]).double()

        def matvec(v: torch.Tensor, gparams=gparams, sizes=sizes) -> torch.Tensor:
            parts = [part.reshape(p.shape) for part, p in zip(torch.split(v, sizes), gparams)]
            with GradMode(model, gparams):
                cv = ggn_vp(model, ctx, gparams, parts)
            return torch.cat([c.reshape(-1) for c in cv]).double()

        cache: dict[float, torch.Tensor] = {}

        def solve(lam: float, b=b, matvec=matvec, cache=cache, k=k) -> torch.Tensor:
            if lam not in cache:
                cache.clear()  # one solution per group alive at a time
                x, it, res = conjugate_gradients(matvec, b, lam, options.cg_tol, options.cg_max_iter)
                solves.append({"group": k, "lambda": lam, "cg_iterations": it, "cg_relative_residual": res})
                cache[lam] = x
            return cache[lam]

        def step(lam: float, grp=grp, sizes=sizes, solve=solve) -> dict:
            return {n: -part.reshape(p.shape).float() for (n, p), part in zip(grp.params, torch.split(solve(lam), sizes))}

        trace = traces[k] if traces is not None else 0.0
        yield grp, [Piece(trace, lambda lam, b=b, solve=solve: float(b @ solve(lam)), step)]


def exact_solutions(model, groups, calib, options: ScoreOptions, keep_solutions: bool = False):
    """(zeta2 (K,), info, solutions): CG solutions x_k = (C_k + lambda_k I)^-1 g_k per group, as
    {parameter name: float32 tensor} when ``keep_solutions`` (the damped Newton step is -x_k),
    else None. ``info`` holds lambda, CG iterations and residuals (and the trace estimates)."""
    raw: dict = {}
    zetas, lams = [], []
    solutions = [] if keep_solutions else None
    for grp, pieces in exact_group_pieces(model, groups, calib, options, info=raw):
        lam = group_damping(pieces, grp.num_params, options)
        zetas.append(group_zeta2(pieces, lam))
        if solutions is not None:
            solutions.append({n: -d for n, d in group_step(pieces, lam).items()})
        lams.append(lam)
    info = {"damping_lambda": lams, "cg_iterations": [s["cg_iterations"] for s in raw["cg_solves"]],
            "cg_relative_residual": [s["cg_relative_residual"] for s in raw["cg_solves"]]}
    if "trace_estimate" in raw:
        info["trace_estimate"] = raw["trace_estimate"]
    return np.array(zetas), info, solutions


def score_exact(model, groups, calib, options: ScoreOptions):
    zetas, info, _ = exact_solutions(model, groups, calib, options)
    return zetas, info


register("exact", score_exact, description="block GGN by matrix-vector products + conjugate gradients")
