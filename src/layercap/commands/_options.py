"""Flags from options dataclasses: defaults and help come from the fields, errors map to flags.

An options dataclass validates itself in ``__post_init__`` and its errors name fields
(``rank must be >= 1``); :func:`build_options` turns them into flag names (``--rank must be >= 1``).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, fields
from typing import Any

from layercap.errors import LayercapError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_fields(parser: argparse.ArgumentParser, cls, only=None, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (``only``: a list of those fields; ``skip``: names to leave
    out), typed by its annotation."""
    for f in (only if only is not None else fields(cls)):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        help_ = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"default": default, "help": f"{help_} (default {default})" if default is not None else help_}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        annotation = str(f.type)
        if annotation.startswith("list"):
            kwargs["type"] = lambda text: [t.strip() for t in text.split(",") if t.strip()]
            kwargs["help"] += " (comma-separated)"
        elif annotation.startswith("bool"):
            kwargs = {"action": "store_true", "help": help_}
        elif annotation.startswith("int"):
            kwargs["type"] = int
        elif annotation.startswith("float"):
            kwargs["type"] = float
        parser.add_argument(flag(f.name), dest=f.name, **kwargs)


def field_values(args: argparse.Namespace, cls, **overrides) -> dict[str, Any]:
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return values


def build_options(cls, values: dict[str, Any], flags: dict[str, str] | None = None):
    """``cls(**values)``, with the field names in a validation error replaced by their flags
    (``--`` + the name with dashes, or ``flags[name]`` where the command spells it otherwise). Only
    the first: a message starts with the field it is about."""
    try:
        return cls(**values)
    except LayercapError as exc:
        flags = flags or {}
        names = sorted((f.name for f in fields(cls)), key=len, reverse=True)
        text = re.sub(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")\b",
                      lambda m: flags.get(m.group(1), flag(m.group(1))), str(exc), count=1)
        raise LayercapError(text) from exc


def given(args: argparse.Namespace, dest: str) -> bool:
    """True when the user typed the option ``dest`` (not just its default); see ``cli.given_dests``.
    Called outside the CLI (no record of what was typed), nothing counts as given."""
    return dest in (getattr(args, "_given", None) or ())


def refuse_ignored(args: argparse.Namespace, dests: dict[str, str], reason: str, fix: str) -> None:
    """Refuse the options among ``dests`` (dest -> flag) that the user gave although the chosen
    setting ignores them (``reason``): the user meant something the program would not do."""
    typed = [flag for dest, flag in dests.items() if given(args, dest)]
    if typed:
        raise LayercapError(f"{', '.join(typed)}: ignored {reason}; {fix}.")


def check_score_method_options(args, builtin) -> None:
    """Refuse the curvature options that the chosen built-in method does not read."""
    if args.method not in builtin:
        return
    if args.method != "exact":
        refuse_ignored(args, {"cg_tol": "--cg-tol", "cg_max_iter": "--cg-max-iter"},
                       f"by --method {args.method} (conjugate-gradient options of --method exact)", "drop them")
    if args.method not in ("kfac", "ekfac"):
        refuse_ignored(args, {"max_factor_gb": "--max-factor-gb"}, f"by --method {args.method} (K-FAC factor memory)",
                       "drop it")
    if args.method == "gradnorm":
        refuse_ignored(args, {"fisher": "--fisher", "damping": "--damping", "damping_mode": "--damping-mode"},
                       "by --method gradnorm (C = 0: no curvature, no damping)", "drop them or pick a curvature method")


SEED_MAX = 2 ** 32 - 1  # numpy's limit (transformers.set_seed seeds numpy too)


def check_seeds(args: argparse.Namespace) -> None:
    """Every ``--seed`` / ``--seeds`` value a whole number in [0, 2^32 - 1], before any work."""
    for dest in ("seed", "seeds"):
        values = getattr(args, dest, None)
        for value in [values] if isinstance(values, int) else (values or []):
            if not 0 <= value <= SEED_MAX:
                raise LayercapError(f"--{dest} {value}: a seed is a whole number in [0, {SEED_MAX:,}].")
