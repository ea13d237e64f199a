"""Calibrated gains: a Levenberg-Marquardt trust region per block, and the measured ``gain``.

zeta_k^2 / 2 = g_k^T (C_k + lambda_k I)^-1 g_k / 2 is the decrease of the mean token NLL that
the damped quadratic model predicts for the damped Newton step d_k = -(C_k + lambda_k I)^-1 g_k
applied to block k alone. ``<base>-tr`` (base = diag, kfac, ekfac, exact) checks that prediction
against the loss itself, on the same calibration windows, and adapts lambda_k until they agree:

    r_k(lambda) = [L(theta) - L(theta + d_k(lambda))] / (zeta_k^2(lambda) / 2)

Starting from the base method's lambda_k (its damping rule), each trial costs one forward pass
over the calibration windows (no backward). r < 1/4 (the model overpredicts, or the step raises
the loss): lambda grows by ``options.tr_factor``; r > 3/4: it shrinks by the same factor; once a
too-small and a large-enough lambda are known, the next trial is their geometric mean (the
bracket is bisected in log-space). The search stops at the first r in [1/4, 3/4], when the
bracket is narrower than a factor 1.5, or after ``options.tr_max_evals`` trials. The accepted
lambda is the in-band one, else the smallest lambda tried with r > 3/4, else (no trial reduced
the loss enough) the largest one tried, flagged ``tr_accepted = False``. The score is zeta_k^2
at the accepted lambda. On an exact quadratic r = 2 - g'M C M g / g'M g (M = (C + lambda I)^-1)
lies in (1, 2], so lambda shrinks each trial and r -> 1, zeta^2 / 2 -> the exact decrease
g' C^-1 g / 2 (tests/test_trust_region.py).

``gain-<base>`` (``gain`` = ``gain-kfac``) runs the same trust region and then a line search
along the accepted step: t is halved while that reduces the loss further (or, when t = 1/2 is
worse than t = 1, doubled while that helps), at most ``GAIN_LINE_SEARCH`` more forward passes.
Its score is twice the measured decrease at the best t (on zeta^2's scale: score / 2 = nats per
token removed), clamped at 0.

Per-block results go into ``metadata.method_info`` of the scores file as lists aligned with
``layers`` (see :mod:`layercap.scorefile`): ``initial_lambda``, ``damping_lambda`` (accepted),
``tr_ratio`` (r at the accepted lambda), ``tr_accepted``, ``tr_evals`` (forward passes of the
search), ``predicted_decrease`` (zeta^2 / 2 at the accepted lambda), ``measured_decrease``, and
``tr_history`` (per block, [lambda, r] of every trial); gain adds ``gain_scale`` and
``gain_decrease``. ``base_loss`` is L(theta) and ``forward_passes`` the total of the searches.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from layercap.errors import LayercapError
from layercap.scores.engine import all_reduce_, logits_of, make_context, summed_nll
from layercap.scores.exact import exact_group_pieces
from layercap.scores.methods import (
    Step, diag_group_pieces, gradnorm_group_pieces, group_damping, group_step, group_zeta2, kfac_group_pieces,
)
from layercap.scores.registry import ScoreOptions, register

TR_LOW, TR_HIGH = 0.25, 0.75
BRACKET = 1.5  # stop bisecting once the too-small / large-enough lambdas are this close
GAIN_LINE_SEARCH = 3  # extra forward passes of the gain's line search


# ---- measuring a step -----------------------------------------------------------------------
@torch.no_grad()
def mean_loss(model, windows, batch_size: int, device) -> float:
    """Mean next-token NLL (nats/token) over ``windows`` (an engine ``Windows``: this rank's
    share; the sum is all-reduced over ranks)."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros(1, dtype=torch.float64, device=device)
        for ids, _ in windows.batches(batch_size):
            ids = ids.to(device)
            total += float(summed_nll(logits_of(model, ids), ids))
        all_reduce_({"loss": total})
        return float(total) / windows.total_tokens
    finally:
        model.train(was_training)


@contextmanager
@torch.no_grad()
def stepped(group, step: Step, scale: float = 1.0):
    """Temporarily add ``scale * step`` to the group's parameters (restored on exit)."""
    params = dict(group.params)
    saved = {n: params[n].detach().clone() for n in step}
    try:
        for n, s in step.items():
            params[n].add_(s.to(params[n].device, params[n].dtype), alpha=scale)
        yield
    finally:
        for n, w in saved.items():
            params[n].copy_(w)


def loss_after_step(model, ctx, group, step: Step, scale: float = 1.0) -> float:
    """Mean NLL on ``ctx``'s windows with ``scale * step`` added to the group (then restored)."""
    with stepped(group, step, scale):
        return mean_loss(model, ctx.windows, ctx.options.batch_size, ctx.device)


