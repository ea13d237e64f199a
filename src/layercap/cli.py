"""`layercap` command line: a thin dispatcher.

Each sub-command lives in ``layercap/commands/<name>.py`` and exposes
``register(subparsers) -> argparse.ArgumentParser`` and ``main(args) -> int``. Command modules
are imported lazily so that the numpy-only commands (allocate, prune-ratios, transfer) start
without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under layercap.commands
COMMANDS: dict[str, str] = {
    "score": "score",
    "allocate": "allocate",
    "prune-ratios": "prune_ratios",
    "damage": "damage",
    "transfer": "transfer",
    "prune": "prune",
    "evaluate": "evaluate",
    "compare-pruning": "compare_pruning",
    "finetune": "finetune",
    "compare-allocation": "compare_allocation",
    "run": "run",
}

HELP: dict[str, str] = {
    "score": "score every layer of a causal LM on calibration text (zeta^2 and baselines)",
    "allocate": "allocate LoRA experts / rank per layer under a budget",
    "prune-ratios": "per-layer pruning ratios under a global sparsity target",
    "damage": "per-block damage curves: KL / NLL increase when one block alone is pruned",
    "transfer": "regret of using source scores on a target, with the Theorem-4 bound",
    "prune": "prune a model at per-layer ratios (magnitude / Wanda / SparseGPT)",
    "evaluate": "perplexity and zero-shot multiple-choice accuracy",
    "compare-pruning": "compare ratio rules x pruners x sparsities on one model",
    "finetune": "fine-tune LoRA-MoE or PEFT LoRA adapters with per-layer capacity",
    "compare-allocation": "compare allocation rules by fine-tuning on the same budget",
    "run": "the main job: score, decide, prune, evaluate, report",
}


def _load(name: str):
    return importlib.import_module(f"layercap.commands.{COMMANDS[name]}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layercap",
        description="Curvature-weighted layer capacity allocation and pruning for LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"layercap {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name in COMMANDS:
        if wanted in COMMANDS and name != wanted:
            # only import the module of the command actually run (keeps start-up cheap)
            sub.add_parser(name, help=HELP[name])
            continue
        try:
            module = _load(name)
        except ModuleNotFoundError as exc:
            if not exc.name or not exc.name.startswith("layercap.commands"):
                raise
            sub.add_parser(name, help=HELP[name] + " (not available in this build)")
            continue
        p = module.register(sub)
        p.set_defaults(_main=module.main)
    return parser


def _version() -> str:
    from layercap import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from layercap.errors import LayercapError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args._main(args) or 0)
    except LayercapError as exc:
        print(f"layercap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layercap {args.command}: interrupted; rerun with the same arguments (and --resume where offered) to continue.", file=sys.stderr)
        return 130
