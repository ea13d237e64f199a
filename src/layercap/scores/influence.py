"""LayerIF-style per-layer influence with the DataInf inverse-Hessian approximation.

Notation: per-sample gradients g_i (one training window i = one sample, loss = its mean token
NLL) and the mean validation gradient v, restricted to ONE weight matrix l (a "layer" in DataInf's
sense). DataInf (Kwon et al. 2024, ykwon0407/DataInf src/influence.py) approximates the damped
Gauss-Newton/Fisher inverse of that matrix by averaging rank-one Sherman-Morrison inverses:

    H_l^{-1} v  ~=  1 / (n lambda_l) * sum_i ( v - (g_i^T v) / (lambda_l + ||g_i||^2) * g_i )
    lambda_l    =  0.1 * mean_i( ||g_i||^2 / d_l )         (DataInf: mean of the squared entries / 10)

For one sample (n = 1) this is exactly (g g^T + lambda I)^{-1} v. DataInf's influence of train
sample i on the validation loss is IF_i = -v^T H^{-1} g_i (positive = up-weighting i raises the
validation loss = harmful).

LayerIF (Askari et al. 2025; HadiAskari/Expert_Allocation LayerIF_Computation) runs DataInf on
each decoder layer separately: only that layer's parameters' gradients are used, every weight
tensor gets its own lambda, and a sample's influence is summed over the layer's weight tensors
and over the validation samples. Here the weight tensors are the block's Linear weights (LayerIF
used their LoRA factors), and the validation gradient is the mean (not the sum) over validation
windows, which rescales every layer alike. Per layer k the influences are aggregated over the
training samples (LayerIF's expert_allocator notebook):

    "all"      : S_k = sum_i u_ki
    "positive" : S_k = sum_i max(u_ki, 0)            (the paper's "+ve": the helpful samples)
    "top25"    : S_k = sum of the int(0.25 n) + 1 largest u_ki (its "keep the 25% most
                 negative IF values" rule, off-by-one included)

with u_ki = -IF_ki = v^T H^{-1} g_i: **sign convention here, higher = the layer's training
signal reduces validation loss more = the layer is more useful** (LayerIF's code works with IF
and inverts it as ``max(IF) - IF`` before allocating; the registered score is that inversion,
S_k - min_j S_j >= 0, so allocation baselines get exactly LayerIF's input).

Tractability: a Linear's per-sample gradient is G_i = sum_t delta_t a_t^T (out x in). With
``proj_dim`` r > 0 it is sketched as P_out^T G_i P_in (r x r; P Gaussian, entries N(0, 1/r),
seeded) computed from the projected activations and output gradients, so the full gradient is
never formed; the sketch preserves inner products in expectation (Johnson-Lindenstrauss). A side
with at most r features is left unprojected; ``proj_dim=0`` uses exact gradients. lambda_l uses
the dimension of the vectors actually used (DataInf's per-entry mean of what it sees).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from layercap.errors import LayercapError
from layercap.io import atomic_write_json
from layercap.models import linear_weight
from layercap.scores.heavytail import group_linears

SCHEMA = "layercap.influence/v1"
AGGREGATES = ("all", "positive", "top25")
DEFAULT_PROJ_DIM = 32
DAMPING_RATIO = 0.1  # DataInf's lambda_const_param = 10


# ---- DataInf algebra (pure tensors) ----------------------------------------------------------
def datainf_damping(train_grads: torch.Tensor, ratio: float = DAMPING_RATIO) -> float:
    """lambda = ratio * mean over samples and entries of g^2. ``train_grads``: (n, d)."""
    return float(ratio * train_grads.double().square().mean().item())


def datainf_ihvp(train_grads: torch.Tensor, v: torch.Tensor, damping: float | None = None,
                 ratio: float = DAMPING_RATIO) -> torch.Tensor:
    """DataInf's approximation of (1/n sum_i g_i g_i^T + lambda I)^{-1} v.

    ``train_grads``: (n, d); ``v``: (d,) or (m, d) (several right-hand sides). Returns v's shape,
    float64. ``damping`` overrides lambda (default: :func:`datainf_damping`).
    """
    G = train_grads.double()
    lam = datainf_damping(G, ratio) if damping is None else float(damping)
    if not lam > 0:
        raise LayercapError("DataInf damping must be > 0 (all training gradients are zero?).")
    V = v.double().reshape(-1, G.shape[1])
    n = G.shape[0]
    coef = (G @ V.T) / (lam + G.square().sum(dim=1, keepdim=True))  # (n, m)
    out = (n * V - coef.T @ G) / (n * lam)
    return out.reshape(v.shape)


# ---- per-sample gradients ----------------------------------------------------------------------
def per_sample_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token NLL of each window (nats/token), computed in float32."""
    logits = model(ids, use_cache=False).logits[:, :-1].float()
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.reshape(targets.shape).mean(dim=1)


