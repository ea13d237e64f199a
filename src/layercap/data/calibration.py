"""Calibration windows: ``nsamples`` token windows of ``seqlen`` tokens drawn from text.

Sources (``read_text``):
  * a text file (.txt, .raw, anything not JSON): used as is;
  * a JSON list of format-A task records (``instruction`` [+ ``input``] + ``output``) or a JSONL
    file of format-B records / ``{"text": ...}`` / ``{"context", "choices", "label"}``: each
    record becomes one paragraph;
  * a directory: every such file in it, sorted by name, concatenated.

Windows are drawn as in the SparseGPT/Wanda reference code: tokenise the whole text once and
take ``nsamples`` random start offsets (seeded). If the text has fewer than
``nsamples * seqlen`` tokens, windows overlap; if it has fewer than ``seqlen`` tokens it is an
error. The SHA-256 of the window tensor identifies the data in every artefact.

BOS (``bos``, see :mod:`layercap.data.bos`): when the model's inputs start with a BOS token, the
first position of every window holds it instead of the first text token (a position that is
context, never a target), so the ``nsamples * (seqlen - 1)`` predicted tokens are the same with and
without BOS. The hash then covers the choice too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from layercap.data.bos import NO_BOS, BosChoice, as_bos_choice, put_bos
from layercap.errors import LayercapError
from layercap.io import check_input_file, parse_json, parse_jsonl, read_text_file, sha256_bytes

TEXT_SUFFIXES_SKIPPED = {".md", ".sha256"}
MAX_WINDOW_TOKENS = 1 << 30  # 8 GiB of int64 ids: far above any real calibration set


@dataclass(frozen=True)
class CalibrationSet:
    """``input_ids``: LongTensor (nsamples, seqlen). ``sha256``: hash of the ids and the BOS
    choice (hex). ``bos``: whether position 0 of every window is the BOS (and why)."""

    input_ids: torch.Tensor
    sha256: str
    source: str
    seed: int
    bos: BosChoice = NO_BOS

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def batches(self, batch_size: int):
        """Yield micro-batches (views) of at most ``batch_size`` windows, in order."""
        for start in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[start : start + batch_size]

    def shard(self, rank: int, world_size: int) -> "CalibrationSet":
        """Windows ``rank::world_size`` (data parallelism: every window goes to exactly one rank)."""
        return CalibrationSet(self.input_ids[rank::world_size], self.sha256, self.source, self.seed, self.bos)

    def first(self, n: int) -> "CalibrationSet":
        """The first ``n`` windows as a set of their own; its hash is this set's with ``[:n]`` appended,
        so a table measured on them names exactly which windows it read."""
        return CalibrationSet(self.input_ids[:n], self.sha256 + f"[:{n}]", self.source, self.seed, self.bos)

    @classmethod
    def of_windows(cls, input_ids: torch.Tensor, source: str, seed: int = 0, bos: BosChoice = NO_BOS) -> "CalibrationSet":
        """A set holding exactly ``input_ids``, its hash computed from them and the BOS choice."""
        return cls(input_ids, sha256_bytes(input_ids.numpy().tobytes() + bos.hash_tag), str(source), seed, bos)

    def halves(self) -> tuple["CalibrationSet", "CalibrationSet"]:
        """The first ``n // 2`` windows and the rest, each a set with its own hash (fit on one half,
        measure on the other, so the measurement reads no window the fit did)."""
        half = self.input_ids.shape[0] // 2
        return tuple(CalibrationSet.of_windows(ids, self.source, self.seed, self.bos)
                     for ids in (self.input_ids[:half], self.input_ids[half:]))

    def subset(self, index) -> "CalibrationSet":
        """Windows ``input_ids[index]`` (a slice or index tensor), same hash, source and BOS choice."""
        return CalibrationSet(self.input_ids[index], self.sha256, self.source, self.seed, self.bos)

    def metadata(self) -> dict:
        """What artefacts record about this data (JSON-ready)."""
        n, seqlen = self.input_ids.shape
        return {"sha256": self.sha256, "source": self.source, "nsamples": int(n), "seqlen": int(seqlen),
                "seed": int(self.seed), "tokens": self.num_tokens, "bos": self.bos.to_dict()}


def _record_text(record, source="", index=0) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise LayercapError(f"calibration data {source}: record {index} is a {type(record).__name__}, not text; expected "
                            'strings or objects with a "text" field.')
    if "text" in record:
        return str(record["text"])
    if "instruction" in record:
        parts = [record["instruction"], record.get("input") or "", record.get("output") or ""]
        return "\n".join(p for p in parts if p)
    if "question" in record and isinstance(record.get("choices"), dict):
        texts = record["choices"].get("text", [])
        labels = record["choices"].get("label", [])
        answer = dict(zip(labels, texts)).get(record.get("answerKey"), "")
        return f"{record['question']}\n{answer}".strip()
    if "context" in record and "choices" in record:
        label = record.get("label")
        choice = record["choices"][label] if isinstance(label, int) and 0 <= label < len(record["choices"]) else ""
        return f"{record['context']}{choice}"
    return " ".join(str(v) for v in record.values() if isinstance(v, str))


HINT = "Pass --data with a UTF-8 text, JSON/JSONL file or a directory."


def read_text(path: str | Path) -> str:
    """The calibration text of a file or directory (see module docstring); refused when it holds no text."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in TEXT_SUFFIXES_SKIPPED)
        if not files:
            raise LayercapError(f"calibration directory {path} contains no files.")
        text = "\n\n".join(_file_text(f) for f in files)
    else:
        text = _file_text(path)
    if not text.strip():
        raise LayercapError(f"calibration data {path}: no text in it (empty or only whitespace). {HINT}")
    return text


