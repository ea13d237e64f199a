"""Search refinement of per-block sparsity: EvoPress-style (1 + lambda) evolution, and ATP's slope.

Level grid (exact budget with blocks of unequal size). The budget is counted in *units* of
delta pruned weights: block k at u_k units has ratio rho_k = u_k delta / N_k, and
delta = T / U with T = s sum_k N_k and U = round(T / (step min_k N_k)), so a configuration
meets the target exactly iff sum_k u_k = U (sum_k N_k rho_k = delta U = T, up to float
round-off). A level-switch mutation moves m units from one block to another (one block up a
level, another down), which keeps sum u_k = U: no repair step is ever needed. With equal blocks
one unit is a ratio step of ``step`` exactly (SmolLM2, s = 0.5, step = 0.01: 1,500 units).
The start ratios are mapped onto the grid by floor + largest remainder (within the bounds).

Selection (multi-step, as in EvoPress): each generation makes ``offspring`` children of the
parent (1..``max_swaps`` level switches each), scores every child on the few *screen* windows,
re-scores the best ``confirm`` of them on all *confirm* windows, and the best confirmed child
replaces the parent only if its confirm fitness is strictly lower. The parent's own confirm
fitness is measured at the start, so the result is never worse than the start (on the confirm
windows). Budget: ``generations`` x (``offspring`` screens + ``confirm`` confirmations), fixed.

Fitness (:class:`KLFitness`): mean KL(p_dense || p_pruned) over the next-token positions of
the calibration windows, every block pruned at its ratio with the pruner's mask from *dense*
block inputs (EvoPress's per-level database, computed on demand). It reuses the cached partial
forward: the parent's hidden states at every block input are kept, and a child, which differs
from its parent only in a few blocks, is rerun from the first block it changes.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from layercap.apply.prune.damage import _Chain, _kl_nll, _log_probs
from layercap.apply.prune.masks import parse_structure
from layercap.apply.prune.report import METHODS
from layercap.apply.prune.sequential import capture_block_calls, prune_linear
from layercap.apply.prune.sparsegpt import hessian_factor
from layercap.apply.prune.stats import attach_input_stats
from layercap.data.calibration import CalibrationSet
from layercap.errors import LayercapError
from layercap.models import Block, find_blocks, linear_weight
from layercap.programs.atp import atp_rho
from layercap.programs.damage import TRUST_RADII
from layercap.programs.records import PruningRatios, RatioLayer

SCREEN, CONFIRM = 0, 1


# ---- the level grid -----------------------------------------------------------------------
@dataclass(frozen=True)
class UnitGrid:
    """Units of ``delta`` pruned weights per block; see the module docstring. Shapes (K,)."""

    N: np.ndarray
    sparsity: float
    delta: float
    total: int
    lo_units: np.ndarray
    hi_units: np.ndarray

    @classmethod
    def make(cls, params: Sequence[int], sparsity: float, step: float = 0.01, min_ratio: float = 0.0,
             max_ratio: float = 0.95) -> "UnitGrid":
        N = np.asarray(params, dtype=np.float64)
        if N.ndim != 1 or N.size == 0 or np.any(N < 1):
            raise LayercapError("search: params must list the prunable weights (>= 1) of every block.")
        if not (0 < step < 1):
            raise LayercapError(f"search: step = {step!r} must lie in (0, 1) (ratio per level, e.g. 0.01).")
        if not (0 <= min_ratio <= sparsity <= max_ratio < 1):
            raise LayercapError(f"search: need 0 <= min_ratio ({min_ratio}) <= sparsity ({sparsity}) <= max_ratio ({max_ratio}) < 1.")
        T = float(sparsity) * float(N.sum())
        U = max(int(round(T / (step * float(N.min())))), 1) if T > 0 else 0
        delta = T / U if U else step * float(N.min())
        lo_u = np.ceil(min_ratio * N / delta - 1e-9).astype(np.int64)
        hi_u = np.floor(max_ratio * N / delta + 1e-9).astype(np.int64)
        if lo_u.sum() > U or hi_u.sum() < U:
            raise LayercapError("search: the ratio bounds cannot meet the target on this level grid; widen them.")
        return cls(N, float(sparsity), float(delta), U, lo_u, hi_u)

    def rho(self, units: np.ndarray) -> np.ndarray:
        return np.asarray(units, dtype=np.float64) * self.delta / self.N

    def units_of(self, rho: Sequence[float]) -> np.ndarray:
        """Nearest grid point of ``rho`` with sum u = total: floor, then largest remainders."""
        x = np.clip(np.asarray(rho, dtype=np.float64) * self.N / self.delta, self.lo_units, self.hi_units)
        u = np.floor(x + 1e-9).astype(np.int64)
        u = np.clip(u, self.lo_units, self.hi_units)
        frac = x - u
        short = self.total - int(u.sum())
        order = np.argsort(-frac, kind="stable") if short > 0 else np.argsort(frac, kind="stable")
        while short != 0:
            moved = False
            for k in order:
                if short > 0 and u[k] < self.hi_units[k]:
                    u[k] += 1
                    short -= 1
                    moved = True
                elif short < 0 and u[k] > self.lo_units[k]:
                    u[k] -= 1
                    short += 1
                    moved = True
                if short == 0:
                    break
            if not moved:  # pragma: no cover - excluded by make()
                raise LayercapError("search: cannot place the start ratios on the level grid.")
        return u


# ---- the evolution ------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Outcome of :func:`evolve`. ``curve``: parent confirm fitness at the start and after every
    generation (len generations + 1); ``evaluations``: screens and confirmations run."""

    rho: np.ndarray
    units: np.ndarray
    fitness: float
    start_fitness: float
    curve: list[float]
    evaluations: dict[str, int]
    accepted: int
    wall_s: float
    delta: float
    metadata: dict = field(default_factory=dict)

    def to_ratios(self, names: Sequence[str], params: Sequence[int], sparsity: float, rule: str = "evopress") -> PruningRatios:
        N = np.asarray(params, dtype=np.float64)
        layers = [RatioLayer(str(n), float(r), int(p)) for n, r, p in zip(names, self.rho, params)]
        return PruningRatios(rule=rule, sparsity=float(sparsity), mode="rule", layers=layers,
                             achieved=float(min(max(N @ self.rho / N.sum(), 0.0), 1.0)), nu=None, clipped=0,
                             metadata={"fitness": self.fitness, "start_fitness": self.start_fitness, "curve": self.curve,
                                       "evaluations": self.evaluations, "accepted": self.accepted, "wall_s": self.wall_s,
                                       "delta": self.delta, **self.metadata})


