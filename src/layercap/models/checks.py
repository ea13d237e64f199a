"""Checks every command makes before any forward pass: device, sequence length, block regex.

Each raises :class:`LayercapError` naming the flag, what is wrong and the fix, so a bad value
never ends in an error from deep inside torch or transformers.
"""

from __future__ import annotations

import re

from layercap.errors import LayercapError

_DEVICE = re.compile(r"^(cpu|cuda|mps)(:(\d+))?$")


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` if usable here (cpu, cuda, cuda:N, mps); else a LayercapError saying why."""
    device = str(device).strip()
    m = _DEVICE.match(device)
    if not m:
        raise LayercapError(f"{flag} {device!r} is not a device layercap can use; pass cpu, cuda or cuda:N.")
    kind, index = m.group(1), m.group(3)
    if kind == "cpu":
        if index not in (None, "0"):
            raise LayercapError(f"{flag} {device!r}: there is one CPU device; pass cpu.")
        return device
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LayercapError(f"{flag} {device} requested but CUDA is not available on this machine; use {flag} cpu.")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise LayercapError(f"{flag} {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}).")
        return device
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LayercapError(f"{flag} {device} requested but MPS is not available on this machine; use {flag} cpu.")
    return device


def model_context(model) -> int | None:
    """The model's maximum sequence length in tokens (from its config), or None if it states none."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(model, seqlen: int, flag: str = "--seqlen", extra: int = 0) -> None:
    """Refuse ``seqlen`` (+ ``extra`` tokens) longer than the model's context before any forward:
    past it GPT-2/OPT fail with an IndexError in the position embedding and RoPE models silently
    extrapolate."""
    limit = model_context(model)
    if limit is not None and seqlen + extra > limit:
        raise LayercapError(f"{flag} {seqlen} exceeds the model's context of {limit} positions (tokens); use {flag} <= {limit - extra}.")


def check_regex(pattern: str | None, flag: str) -> None:
    """Refuse a pattern that does not compile, naming the flag and the position of the fault."""
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        raise LayercapError(f"{flag} {pattern!r} is not a valid regular expression ({exc}); fix the pattern.") from None