def _file_text(path: Path) -> str:
    hint = HINT
    if not path.exists():
        raise LayercapError(f"calibration data {str(path)!r} does not exist. {hint}")
    check_input_file(path, "calibration data", hint)
    # binary or non-UTF-8 bytes are refused (never silently replaced): they are not text to learn from
    raw = read_text_file(path, "calibration data", hint)
    if path.suffix == ".json":
        doc = parse_json(raw, path, "calibration data")
        records = doc if isinstance(doc, list) else [doc]
        text = "\n\n".join(_record_text(r, path, i) for i, r in enumerate(records))
    elif path.suffix == ".jsonl":
        records = parse_jsonl(raw, path)
        text = "\n\n".join(_record_text(r, path, i) for i, r in enumerate(records))
    else:
        text = raw.replace("\r\n", "\n")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All tokens of ``text`` as a 1-D LongTensor (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_sizes(nsamples: int, seqlen: int) -> None:
    if nsamples < 1 or seqlen < 2:
        raise LayercapError(f"need --nsamples >= 1 and --seqlen >= 2, got {nsamples} and {seqlen}.")
    if nsamples * seqlen > MAX_WINDOW_TOKENS:
        raise LayercapError(f"--nsamples {nsamples} x --seqlen {seqlen} = {nsamples * seqlen:,} tokens, more than the "
                            f"{MAX_WINDOW_TOKENS:,} layercap holds in memory; use fewer or shorter windows.")


def calibration_set(
    tokenizer, path: str | Path, nsamples: int = 128, seqlen: int = 512, seed: int = 0, bos="auto", model=None,
    start_token: int = 0,
) -> CalibrationSet:
    """``nsamples`` windows of ``seqlen`` tokens from ``path``, seeded (see module docstring).

    ``bos``: ``auto`` (default) / ``always`` / ``never`` or a :class:`BosChoice`; ``model`` (or its
    config) lets ``auto`` recognise a family that needs BOS (Gemma) whatever its tokenizer says.
    ``start_token``: windows are drawn from token ``start_token`` on, so that the first tokens of
    the text can be held out for evaluation (perplexity reads a text from its start)."""
    _check_sizes(nsamples, seqlen)
    return windows_from_tokens(tokenize_text(tokenizer, read_text(path)), path, tokenizer, nsamples, seqlen, seed, bos,
                               model, start_token)


def windows_from_tokens(tokens: torch.Tensor, path, tokenizer, nsamples: int, seqlen: int, seed: int = 0, bos="auto",
                        model=None, start_token: int = 0) -> CalibrationSet:
    """:func:`calibration_set` on already tokenised text ``tokens`` (1-D) read from ``path``."""
    _check_sizes(nsamples, seqlen)
    if start_token:
        if not (isinstance(start_token, int) and start_token >= 0):
            raise LayercapError(f"start_token must be a whole number >= 0, got {start_token!r}.")
        if tokens.numel() - start_token < seqlen + 1:
            raise LayercapError(f"{path} has {tokens.numel()} tokens: after the first {start_token} (held out) fewer than "
                                f"--seqlen {seqlen} + 1 remain; lower the start or use a larger file.")
        tokens = tokens[start_token:]
    if tokens.numel() < seqlen + 1:
        raise LayercapError(
            f"{path} has {tokens.numel()} tokens, fewer than --seqlen {seqlen} + 1; use a larger file or a smaller --seqlen."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=generator)
    windows = torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
    choice = as_bos_choice(bos, tokenizer, model)
    windows = put_bos(windows, choice)
    return CalibrationSet.of_windows(windows, str(path), seed, choice)


def split_sets(tokenizer, path: str | Path, nsamples: int, heldout: int, seqlen: int, seed: int = 0, split: float = 0.5,
               bos="auto", model=None) -> tuple[CalibrationSet, CalibrationSet]:
    """(train, held-out): ``nsamples`` windows from the first ``split`` fraction of the text's tokens
    and ``heldout`` windows from the rest (disjoint by position; seeds ``seed`` and ``seed + 1``)."""
    if not (isinstance(split, (int, float)) and 0.0 < split < 1.0):
        raise LayercapError(f"--split {split!r} must lie strictly between 0 and 1 (the fraction of the text trained on).")
    tokens = tokenize_text(tokenizer, read_text(path))
    cut = int(split * tokens.numel())
    train = windows_from_tokens(tokens[:cut], path, tokenizer, nsamples, seqlen, seed, bos, model)
    held = windows_from_tokens(tokens[cut:], path, tokenizer, heldout, seqlen, seed + 1, bos, model)
    return train, held
