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
    "utility": "utility",
    "transfer": "transfer",
    "prune": "prune",
    "evaluate": "evaluate",
    "compare-pruning": "compare_pruning",
    "finetune": "finetune",
    "compare-allocation": "compare_allocation",
    "run": "run",
    "export": "export",
}

HELP: dict[str, str] = {
    "score": "score every layer of a causal LM on calibration text (zeta^2 and baselines)",
    "allocate": "allocate LoRA experts / rank per layer under a budget",
    "prune-ratios": "per-layer pruning ratios under a global sparsity target",
    "damage": "per-block damage curves: KL / NLL increase when one block alone is pruned",
    "utility": "per-block utility curves: held-out loss reduction from adapting one block alone",
    "transfer": "regret of using source scores on a target, with the Theorem-4 bound",
    "prune": "prune a model at per-layer ratios (magnitude / Wanda / SparseGPT)",
    "evaluate": "perplexity and zero-shot multiple-choice accuracy",
    "compare-pruning": "compare ratio rules x pruners x sparsities on one model",
    "finetune": "fine-tune LoRA-MoE or PEFT LoRA adapters with per-layer capacity",
    "compare-allocation": "compare allocation rules by fine-tuning on the same budget",
    "run": "the main job: score, decide, prune, evaluate, report",
    "export": "export ratios / allocations for llm-compressor, PEFT, or as a per-module table",
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
        p.set_defaults(_main=module.main, _parser=p)
    return parser


def given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options the user actually typed in ``argv`` (argparse fills in
    defaults, so a command cannot tell a default from a given value otherwise): ``argv`` parsed
    again with every default suppressed."""
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)
    return set(vars(namespace))


def _version() -> str:
    from layercap import __version__

    return __version__


def _one_line(text: str, limit: int = 400) -> str:
    """``text`` on one printable line (control characters escaped, long messages cut)."""
    flat = " ".join(str(text).split())
    flat = "".join(c if c.isprintable() else repr(c)[1:-1] for c in flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    """An unexpected exception as ``Type: message`` (an OSError with its file and reason)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename!s}" if exc.filename else ""
        return f"{type(exc).__name__}:{where}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 success, 2 bad input or any failure (one line on stderr,
    no traceback unless ``--debug``), 130 interrupted."""
    from layercap.errors import LayercapError

    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is global and may appear anywhere (before or after the command)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(argv)
        parser.add_argument("--debug", action="store_true",
                            help="show the Python traceback of an unexpected error (may be given anywhere)")
        args = parser.parse_args(argv)
        if not getattr(args, "_main", None):
            parser.print_help()
            return 0 if args.command is None else 2
        command = args.command
        args._given = given_dests(args._parser, argv[argv.index(command) + 1:])
        from layercap.commands._options import check_seeds

        check_seeds(args)
        return int(args._main(args) or 0)
    except LayercapError as exc:
        if debug:
            raise
        print(f"layercap {command}: error: {_one_line(exc, 2000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layercap {command}: interrupted; rerun with the same arguments (and --resume where offered) to continue.", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # the safety net: no user ever sees a raw traceback
        if debug:
            raise
        print(f"layercap {command}: error: {_one_line(_describe(exc))} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2