def evolve(fitness: Callable[[np.ndarray, int], float], grid: UnitGrid, start_rho: Sequence[float], *,
           generations: int = 50, offspring: int = 8, confirm: int = 2, max_swaps: int = 3, units_per_swap: int = 1,
           seed: int = 0, progress: bool = False, parent_hook: Callable[[np.ndarray], None] | None = None) -> SearchResult:
    """(1 + lambda) search from ``start_rho`` (see module docstring).

    ``fitness(rho, stage)``: lower is better; stage SCREEN (few windows) or CONFIRM (all).
    ``parent_hook(rho)``: told whenever the parent changes (lets a fitness cache its states).
    """
    if generations < 0 or offspring < 1 or not (1 <= confirm <= offspring) or max_swaps < 1 or units_per_swap < 1:
        raise LayercapError("search: need generations >= 0, offspring >= 1, 1 <= confirm <= offspring, max_swaps >= 1, "
                            "units_per_swap >= 1.")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    units = grid.units_of(start_rho)
    if parent_hook is not None:
        parent_hook(grid.rho(units))
    best = float(fitness(grid.rho(units), CONFIRM))
    start, curve = best, [best]
    counts = {"screen": 0, "confirm": 1}
    accepted = 0
    K = units.size
    m = int(units_per_swap)
    bar = tqdm(range(generations), desc="evolve", file=sys.stderr, disable=not progress, unit="gen")
    for _ in bar:
        children = []
        for _c in range(offspring):
            u = units.copy()
            for _s in range(int(rng.integers(1, max_swaps + 1))):
                up = np.flatnonzero(u + m <= grid.hi_units)
                down = np.flatnonzero(u - m >= grid.lo_units)
                if up.size == 0 or down.size == 0:
                    break
                a = int(rng.choice(up))
                down = down[down != a]
                if down.size == 0:
                    continue
                b = int(rng.choice(down))
                u[a] += m
                u[b] -= m
            if not np.array_equal(u, units):
                children.append(u)
        if not children:
            curve.append(best)
            continue
        screened = []
        for u in children:
            screened.append((float(fitness(grid.rho(u), SCREEN)), len(screened), u))
            counts["screen"] += 1
        screened.sort(key=lambda t: (t[0], t[1]))
        cand = None
        for _f, _i, u in screened[:confirm]:
            f = float(fitness(grid.rho(u), CONFIRM))
            counts["confirm"] += 1
            if f < best and (cand is None or f < cand[0]):
                cand = (f, u)
        if cand is not None:
            best, units = cand
            accepted += 1
            if parent_hook is not None:
                parent_hook(grid.rho(units))
        curve.append(best)
        bar.set_postfix(fitness=f"{best:.4g}")
    bar.close()
    assert int(units.sum()) == grid.total  # the level switches never leave the budget
    return SearchResult(grid.rho(units), units, best, start, curve, counts, accepted, time.perf_counter() - t0, grid.delta,
                        metadata={"generations": generations, "offspring": offspring, "confirm": confirm,
                                  "max_swaps": max_swaps, "units_per_swap": m, "seed": seed})


