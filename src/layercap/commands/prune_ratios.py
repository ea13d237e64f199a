"""``layercap prune-ratios``: per-layer pruning ratios under a global sparsity target.

Reads a scores file, runs a ratio rule (default: the MDL program in mode exact, SPEC section 3)
and writes a ``layercap.ratios/v1`` record (JSON, plus CSV with --csv). numpy only: no torch.
"""

from __future__ import annotations

import argparse
import sys

NAME = "prune-ratios"


def add_pruning_options(p: argparse.ArgumentParser, sparsity_required: bool = True) -> None:
    """Program options shared with ``layercap transfer``."""
    p.add_argument("--sparsity", type=float, required=sparsity_required, metavar="S",
                   help="global target: fraction of the prunable weights removed (parameter-weighted), e.g. 0.5")
    p.add_argument("--mode", default="exact", choices=("exact", "at-least"),
                   help="exact (default): meet S exactly; at-least: the paper's literal program (prunes >= S)")
    p.add_argument("--eta", type=float, default=1.0, help="exponent on q (default 1)")
    p.add_argument("--p", type=float, default=2.0, help="psi(rho) = rho^p, p > 1 (default 2)")
    p.add_argument("--gamma", type=float, default=1.0, help="weight of the curvature term (at-least mode only; default 1)")
    p.add_argument("--bits", type=float, default=16, help="bits per retained weight (at-least mode only; default 16)")
    p.add_argument("--min-ratio", type=float, default=0.0, help="lowest per-layer ratio (default 0)")
    # below 1: a ratio of 1 would remove a whole block, which `layercap prune` refuses
    p.add_argument("--max-ratio", type=float, default=0.95, help="highest per-layer ratio (default 0.95)")


PRUNING_FLAGS = {"sparsity": "--sparsity", "mode": "--mode", "eta": "--eta", "p": "--p", "gamma": "--gamma", "bits": "--bits",
                 "min_ratio": "--min-ratio", "max_ratio": "--max-ratio"}


def check_pruning_options(args, rule: str) -> None:
    """Refuse program options given to a rule or mode that does not read them."""
    from layercap.commands._options import refuse_ignored

    if rule not in ("mdl", "mdl-paper"):
        refuse_ignored(args, {k: PRUNING_FLAGS[k] for k in ("mode", "eta", "p", "gamma", "bits")},
                       f"by --rule {rule} (options of the mdl program)", "drop them or use --rule mdl")
    elif rule == "mdl-paper":
        refuse_ignored(args, {k: PRUNING_FLAGS[k] for k in ("mode", "gamma", "bits")},
                       "by --rule mdl-paper (it fixes the mode)", "drop them or use --rule mdl")
    elif args.mode != "at-least":
        refuse_ignored(args, {"gamma": "--gamma", "bits": "--bits"}, "in --mode exact (at-least mode only)",
                       "drop them or add --mode at-least")


def register(subparsers) -> argparse.ArgumentParser:
    from layercap.programs.rules import PRUNING_RULES

    p = subparsers.add_parser(
        NAME, help="per-layer pruning ratios under a global sparsity target",
        description="Per-layer pruning ratios meeting a global (parameter-weighted) sparsity target, by the MDL "
                    "pruning program or a baseline rule; writes a layercap.ratios/v1 JSON record for "
                    "`layercap prune --ratios`.",
    )
    p.add_argument("scores", metavar="SCORES", help="scores file (layercap.scores/v1 JSON or CSV); params = prunable weights")
    add_pruning_options(p)
    p.add_argument("--rule", default="mdl", choices=PRUNING_RULES, help="ratio rule (default mdl)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output ratios JSON")
    p.add_argument("--csv", action="store_true", help="also write the per-layer table as CSV beside the JSON")
    return p


def main(args) -> int:
    from layercap.commands._decision_io import check_output, format_table, save_with_csv
    from layercap.programs.rules import ratios_by_rule
    from layercap.scorefile import LayerScores

    check_pruning_options(args, args.rule)
    out = check_output(args.output, args.csv, inputs=(args.scores,))
    scores = LayerScores.load(args.scores)
    ratios = ratios_by_rule(args.rule, scores, args.sparsity, mode=args.mode, eta=args.eta, p=args.p,
                            gamma=args.gamma, bits=args.bits, min_ratio=args.min_ratio, max_ratio=args.max_ratio)
    ratios.metadata["scores_file"] = str(args.scores)
    q = scores.q
    rows = [[l.name, f"{q[k]:.4f}", l.params, f"{l.ratio:.4f}"] for k, l in enumerate(ratios.layers)]
    format_table(["layer", "q", "params", "ratio"], rows)
    nu = "-" if ratios.nu is None else f"{ratios.nu:.4g}"
    print(f"rule {ratios.rule} ({ratios.mode}): target {ratios.sparsity:g}, achieved {ratios.achieved:.10f}, "
          f"clipped {ratios.clipped}/{len(ratios)}, nu {nu}")
    for w in ratios.warnings:
        print(f"warning: {w}", file=sys.stderr)
    save_with_csv(ratios, out, args.csv)
    print(f"wrote {out}" + (f" and {out.with_suffix('.csv')}" if args.csv else ""))
    return 0