# ---- the trust region (pure: any solve / decrease) ------------------------------------------------
@dataclass
class TrustRegion:
    """Outcome for one block: the accepted lambda, zeta2 and r there, and every trial."""

    initial_lambda: float
    lam: float
    zeta2: float
    ratio: float
    decrease: float
    accepted: bool
    history: list[tuple[float, float]] = field(default_factory=list)  # (lambda, r) per trial
    step: Step | None = None

    @property
    def evals(self) -> int:
        return len(self.history)


def reduction_ratio(decrease: float, zeta2: float) -> float:
    """r = measured decrease / (zeta2 / 2); 1 when both are 0 (zero gradient)."""
    pred = 0.5 * zeta2
    if pred <= 0:
        return 1.0 if decrease == 0 else math.copysign(math.inf, decrease)
    return decrease / pred


def trust_region(solve: Callable[[float], tuple[float, Step]], decrease: Callable[[Step], float], lam0: float,
                 max_evals: int = 6, factor: float = 30.0) -> TrustRegion:
    """Levenberg-Marquardt search over lambda (module docstring). ``solve(lam) -> (zeta2, step)``,
    ``decrease(step) -> L(theta) - L(theta + step)`` (one forward pass)."""
    trials: dict[float, tuple[float, float, float, Step]] = {}  # lam -> (zeta2, decrease, r, step)
    history = []
    too_small, large_enough = None, None  # largest lam with r < 1/4, smallest with r > 3/4
    lam, in_band = lam0, None
    for _ in range(max(int(max_evals), 1)):
        z, d = solve(lam)
        red = decrease(d)
        r = reduction_ratio(red, z)
        trials[lam] = (z, red, r, d)
        history.append((lam, r))
        if TR_LOW <= r <= TR_HIGH:
            in_band = lam
            break
        if r < TR_LOW:
            too_small = lam if too_small is None else max(too_small, lam)
        else:
            large_enough = lam if large_enough is None else min(large_enough, lam)
        if too_small is not None and large_enough is not None:
            if large_enough / too_small < BRACKET:
                break
            lam = math.sqrt(too_small * large_enough)
        elif too_small is not None:
            lam = too_small * factor
        else:
            lam = large_enough / factor
        if not (lam > 0 and math.isfinite(lam)):  # zero initial damping (no curvature): nothing to adapt
            break
        # keep trials' steps only for the candidates that can still be accepted
        for old in [k for k in trials if k not in (in_band, large_enough, too_small)]:
            trials[old] = trials[old][:3] + (None,)
    if in_band is not None:
        pick, ok = in_band, True
    elif large_enough is not None:
        pick, ok = large_enough, True
    else:
        pick, ok = max(trials), False
    z, red, r, d = trials[pick]
    return TrustRegion(lam0, pick, z, r, red, ok, history, d)


def line_search(decrease: Callable[[float], float], at_one: float, max_evals: int = GAIN_LINE_SEARCH) -> tuple[float, float]:
    """(best t, decrease at t) along a step whose decrease at t = 1 is ``at_one``; ``decrease(t)``
    measures one scale. Halves t while that helps; if t = 1/2 is worse than t = 1, doubles it."""
    best_t, best = 1.0, at_one
    if max_evals < 1:
        return best_t, best
    t = 0.5
    red = decrease(t)
    evals, direction = 1, 0.5
    if red <= best:
        direction, t = 2.0, 2.0
        if evals < max_evals:
            red, evals = decrease(t), evals + 1
    while red > best:
        best_t, best = t, red
        if evals >= max_evals:
            break
        t *= direction
        red, evals = decrease(t), evals + 1
    return best_t, best


# ---- score methods ----------------------------------------------------------------------------
BASES: dict[str, tuple[Callable, dict]] = {
    "diag": (diag_group_pieces, {}),
    "kfac": (kfac_group_pieces, {"refit": False}),
    "ekfac": (kfac_group_pieces, {"refit": True}),
    "exact": (exact_group_pieces, {}),
}
STEP_BASES = {"gradnorm": (gradnorm_group_pieces, {}), **BASES}


