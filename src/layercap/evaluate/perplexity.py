"""Strided-window perplexity of a causal LM on a text file (Hugging Face "perplexity" guide).

The text is tokenised once (no special tokens) and cut after ``max_tokens`` tokens. Windows of
``seqlen`` tokens start every ``stride`` tokens; each window scores only the tokens not scored by
an earlier window, with the window's earlier tokens as context. ``stride == seqlen``
(the default) gives non-overlapping windows, the convention of the SparseGPT/Wanda papers (the
first token of every window is then never a target); a smaller stride gives every target more
context and a lower, more "honest" perplexity at ``seqlen / stride`` times the cost.

Unlike the guide, the NLL is summed over the exact number of scored tokens (not ``loss * trg_len``
with the off-by-one of the shifted labels), so ``ppl = exp(total NLL / tokens)`` exactly.

BOS (``bos``, :mod:`layercap.data.bos`): for a model whose inputs start with a BOS token, the
first position of every window holds the BOS instead of the text token there. That position is
always context (every window's first target is at least one position later), so the scored
tokens are the same set with and without BOS and ``tokens`` does not change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layercap.data.bos import as_bos_choice, put_bos
from layercap.data.calibration import read_text, tokenize_text
from layercap.errors import LayercapError
from layercap.io import atomic_write_json, sha256_bytes

SCHEMA = "layercap.perplexity/v1"


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl`` = exp(``nll_per_token``) (nats/token); ``tokens``: number of scored tokens;
    ``text_tokens``: tokens of the (truncated) text; ``sha256``: hash of those token ids (and of
    the BOS choice when a BOS is used); ``bos``: the BOS decision (``BosChoice.to_dict()``)."""

    ppl: float
    nll_per_token: float
    tokens: int
    text_tokens: int
    seqlen: int
    stride: int
    source: str
    sha256: str
    bos: dict | None = None
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PerplexityResult":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not a {SCHEMA} record (schema {d.get('schema')!r}).")
        missing = [k for k in cls.__dataclass_fields__ if k not in d and k != "bos"]
        if missing:
            raise LayercapError(f"{SCHEMA} record lacks {', '.join(missing)}.")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())


def windows(n: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window over ``n`` tokens; targets are ``first_target..end-1``
    (absolute positions), every position 1..n-1 is a target of at most one window."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + seqlen, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def _device_of(model, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


@torch.inference_mode()
def token_nll(model, input_ids: torch.Tensor, first_target: list[int]) -> list[tuple[float, int]]:
    """Sum of NLL (nats) and count of the targets ``first_target[i]..L-1`` of each row of
    ``input_ids`` (LongTensor (batch, L), all rows the same length)."""
    logits = model(input_ids=input_ids).logits
    out = []
    for i, first in enumerate(first_target):
        pred = logits[i, first - 1 : -1].float()
        tgt = input_ids[i, first:]
        out.append((float(F.cross_entropy(pred, tgt, reduction="sum")), int(tgt.numel())))
    return out


def perplexity(
    model,
    tokenizer,
    path: str | Path,
    seqlen: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    device=None,
    progress: bool = True,
    bos="auto",
) -> PerplexityResult:
    """Perplexity of ``model`` on the text of ``path`` (see module docstring). ``bos``:
    ``auto``/``always``/``never`` or a :class:`~layercap.data.bos.BosChoice`."""
    stride = seqlen if stride is None else stride
    if seqlen < 2 or not (1 <= stride <= seqlen):
        raise LayercapError(f"need --seqlen >= 2 and 1 <= --stride <= --seqlen, got seqlen {seqlen}, stride {stride}.")
    if batch_size < 1:
        raise LayercapError(f"--batch-size must be >= 1, got {batch_size}.")
    from layercap.models.checks import check_seqlen

    check_seqlen(model, seqlen)
    choice = as_bos_choice(bos, tokenizer, model)
    tokens = tokenize_text(tokenizer, read_text(path))
    if max_tokens is not None:
        if max_tokens < 2:
            raise LayercapError(f"--max-tokens must be >= 2, got {max_tokens}.")
        tokens = tokens[:max_tokens]
    if tokens.numel() < 2:
        raise LayercapError(f"{path} has fewer than 2 tokens; nothing to score.")
    dev = _device_of(model, device)
    was_training = model.training
    model.eval()
    wins = windows(tokens.numel(), seqlen, stride)
    # rows of equal length batch together (all but possibly the last window are full)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    total, count = 0.0, 0
    bar = tqdm(total=len(wins), desc=f"ppl {Path(path).name}", unit="win", disable=not progress, leave=False)
    try:
        for length, group in groups.items():
            for s in range(0, len(group), batch_size):
                chunk = group[s : s + batch_size]
                ids = put_bos(torch.stack([tokens[b:e] for b, e, _ in chunk]), choice).to(dev)
                for nll, n in token_nll(model, ids, [f - b for b, _, f in chunk]):
                    total, count = total + nll, count + n
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    mean = total / count
    return PerplexityResult(
        ppl=math.exp(mean),
        nll_per_token=mean,
        tokens=count,
        text_tokens=int(tokens.numel()),
        seqlen=seqlen,
        stride=stride,
        source=str(path),
        sha256=sha256_bytes(tokens.numpy().tobytes() + choice.hash_tag),
        bos=choice.to_dict(),
    )


def windows_nll(model, input_ids: torch.Tensor, batch_size: int = 8, progress: bool = False,
                desc: str = "held-out NLL") -> dict:
    """Mean next-token NLL (nats/token) over every target of the windows ``input_ids``
    (LongTensor (n, seqlen); positions 1..seqlen-1 are targets, position 0 context).

    Returns ``{"nll_per_token", "ppl", "tokens", "windows"}``."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise LayercapError(f"need windows of shape (n, seqlen >= 2), got {tuple(input_ids.shape)}.")
    dev = _device_of(model, None)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = tqdm(total=input_ids.shape[0], desc=desc, unit="win", disable=not progress, leave=False)
    try:
        for s in range(0, input_ids.shape[0], batch_size):
            chunk = input_ids[s : s + batch_size].to(dev)
            for nll, n in token_nll(model, chunk, [1] * chunk.shape[0]):
                total, count = total + nll, count + n
            bar.update(chunk.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    mean = total / count
    return {"nll_per_token": mean, "ppl": math.exp(mean), "tokens": count, "windows": int(input_ids.shape[0])}