# ---- fitness on a model -------------------------------------------------------------------
class KLFitness:
    """KL to the dense model of a whole configuration (every block pruned at its ratio).

    ``screen`` windows (the first ones) score children cheaply; all windows confirm. The
    model's weights are changed while the search runs; call :meth:`restore` (or use it as a
    context manager) to put the dense weights back.
    """

    def __init__(self, model: nn.Module, calib: CalibrationSet, method: str = "wanda", *, blocks: list[Block] | None = None,
                 screen: int = 2, batch_size: int = 4, structure: str = "unstructured", percdamp: float = 0.01,
                 blocksize: int = 128):
        if method not in METHODS:
            raise LayercapError(f"--method {method!r} is not a pruner; choose one of {', '.join(METHODS)}.")
        self.model, self.method, self.nm = model, method, parse_structure(structure)
        self.blocks = blocks if blocks is not None else find_blocks(model)
        self.percdamp, self.blocksize = percdamp, blocksize
        n = calib.input_ids.shape[0]
        if not 1 <= screen <= n:
            raise LayercapError(f"search: screen windows ({screen}) must be between 1 and --nsamples ({n}).")
        self.sets = {SCREEN: calib.input_ids[:screen], CONFIRM: calib.input_ids}
        self.batch_size = batch_size
        model.eval()
        self.originals = {(k, rel): linear_weight(m).detach().clone() for k, b in enumerate(self.blocks) for rel, m in b.linears.items()}
        self.applied = np.zeros(len(self.blocks))
        self.stats: dict = {}
        self.factors: dict = {}
        self.chains, self.dense_logp, self.labels, self.parent_states = {}, {}, {}, {}
        self.parent_rho: np.ndarray | None = None
        with torch.no_grad():
            for stage, ids in self.sets.items():
                batches = list(ids.split(batch_size))
                inputs, calls = capture_block_calls(model, self.blocks, batches)
                chain = _Chain(model, self.blocks, calls, batches)
                states = self._run(chain, 0, inputs, collect=stage == CONFIRM and method != "magnitude")
                self.chains[stage] = chain
                self.dense_logp[stage] = [_log_probs(chain.head(j, h)) for j, h in enumerate(states[-1])]
                self.labels[stage] = [b[:, 1:] for b in batches]
                self.parent_states[stage] = states
        self.evaluations = 0

    def _run(self, chain: _Chain, k0: int, start: list[torch.Tensor], collect: bool) -> list[list[torch.Tensor]]:
        """States at block inputs k0..K (list over k of per-batch tensors); with ``collect`` the
        dense input statistics of every block's Linears are gathered on the way (first call)."""
        states = [start]
        for k in range(k0, len(self.blocks)):
            handles = []
            if collect:
                lin = self.blocks[k].linears
                st, handles = attach_input_stats(lin, {r: linear_weight(m).shape[1] for r, m in lin.items()},
                                                 linear_weight(next(iter(lin.values()))).device,
                                                 want_hessian=self.method == "sparsegpt")
                self.stats.update({(k, r): s for r, s in st.items()})
            try:
                states.append([chain.run_block(k, j, h) for j, h in enumerate(states[-1])])
            finally:
                for h in handles:
                    h.remove()
        return states

    @torch.no_grad()
    def _apply(self, rho: np.ndarray) -> None:
        for k in np.flatnonzero(np.abs(rho - self.applied) > 1e-15):
            for rel, m in self.blocks[k].linears.items():
                linear_weight(m).copy_(self.originals[(k, rel)])
                st = self.stats.get((k, rel))
                factor = None
                if self.method == "sparsegpt":
                    if (k, rel) not in self.factors:
                        self.factors[(k, rel)] = hessian_factor(st.hessian, self.percdamp)
                    factor = self.factors[(k, rel)]
                prune_linear(m, float(rho[k]), self.method, self.nm, st, self.blocksize, self.percdamp, factor)
            self.applied[k] = rho[k]

    @torch.no_grad()
    def set_parent(self, rho: np.ndarray) -> None:
        """Cache the hidden states of configuration ``rho`` (children rerun from them)."""
        rho = np.asarray(rho, dtype=np.float64)
        self._apply(rho)
        for stage, chain in self.chains.items():
            dense0 = self.parent_states[stage][0]
            self.parent_states[stage] = self._run(chain, 0, dense0, collect=False)
        self.parent_rho = rho.copy()

    @torch.no_grad()
    def __call__(self, rho: np.ndarray, stage: int = CONFIRM) -> float:
        rho = np.asarray(rho, dtype=np.float64)
        self._apply(rho)
        k0 = 0
        if self.parent_rho is not None:
            diff = np.flatnonzero(np.abs(rho - self.parent_rho) > 1e-15)
            k0 = int(diff[0]) if diff.size else len(self.blocks)
        chain = self.chains[stage]
        kl, count = 0.0, 0
        for j in range(len(chain.batches)):
            h = self.parent_states[stage][k0][j] if self.parent_rho is not None else self.parent_states[stage][0][j]
            logq = _log_probs(chain.head(j, chain.run_from(k0, j, h)))
            kl += _kl_nll(self.dense_logp[stage][j], logq, self.labels[stage][j])[0]
            count += logq.shape[0] * logq.shape[1]
        self.evaluations += 1
        return kl / count

    @torch.no_grad()
    def restore(self) -> None:
        for (k, rel), w in self.originals.items():
            linear_weight(self.blocks[k].linears[rel]).copy_(w)
        self.applied[:] = 0.0
        self.parent_rho = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def evolve_ratios(model: nn.Module, calib: CalibrationSet, start: PruningRatios, *, method: str = "wanda",
                  rule: str | None = None, step: float = 0.01, screen: int = 2, min_ratio: float = 0.0,
                  max_ratio: float = 0.95, progress: bool = True, batch_size: int = 4, **evolve_kw) -> PruningRatios:
    """Refine ``start`` (mdl:damage for ``--refine``, uniform for the ``evopress`` baseline) by
    :func:`evolve` with :class:`KLFitness`; the model's weights are restored afterwards."""
    blocks = find_blocks(model)
    if start.names != [b.name for b in blocks]:
        raise LayercapError("search: the start ratios name other blocks than the model's; were they computed for another model?")
    params = [b.num_prunable for b in blocks]
    grid = UnitGrid.make(params, start.sparsity, step, min_ratio, max_ratio)
    with KLFitness(model, calib, method, blocks=blocks, screen=screen, batch_size=batch_size) as fit:
        res = evolve(fit, grid, start.rho, progress=progress, parent_hook=fit.set_parent, **evolve_kw)
    res.metadata.update(start_rule=start.rule, method=method, step=step, screen_windows=screen,
                        confirm_windows=int(calib.input_ids.shape[0]))
    return res.to_ratios(start.names, params, start.sparsity, rule or ("evopress" if start.rule == "uniform" else f"{start.rule}+refine"))


