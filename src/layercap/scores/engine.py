"""The statistics engine shared by every curvature method.

Conventions (the same for all methods, so that their zeta2 share one scale):

* The objective is L = mean next-token NLL over the N predicted tokens of the calibration set
  (each window of T tokens predicts T - 1). Logits are cast to float32 before the loss.
* g = grad L = (1/N) sum_x s_x with s_x = grad of the summed NLL of window x.
* The Fisher is F = (1/N) sum_x s_x s_x^T (one outer product per window). This is
  E_x[grad l_x grad l_x^T] for l_x = (summed NLL of x) / sqrt(T - 1); with sampled labels
  ("true" Fisher) its expectation is (1/N) sum_t J_t^T H_t J_t, the generalised Gauss-Newton
  matrix of L that ``exact`` uses (cross-token terms vanish because each sampled label's
  gradient has zero mean given the real prefix).
* Statistics are running float32 sums plus a token count; they do not depend on how windows
  are grouped into micro-batches. A pass over the data is a "phase": its sums are
  checkpointed atomically every ``checkpoint_every`` micro-batches (``--resume``), and under
  torch.distributed each rank streams its shard and the sums are all-reduced at the end.
"""

from __future__ import annotations

import io
import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from layercap.errors import LayercapError
from layercap.io import atomic_write_bytes
from layercap.models.load import model_source
from layercap.scores.registry import ScoreOptions

CKPT_VERSION = 1


class Interrupted(RuntimeError):
    """Raised by the test hook ``options.extra['_interrupt_after_batches']`` (simulated crash)."""


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the initialised torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of a causal LM (Hugging Face output object, tuple or tensor)."""
    out = model(input_ids=ids, use_cache=False)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def summed_nll(logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token NLL (float32 scalar); ``labels`` (B, T-1) replaces the observed ids[:, 1:]."""
    lg = logits[:, :-1].float()
    target = ids[:, 1:] if labels is None else labels
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), reduction="sum")


def sample_labels(logits: torch.Tensor, index: torch.Tensor, seed: int, draw: int = 0) -> torch.Tensor:
    """Next tokens (B, T-1) sampled from the model's predictive distribution.

    Each window's generator is seeded from (seed, global window index, draw), so the labels do
    not depend on batch size, resume point or the number of distributed ranks.
    """
    probs = torch.softmax(logits[:, :-1].detach().float(), dim=-1)
    out = torch.empty(probs.shape[:2], dtype=torch.long, device=probs.device)
    for b in range(probs.shape[0]):
        gen = torch.Generator(device=probs.device)
        gen.manual_seed((int(seed) * 1_000_003 + int(index[b]) * 7_919 + draw * 104_729) % (2**63 - 1))
        out[b] = torch.multinomial(probs[b], 1, generator=gen).squeeze(-1)
    return out