def newton_steps(model, groups, calib, options: ScoreOptions, base: str) -> tuple[list[Step], list[float], dict]:
    """The damped Newton step d_k = -(C_k + lambda_k I)^-1 g_k of method ``base`` (gradnorm: C = 0,
    lambda = 1, d = -g; diag, kfac, ekfac, exact: the method's own damping rule) for every group,
    with zeta2_k = g_k^T (-d_k) (the method's score) and the statistics' info."""
    if base not in STEP_BASES:
        raise LayercapError(f"no Newton step for {base!r}; choose from {', '.join(STEP_BASES)}.")
    pieces_of, kwargs = STEP_BASES[base]
    info: dict = {}
    steps, zetas = [], []
    for grp, pieces in pieces_of(model, groups, calib, options, method=f"newton-{base}", info=info, **kwargs):
        lam = 1.0 if base == "gradnorm" else group_damping(pieces, grp.num_params, options)
        steps.append(group_step(pieces, lam))
        zetas.append(group_zeta2(pieces, lam))
        del pieces
    return steps, zetas, info


def calibrated(model, groups, calib, options: ScoreOptions, base: str, method: str, gain: bool = False):
    """zeta2 (K,) and info of ``<base>-tr`` (or ``gain-<base>``); see the module docstring."""
    pieces_of, kwargs = BASES[base]
    ctx = make_context(calib, options, method + ":loss", groups, model)
    t0 = time.perf_counter()
    base_loss = mean_loss(model, ctx.windows, options.batch_size, ctx.device)
    info: dict = {}
    cols: dict[str, list] = {k: [] for k in ("initial_lambda", "damping_lambda", "tr_ratio", "tr_accepted", "tr_evals",
                                             "predicted_decrease", "measured_decrease", "tr_history")}
    if gain:
        cols.update(gain_scale=[], gain_decrease=[])
    zetas, passes, search_s, ls_s = [], 1, 0.0, 0.0
    for grp, pieces in pieces_of(model, groups, calib, options, method=method, info=info, **kwargs):
        t = time.perf_counter()
        tr = trust_region(lambda lam: (group_zeta2(pieces, lam), group_step(pieces, lam)),
                          lambda d: base_loss - loss_after_step(model, ctx, grp, d),
                          group_damping(pieces, grp.num_params, options), options.tr_max_evals, options.tr_factor)
        passes += tr.evals
        for key, value in (("initial_lambda", tr.initial_lambda), ("damping_lambda", tr.lam), ("tr_ratio", tr.ratio),
                           ("tr_accepted", tr.accepted), ("tr_evals", tr.evals), ("predicted_decrease", 0.5 * tr.zeta2),
                           ("measured_decrease", tr.decrease), ("tr_history", [list(h) for h in tr.history])):
            cols[key].append(value)
        if gain:
            t_ls = time.perf_counter()
            counter = [0]

            def at_scale(s, d=tr.step):
                counter[0] += 1
                return base_loss - loss_after_step(model, ctx, grp, d, s)

            best_t, best = line_search(at_scale, tr.decrease)
            passes += counter[0]
            cols["gain_scale"].append(best_t)
            cols["gain_decrease"].append(best)
            zetas.append(2.0 * max(best, 0.0))
            ls_s += time.perf_counter() - t_ls
        else:
            zetas.append(tr.zeta2)
        search_s += time.perf_counter() - t
        del pieces, tr
    info.setdefault("timing", {})["trust_region_s"] = search_s - ls_s
    info["timing"]["gain_line_search_s"] = ls_s
    info["timing"]["total_s"] = time.perf_counter() - t0
    # r can be +-inf only with a zero prediction and a non-zero change: JSON has no inf
    cols["tr_ratio"] = [r if math.isfinite(r) else float(np.sign(r) * 1e300) for r in cols["tr_ratio"]]
    for hist in cols["tr_history"]:
        for h in hist:
            h[1] = h[1] if math.isfinite(h[1]) else float(np.sign(h[1]) * 1e300)
    info.update(cols, base_loss=base_loss, forward_passes=passes, base_method=base,
                tr_band=[TR_LOW, TR_HIGH], tr_factor=options.tr_factor, tr_max_evals=options.tr_max_evals)
    return np.array(zetas), info


def _register() -> None:
    for base in BASES:
        register(f"{base}-tr", lambda m, g, c, o, base=base: calibrated(m, g, c, o, base, f"{base}-tr"),
                 description=f"{base} zeta^2 at the Levenberg-Marquardt lambda where the measured loss decrease "
                 "matches zeta^2/2 (r in [1/4, 3/4])")
        register(f"gain-{base}", lambda m, g, c, o, base=base: calibrated(m, g, c, o, base, f"gain-{base}", gain=True),
                 description=f"2 x measured loss decrease of the line-searched {base}-tr Newton step")
    register("gain", lambda m, g, c, o: calibrated(m, g, c, o, "kfac", "gain", gain=True),
             description="gain-kfac: 2 x measured loss decrease of the line-searched kfac-tr Newton step")


_register()