# ---- ATP's slope --------------------------------------------------------------------------
def atp_search(fitness: Callable[[np.ndarray, int], float], names: Sequence[str], params: Sequence[int], sparsity: float, *,
               steps: Sequence[float] | None = None, refine: int = 2, min_ratio: float = 0.0, max_ratio: float = 0.95,
               stage: int = CONFIRM) -> PruningRatios:
    """ATP with its step chosen by calibration ``fitness`` (never the evaluation data): a grid of
    steps (default: 9 from 0 to the step that spans the full [min_ratio, max_ratio] range), then
    ``refine`` rounds of a 3-point grid around the best at half the spacing. The record's
    metadata holds every (step, fitness) tried."""
    K = len(params)
    if steps is None:
        span = 2.0 * min(sparsity - min_ratio, max_ratio - sparsity) / max(K - 1, 1)
        steps = np.linspace(0.0, span, 9)
    tried: dict[float, float] = {}

    def f(step: float) -> float:
        step = float(step)
        if step not in tried:
            tried[step] = float(fitness(atp_rho(params, sparsity, step, min_ratio=min_ratio, max_ratio=max_ratio), stage))
        return tried[step]

    grid = sorted(float(x) for x in steps)
    for x in grid:
        f(x)
    h = (grid[-1] - grid[0]) / max(len(grid) - 1, 1)
    for _ in range(refine):
        best = min(tried, key=tried.get)
        h /= 2.0
        for x in (best - h, best + h):
            f(x)
    best = min(tried, key=tried.get)
    from layercap.programs.atp import atp_ratios

    out = atp_ratios(names, params, sparsity, best, min_ratio=min_ratio, max_ratio=max_ratio)
    out.metadata["search"] = [[s, v] for s, v in sorted(tried.items())]
    out.metadata["fitness"] = tried[best]
    return out