def _projection(n_features: int, r: int, generator: torch.Generator) -> torch.Tensor | None:
    if r <= 0 or n_features <= r:
        return None
    return torch.randn(n_features, r, generator=generator, dtype=torch.float32) / math.sqrt(r)


def make_projections(modules: Sequence[nn.Module], proj_dim: int, seed: int = 0) -> list[tuple]:
    """(P_out, P_in) per module (None = that side unprojected), from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in modules:
        n_out, n_in = linear_weight(m).shape
        out.append((_projection(n_out, proj_dim, gen), _projection(n_in, proj_dim, gen)))
    return out


def per_sample_gradients(model: nn.Module, modules: Sequence[nn.Module], data, projections: list[tuple],
                         batch_size: int = 4, device=None, progress: bool = False, desc: str = "grads") -> list[torch.Tensor]:
    """Per-window (sketched) gradients of each module's (out, in) weight.

    Returns one float32 tensor per module, shape (n_windows, r_out * r_in) (r = the projected or
    full size of each side), row-major in (out, in). ``data``: a CalibrationSet.
    """
    from tqdm.auto import tqdm

    modules = list(modules)
    device = device or next(model.parameters()).device
    index = {id(m): i for i, m in enumerate(modules)}
    acts: dict[int, list] = {}
    outs: dict[int, list] = {}

    def hook(module, args, output):
        i = index[id(module)]
        a = args[0].detach().float()
        p_in = projections[i][1]
        acts.setdefault(i, []).append(a @ p_in.to(a.device) if p_in is not None else a)
        outs.setdefault(i, []).append(output)

    weights = [linear_weight(m) for m in modules]
    params = [m.weight for m in modules]
    flags = [p.requires_grad for p in params]
    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    model.eval()
    grads: list[list[torch.Tensor]] = [[] for _ in modules]
    try:
        for p in params:
            p.requires_grad_(True)  # so that module outputs carry a graph; weight grads are not computed
        n_batches = -(-data.input_ids.shape[0] // batch_size)
        for ids in tqdm(data.batches(batch_size), total=n_batches, desc=desc, unit="batch", disable=not progress):
            acts.clear()
            outs.clear()
            with torch.enable_grad():
                loss = per_sample_nll(model, ids.to(device)).sum()
                flat_outs = [o for i in range(len(modules)) for o in outs.get(i, [])]
                if not flat_outs:
                    raise LayercapError("no Linear module of the groups ran in the forward pass; check --blocks/--groups.")
                deltas = torch.autograd.grad(loss, flat_outs, allow_unused=True)
            k = 0
            for i in range(len(modules)):
                g = None
                for a in acts.get(i, []):
                    d = deltas[k]
                    k += 1
                    if d is None:
                        continue
                    d = d.detach().float()
                    p_out = projections[i][0]
                    if p_out is not None:
                        d = d @ p_out.to(d.device)
                    # some families (OPT's MLP) flatten (B, T, .) to (B*T, .) before a Linear
                    B = ids.shape[0]
                    gi = torch.einsum("bto,bti->boi", d.reshape(B, -1, d.shape[-1]), a.reshape(B, -1, a.shape[-1]))
                    g = gi if g is None else g + gi
                if g is None:
                    r_out = projections[i][0].shape[1] if projections[i][0] is not None else weights[i].shape[0]
                    r_in = projections[i][1].shape[1] if projections[i][1] is not None else weights[i].shape[1]
                    g = torch.zeros(ids.shape[0], r_out, r_in)
                grads[i].append(g.reshape(g.shape[0], -1).cpu())
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
        acts.clear()
        outs.clear()
    return [torch.cat(g) for g in grads]


# ---- LayerIF -------------------------------------------------------------------------------------
@dataclass
class InfluenceResult:
    """Per-group, per-training-window influences u[k][i] = v^T H_k^{-1} g_i (nats; higher = the
    window's gradient in group k lowers validation loss more). ``damping``: lambda per Linear."""

    groups: list[str]
    influence: list[list[float]]  # (K, n_train)
    damping: dict[str, list[float]]  # group -> lambda of each of its Linears
    proj_dim: int
    n_train: int
    n_validation: int
    schema: str = SCHEMA

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.influence, dtype=np.float64)

    def aggregate(self, mode: str = "all") -> np.ndarray:
        return aggregate_influence(self.matrix, mode)

    def scores(self, mode: str = "all") -> np.ndarray:
        """LayerIF's allocation input: S - min(S) >= 0 (its ``max(IF) - IF`` inversion)."""
        s = self.aggregate(mode)
        return s - s.min()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InfluenceResult":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not a {SCHEMA} record (schema={d.get('schema')!r}).")
        return cls(d["groups"], d["influence"], d["damping"], int(d["proj_dim"]), int(d["n_train"]), int(d["n_validation"]), SCHEMA)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "InfluenceResult":
        from layercap.io import read_json

        return cls.from_dict(read_json(path, "influence file"))


