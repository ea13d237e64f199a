"""Language-modelling domain adaptation data: one text, split by position into training and
held-out windows (the allocation benchmark's low-noise task, e.g. TinyShakespeare).

The text is tokenised once (no special tokens). Its last ``heldout_fraction`` of tokens is the
held-out part; the rest is the training part, so no held-out token is ever seen in training,
calibration (scoring) or utility measurement. Both parts are cut into non-overlapping windows of
``seqlen`` tokens, in order (training windows are shuffled by the trainer's seed, never
resampled; ``limit_train`` keeps a seeded subset of them).

BOS: as for calibration windows (:func:`layercap.data.bos.put_bos`), position 0 of every window
holds the BOS when the model's inputs start with one; that position is context, never a target,
so the predicted tokens are ``windows x (seqlen - 1)`` either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from layercap.data.bos import NO_BOS, BosChoice, put_bos
from layercap.data.calibration import CalibrationSet, read_text, tokenize_text
from layercap.errors import LayercapError
from layercap.io import sha256_bytes

# corpora are plain text; task files (JSON, JSONL, TSV) are instruction tasks
TEXT_SUFFIXES = (".txt", ".raw", ".text")


def is_text_corpus(path: str | Path) -> bool:
    """Whether ``path`` is a plain-text corpus (a language-modelling task) rather than a task file."""
    return Path(path).suffix.lower() in TEXT_SUFFIXES


@dataclass(frozen=True)
class DomainSplit:
    """``train`` (n_train, seqlen) and ``heldout`` (n_heldout, seqlen) LongTensors of token ids;
    ``split_token``: the first held-out token's index in the tokenised text; ``sha256``: hash of
    both tensors and the BOS choice."""

    train: torch.Tensor
    heldout: torch.Tensor
    split_token: int
    text_tokens: int
    source: str
    sha256: str
    bos: BosChoice = NO_BOS

    def examples(self) -> list[dict[str, list[int]]]:
        """Training examples for the adapter trainer: every target predicted, the BOS position not."""
        first = 1 if self.bos.add else 0
        out = []
        for row in self.train.tolist():
            out.append({"input_ids": row, "labels": [-100] * first + row[first:]})
        return out

    def calibration(self, nsamples: int, offset: float = 0.0) -> CalibrationSet:
        """``nsamples`` training windows spread evenly over the training part (for scores).
        ``offset`` in [0, 1): shift by that share of the spacing, so ``offset=0.5`` gives other
        windows than ``offset=0`` (a validation set) whenever there are at least 2 x ``nsamples``."""
        n = self.train.shape[0]
        k = min(nsamples, n)
        index = ((torch.arange(k, dtype=torch.float64) + offset) * (n / k)).floor().long().clamp(max=n - 1)
        ids = self.train[index]
        return CalibrationSet.of_windows(ids, self.source, 0, self.bos)

    def metadata(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "seqlen": int(self.train.shape[1]),
                "train_windows": int(self.train.shape[0]), "heldout_windows": int(self.heldout.shape[0]),
                "split_token": self.split_token, "text_tokens": self.text_tokens, "bos": self.bos.to_dict()}


def domain_split(tokenizer, path: str | Path, seqlen: int, heldout_fraction: float = 0.1,
                 heldout_windows: int | None = None, train_windows: int | None = None,
                 bos: BosChoice = NO_BOS) -> DomainSplit:
    """Split the text of ``path`` by position (see module docstring). ``heldout_windows`` /
    ``train_windows``: keep only the first N windows of each part (None: all)."""
    if not (0.0 < heldout_fraction < 1.0):
        raise LayercapError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}.")
    if seqlen < 2:
        raise LayercapError(f"seqlen must be >= 2, got {seqlen}.")
    tokens = tokenize_text(tokenizer, read_text(path))
    split = int(round(tokens.numel() * (1.0 - heldout_fraction)))
    parts = []
    for name, part, limit in (("training", tokens[:split], train_windows), ("held-out", tokens[split:], heldout_windows)):
        n = part.numel() // seqlen
        if limit is not None:
            n = min(n, int(limit))
        if n < 1:
            raise LayercapError(f"{path}: the {name} part has {part.numel()} tokens, fewer than one window of "
                                f"{seqlen}; use a larger text, a shorter --max-length or another --heldout-fraction.")
        parts.append(put_bos(part[: n * seqlen].reshape(n, seqlen).clone(), bos))
    train, heldout = parts
    digest = sha256_bytes(train.numpy().tobytes() + b"|" + heldout.numpy().tobytes() + bos.hash_tag)
    return DomainSplit(train, heldout, split, int(tokens.numel()), str(path), digest, bos)