def trust_region_search(fitness: Callable[[np.ndarray, int], float], table, sparsity: float, *,
                        radii: Sequence[float | None] = TRUST_RADII, min_ratio: float = 0.0, max_ratio: float = 0.95,
                        stage: int = CONFIRM, rule: str | None = None) -> PruningRatios:
    """The convex-damage program on an in-context ``table`` (:class:`~layercap.programs.damage.DamageTable`
    with ``metadata.context``) with |rho_k - context_k| <= r, r chosen among ``radii`` by calibration
    ``fitness`` (never the evaluation data); a radius whose region cannot meet the target is
    skipped. The record's metadata holds every (radius, fitness) tried and the chosen radius."""
    from layercap.programs.damage import ratios_from_damage

    if not (table.metadata.get("context") or {}).get("ratios"):
        raise LayercapError(f"{table.source}: a trust-region search needs a table measured in context (layercap damage --context).")
    tried, best = [], None
    for r in radii:
        try:
            cand = ratios_from_damage(table, sparsity, min_ratio=min_ratio, max_ratio=max_ratio, radius=r, rule=rule)
        except LayercapError:
            continue
        value = float(fitness(cand.rho, stage))
        tried.append([r, value])
        if best is None or value < best[1]:
            best = (cand, value, r)
    if best is None:
        raise LayercapError(f"no trust radius among {list(radii)} meets sparsity {sparsity:g} within the bounds.")
    out, value, radius = best
    out.metadata.update(search=tried, fitness=value, radius=radius)
    return out
