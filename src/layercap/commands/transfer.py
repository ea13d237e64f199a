"""``layercap transfer``: regret of deciding with source scores on a target (SPEC section 4).

Solves the chosen program with the source and with the target scores, evaluates both decisions
under the target's objective, and reports the regret with the Theorem-4 bound and whether its
assumptions hold. Writes a ``layercap.transfer/v1`` record with -o. numpy only: no torch.
"""

from __future__ import annotations

import argparse
import sys

from layercap.errors import LayercapError

NAME = "transfer"


def register(subparsers) -> argparse.ArgumentParser:
    from layercap.commands.allocate import add_allocation_options
    from layercap.commands.prune_ratios import add_pruning_options

    p = subparsers.add_parser(
        NAME, help="regret of using source scores on a target, with the Theorem-4 bound",
        description="Regret R = F(x*(q_S); q_T) - F(x*(q_T); q_T) of the (continuous) allocation or pruning "
                    "program when the decision is made with SOURCE scores but evaluated on TARGET, with the "
                    "Theorem-4 bound (L/2)(L_q/m)^2 ||q_T - q_S||^2 and a check of its assumptions.",
    )
    p.add_argument("source", metavar="SOURCE_SCORES", help="scores the decision is made with")
    p.add_argument("target", metavar="TARGET_SCORES", help="scores the decision is evaluated on (same layers)")
    p.add_argument("--program", required=True, choices=("allocation", "pruning"), help="which program")
    g = p.add_argument_group("allocation options (--program allocation)")
    add_allocation_options(g, budget_required=False)
    g2 = p.add_argument_group("pruning options (--program pruning)")
    add_pruning_options(g2, sparsity_required=False)
    p.add_argument("-o", "--output", metavar="FILE", help="write the layercap.transfer/v1 JSON record here")
    p.add_argument("--csv", action="store_true", help="also write the per-layer table as CSV beside the JSON")
    return p


def check_program_options(args) -> None:
    """Refuse options that the chosen program would ignore (the user meant something else)."""
    from layercap.commands._options import refuse_ignored
    from layercap.commands.allocate import ALLOCATION_FLAGS, check_allocation_options
    from layercap.commands.prune_ratios import PRUNING_FLAGS, check_pruning_options

    if args.program == "pruning":
        refuse_ignored(args, ALLOCATION_FLAGS, "by --program pruning (allocation options)",
                       "drop them or use --program allocation")
        check_pruning_options(args, "mdl")
    else:
        refuse_ignored(args, PRUNING_FLAGS, "by --program allocation (pruning options)",
                       "drop them or use --program pruning")
        check_allocation_options(args, "mdl")


def main(args) -> int:
    from layercap.commands._decision_io import check_output, format_table, save_with_csv
    from layercap.commands.allocate import parse_alpha, resolve_cost_option
    from layercap.programs.transfer import transfer
    from layercap.scorefile import LayerScores

    out = check_output(args.output, args.csv, inputs=(args.source, args.target, args.cost)) if args.output else None
    if args.csv and out is None:
        raise LayercapError("--csv needs -o FILE (the CSV is written beside the JSON).")
    check_program_options(args)
    source = LayerScores.load(args.source)
    target = LayerScores.load(args.target)
    if args.program == "allocation":
        if args.budget is None:
            raise LayercapError("--program allocation needs --budget B.")
        opts = dict(budget=args.budget, costs=resolve_cost_option(args.cost, target), beta=args.beta,
                    alpha=parse_alpha(args.alpha), lower=args.lower, upper=args.upper)
        if isinstance(opts["costs"], str):
            from layercap.programs.rules import resolve_costs

            opts["costs"] = resolve_costs(opts["costs"], target)
    else:
        if args.sparsity is None:
            raise LayercapError("--program pruning needs --sparsity S.")
        opts = dict(sparsity=args.sparsity, mode=args.mode, eta=args.eta, p=args.p, gamma=args.gamma, bits=args.bits,
                    min_ratio=args.min_ratio, max_ratio=args.max_ratio)
    result = transfer(source, target, args.program, **opts)
    result.metadata.update(source_file=str(args.source), target_file=str(args.target))
    rows = [[l.name, f"{l.q_source:.4f}", f"{l.q_target:.4f}", f"{l.x_source:.4f}", f"{l.x_target:.4f}"] for l in result.layers]
    format_table(["layer", "q_source", "q_target", "x_source", "x_target"], rows)
    bound = "undefined" if result.bound is None else f"{result.bound:.6g}"
    print(f"{result.program}: regret {result.regret:.6g}, Theorem-4 bound {bound}, ||q_T - q_S||^2 {result.q_distance2:.4g}")
    if result.assumptions_hold:
        print("bound assumptions hold" + ("" if result.bound_holds is None else f"; regret <= bound: {result.bound_holds}"))
    else:
        for note in result.assumption_notes:
            print(f"note: bound assumption fails: {note}", file=sys.stderr)
    if out is not None:
        save_with_csv(result, out, args.csv)
        print(f"wrote {out}" + (f" and {out.with_suffix('.csv')}" if args.csv else ""))
    return 0