@dataclass
class Windows:
    """This process's calibration windows: ``ids`` (n, T) and their global indices (n,)."""

    ids: torch.Tensor
    index: torch.Tensor
    total_tokens: int  # predicted tokens over ALL ranks (the N of the conventions above)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.ids.shape[0], batch_size):
            yield self.ids[start : start + batch_size], self.index[start : start + batch_size]

    def num_batches(self, batch_size: int) -> int:
        return -(-self.ids.shape[0] // batch_size)


def local_windows(calib) -> Windows:
    ids = calib.input_ids
    n, seqlen = ids.shape
    rank, world = dist_info()
    index = torch.arange(n)
    if world > 1:
        if n < world:
            raise LayercapError(f"{n} calibration windows cannot be shared by {world} ranks; use --nsamples >= {world}.")
        ids, index = ids[rank::world], index[rank::world]
    return Windows(ids, index, n * (seqlen - 1))


@dataclass
class RunContext:
    """Per-run state: options, this rank's windows, checkpointing and the test interrupt hook."""

    options: ScoreOptions
    windows: Windows
    fingerprint: dict
    device: torch.device = torch.device("cpu")
    batches_run: int = 0
    phases: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return dist_info()[0]

    def _ckpt_path(self, phase: str) -> Path | None:
        if not self.options.checkpoint_dir:
            return None
        rank, world = dist_info()
        return Path(self.options.checkpoint_dir) / f"{phase}.rank{rank}of{world}.pt"

    def _load(self, phase: str) -> dict | None:
        path = self._ckpt_path(phase)
        if path is None or not self.options.resume or not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or foreign file: torch raises many types
            raise LayercapError(f"checkpoint {path} cannot be read ({type(exc).__name__}); it is probably truncated: "
                                "delete it (the pass restarts) or run without --resume.") from None
        if not isinstance(saved, dict) or saved.get("version") != CKPT_VERSION or json.loads(saved["fingerprint"]) != self.fingerprint:
            raise LayercapError(
                f"checkpoint {path} was written by a run with different settings (model, data, method, "
                "batch size or ranks); delete the checkpoint directory or run without --resume."
            )
        return saved

    def _save(self, phase: str, done: int, state: dict[str, torch.Tensor]) -> None:
        path = self._ckpt_path(phase)
        if path is None:
            return
        buf = io.BytesIO()
        payload = {
            "version": CKPT_VERSION,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "done": done,
            "state": {k: v.detach().cpu() for k, v in state.items()},
        }
        torch.save(payload, buf)
        atomic_write_bytes(path, buf.getvalue())

    def stream(
        self,
        phase: str,
        state: dict[str, torch.Tensor],
        step: Callable[[torch.Tensor, torch.Tensor], None],
        reduce: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Run ``step(ids, index)`` on every micro-batch of this rank, accumulating into ``state``.

        ``state`` holds running sums (tensors updated in place by ``step``). Resumes from the
        phase's checkpoint when asked; all-reduces the sums across ranks at the end.
        """
        opts = self.options
        self.phases.append(phase)
        total = self.windows.num_batches(opts.batch_size)
        done = 0
        saved = self._load(phase)
        if saved is not None:
            done = int(saved["done"])
            for k, v in saved["state"].items():
                if k not in state or state[k].shape != v.shape:
                    raise LayercapError(f"checkpoint of phase {phase!r} does not match this run; delete it or run without --resume.")
                state[k].copy_(v.to(state[k].device))
        limit = opts.extra.get("_interrupt_after_batches")
        if done < total:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=done, desc=phase, unit="batch", file=sys.stderr,
                       disable=not opts.progress or self.rank != 0, leave=False)
            with bar:
                for i, (ids, index) in enumerate(self.windows.batches(opts.batch_size)):
                    if i < done:
                        continue
                    if limit is not None and self.batches_run >= limit:
                        raise Interrupted(f"test interrupt after {self.batches_run} micro-batches")
                    step(ids.to(self.device), index)
                    done += 1
                    self.batches_run += 1
                    bar.update(1)
                    if done % opts.checkpoint_every == 0 or done == total:
                        self._save(phase, done, state)
        if reduce:
            all_reduce_(state)
        return state


def all_reduce_(state: dict[str, torch.Tensor]) -> None:
    """Sum every tensor of ``state`` over the ranks (in place); no-op without torch.distributed."""
    _, world = dist_info()
    if world == 1:
        return
    for key in sorted(state):
        tensor = state[key]
        if tensor.is_cuda or torch.distributed.get_backend() != "nccl":
            torch.distributed.all_reduce(tensor)
        else:
            moved = tensor.cuda()
            torch.distributed.all_reduce(moved)
            tensor.copy_(moved.cpu())


def make_context(calib, options: ScoreOptions, method: str, groups, model: nn.Module) -> RunContext:
    if calib is None:
        raise LayercapError(f"method {method!r} needs calibration data; pass --data PATH.")
    options.validate()
    windows = local_windows(calib)
    rank, world = dist_info()
    fingerprint = {
        "method": method,
        "data_sha256": calib.sha256,
        "shape": list(calib.input_ids.shape),
        "groups": [g.name for g in groups],
        "params": [g.num_params for g in groups],
        "batch_size": options.batch_size,
        "fisher": options.fisher,
        "seed": options.seed,
        "trace_samples": options.trace_samples,
        "world_size": world,
        "model": str(model_source(model)),
    }
    return RunContext(options, windows, fingerprint, device=model_device(model))


class GradMode:
    """Make ``params`` require grad for the duration of a scoring run (restored afterwards)."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor]):
        self.model, self.params = model, params

    def __enter__(self):
        self.saved_flags = [p.requires_grad for p in self.params]
        self.was_training = self.model.training
        self.model.eval()  # dropout off: curvature of the deterministic model
        for p in self.params:
            p.requires_grad_(True)
        self.grad_ctx = torch.enable_grad()
        self.grad_ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.grad_ctx.__exit__(*exc)
        for p, flag in zip(self.params, self.saved_flags):
            p.requires_grad_(flag)
        self.model.train(self.was_training)
        return False


def unique_params(groups) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters of all groups, each parameter once (tied weights), in group order."""
    names, params, seen = [], [], set()
    for g in groups:
        for n, p in g.params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            names.append(n)
            params.append(p)
    return names, params


def zeros_like_f32(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros(p.shape, dtype=torch.float32, device=p.device)


def sdpa_math():
    """Context forcing the math attention kernel (forward-mode AD needs it on CPU)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover
        return nullcontext()