def aggregate_influence(u: np.ndarray, mode: str = "all") -> np.ndarray:
    """(K,) per-group aggregate of the (K, n) influence matrix (see the module docstring)."""
    u = np.asarray(u, dtype=np.float64)
    if mode == "all":
        return u.sum(axis=1)
    if mode == "positive":
        return np.clip(u, 0.0, None).sum(axis=1)
    if mode == "top25":
        keep = min(int(u.shape[1] * 0.25) + 1, u.shape[1])
        return np.sort(u, axis=1)[:, -keep:].sum(axis=1)
    raise LayercapError(f"influence aggregate {mode!r} is unknown; choose one of {', '.join(AGGREGATES)}.")


def layer_influences(model: nn.Module, groups, train, validation, proj_dim: int = DEFAULT_PROJ_DIM,
                     damping_ratio: float = DAMPING_RATIO, seed: int = 0, batch_size: int = 4,
                     device=None, progress: bool = False) -> InfluenceResult:
    """Influence of every training window on the mean validation loss, per group (DataInf per Linear,
    summed over the group's Linears). ``train``/``validation``: CalibrationSets."""
    groups = list(groups)
    linears = [group_linears(g) for g in groups]
    modules = [m for ls in linears for m in ls.values()]
    projections = make_projections(modules, proj_dim, seed)
    g_train = per_sample_gradients(model, modules, train, projections, batch_size, device, progress, "influence: train grads")
    g_val = per_sample_gradients(model, modules, validation, projections, batch_size, device, progress, "influence: val grads")
    names, rows, damping = [], [], {}
    j = 0
    for group, ls in zip(groups, linears):
        name = getattr(group, "name", str(len(names)))
        u = np.zeros(train.input_ids.shape[0])
        lams = []
        for _ in ls:
            G, v = g_train[j], g_val[j].double().mean(dim=0)
            lam = datainf_damping(G, damping_ratio)
            if lam > 0:  # a Linear with zero gradient everywhere contributes nothing
                u += (G.double() @ datainf_ihvp(G, v, damping=lam)).numpy()
            lams.append(lam)
            j += 1
        names.append(name)
        rows.append(u.tolist())
        damping[name] = lams
    return InfluenceResult(names, rows, damping, int(proj_dim), int(train.input_ids.shape[0]), int(validation.input_ids.shape[0]))


def split_for_validation(calib):
    """(train, validation): even windows train, odd windows validate (fallback when no validation set)."""
    if calib.input_ids.shape[0] < 2:
        raise LayercapError("influence needs at least 2 calibration windows when no validation set is given; raise --nsamples.")
    return calib.subset(slice(0, None, 2)), calib.subset(slice(1, None, 2))


def influence_method(model, groups, calib, options) -> np.ndarray:
    """Registry adapter (``influence``; needs data): (K,) LayerIF scores S - min(S) >= 0.

    ``calib`` is the training data; ``options.extra``: ``validation`` (CalibrationSet; if absent
    the calibration windows are split even/odd with a warning), ``aggregate`` ("all" default,
    "positive", "top25"), ``proj_dim`` (32; 0 = exact gradients), ``damping_ratio`` (0.1).
    """
    extra = dict(getattr(options, "extra", None) or {})
    mode = extra.get("aggregate", "all")
    if mode not in AGGREGATES:
        raise LayercapError(f"influence aggregate {mode!r} is unknown; choose one of {', '.join(AGGREGATES)}.")
    if calib is None:
        raise LayercapError("the influence method needs training data: pass calibration data (--data).")
    validation = extra.get("validation")
    train = calib
    if validation is None:
        warnings.warn("influence: no validation set given; using odd calibration windows as validation, even ones as training.")
        train, validation = split_for_validation(calib)
    result = layer_influences(
        model, groups, train, validation,
        proj_dim=int(extra.get("proj_dim", DEFAULT_PROJ_DIM)),
        damping_ratio=float(extra.get("damping_ratio", DAMPING_RATIO)),
        seed=int(getattr(options, "seed", 0) or 0),
        batch_size=int(getattr(options, "batch_size", 4) or 4),
        device=getattr(options, "device", None),
        progress=bool(getattr(options, "progress", False)),
    )
    info = {"source": "LayerIF (DataInf per Linear)", "aggregate": mode, "proj_dim": result.proj_dim,
            "n_train": result.n_train, "n_validation": result.n_validation,
            "raw_aggregate": [float(x) for x in result.aggregate(mode)],
            "note": "zeta2 = S - min(S): LayerIF's max(IF) - IF inversion; higher = more useful layer"}
    return result.scores(mode), info


def _register() -> None:
    from layercap.scores.registry import register

    register("influence", influence_method, needs_data=True,
             description="LayerIF-style layer influence (DataInf), aggregate all/positive/top25 via extra['aggregate']")


_register()
