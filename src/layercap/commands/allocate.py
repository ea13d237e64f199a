"""``layercap allocate``: per-layer capacity (LoRA experts / rank units) under a budget.

Reads a scores file, runs an allocation rule (default: the MDL program, SPEC section 2) and
writes a ``layercap.allocation/v1`` record (JSON, plus CSV with --csv). ``--rule mdl:measured
--utility FILE`` reads a measured utility table (``layercap utility``) instead of scores (SCORES,
when given, must name the same blocks). numpy only: no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layercap.errors import LayercapError

NAME = "allocate"


def add_allocation_options(p: argparse.ArgumentParser, budget_required: bool = True) -> None:
    """Program options shared with ``layercap transfer``."""
    p.add_argument("--budget", type=float, required=budget_required, metavar="B",
                   help="total budget in cost units (with --cost count: the number of experts / rank units)")
    p.add_argument("--cost", default=None, metavar="count|params|FILE",
                   help="cost of one unit per layer: count (1; the default unless the scores file has a cost column), "
                        "params (the layer's parameter count), or a CSV (name,cost) / JSON {name: cost} file")
    p.add_argument("--beta", type=float, default=0.9, help="curvature exponent on q (default 0.9; 0 = uniform, 1 = proportional)")
    p.add_argument("--alpha", default="auto", metavar="auto|X",
                   help="MDL trade-off alpha; auto (default) spends the budget exactly")
    p.add_argument("--min", dest="lower", type=float, default=1, metavar="L", help="at least L units per layer (default 1)")
    p.add_argument("--max", dest="upper", type=float, default=None, metavar="U", help="at most U units per layer (default unbounded)")


def register(subparsers) -> argparse.ArgumentParser:
    from layercap.programs.rules import ALLOCATION_RULES, UTILITY_RULES

    p = subparsers.add_parser(
        NAME, help="allocate LoRA experts / rank per layer under a budget",
        description="Allocate capacity units (LoRA-MoE experts or LoRA rank units) across layers under a global "
                    "budget, by the MDL water-filling program or a baseline rule, and write a "
                    "layercap.allocation/v1 JSON record.",
    )
    p.add_argument("scores", metavar="SCORES", nargs="?", default=None,
                   help="scores file (layercap.scores/v1 JSON or CSV); optional with --utility (then checked against it)")
    add_allocation_options(p)
    p.add_argument("--integer", dest="integer", action="store_true", default=True,
                   help="whole units (default): greedy integer allocation with a gap certificate")
    p.add_argument("--continuous", dest="integer", action="store_false", help="real-valued units (the continuous program)")
    p.add_argument("--rule", default="mdl", choices=list(ALLOCATION_RULES) + list(UTILITY_RULES),
                   help="allocation rule (default mdl; mdl:measured reads --utility)")
    p.add_argument("--utility", default=None, metavar="FILE",
                   help="utility table (layercap.utility/v1, from `layercap utility`) for --rule mdl:measured")
    p.add_argument("--unit", default="experts", choices=("experts", "rank", "units"), help="what one unit is (default experts)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output allocation JSON")
    p.add_argument("--csv", action="store_true", help="also write the per-layer table as CSV beside the JSON")
    return p


ALLOCATION_FLAGS = {"budget": "--budget", "cost": "--cost", "beta": "--beta", "alpha": "--alpha", "lower": "--min", "upper": "--max"}
BETA_RULES = ("mdl", "layerif", "alphalora")  # the rules whose weights are q^beta


def check_allocation_options(args, rule: str) -> None:
    """Refuse --beta / --alpha given to a rule that does not read them."""
    from layercap.commands._options import refuse_ignored

    if rule not in BETA_RULES:
        refuse_ignored(args, {"beta": "--beta"}, f"by --rule {rule} (only {', '.join(BETA_RULES)} weight by q^beta)",
                       "drop it or pick one of those rules")
    if rule != "mdl":
        refuse_ignored(args, {"alpha": "--alpha"}, f"by --rule {rule} (only the mdl program has alpha)",
                       "drop it or use --rule mdl")


def parse_alpha(value: str):
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise LayercapError(f"--alpha {value!r}: use auto or a number > 0.") from None


def resolve_cost_option(cost, scores):
    """--cost value -> what allocation_by_rule takes (None, 'count', 'params' or an array)."""
    if cost is None or cost in ("count", "params"):
        return cost
    from layercap.programs.costs import read_costs

    return read_costs(cost, scores.names)


def main(args) -> int:
    from layercap.commands._decision_io import check_output, format_table, save_with_csv
    from layercap.programs.rules import allocation_by_rule
    from layercap.scorefile import LayerScores

    from layercap.programs.rules import UTILITY_RULES

    check_allocation_options(args, args.rule)
    measured = args.rule in UTILITY_RULES
    if measured != (args.utility is not None):
        raise LayercapError("--utility FILE goes with --rule mdl:measured (and that rule needs it)." if measured else
                            f"--utility is read only by --rule {UTILITY_RULES[0]}; drop it or change --rule.")
    if args.scores is None and not measured:
        raise LayercapError(f"rule {args.rule!r} reads a scores file: pass SCORES (from `layercap score`).")
    out = check_output(args.output, args.csv, inputs=(args.scores, args.cost, args.utility))
    scores = LayerScores.load(args.scores) if args.scores else None
    utility = None
    if measured:
        from layercap.programs.utility import UtilityTable

        utility = UtilityTable.load(args.utility)
        if args.cost not in (None, "count", "params"):
            raise LayercapError("--cost with --utility: use count (1 per unit) or params (the table's adapter parameters per unit).")
    alloc = allocation_by_rule(
        args.rule, scores, args.budget, costs=args.cost if measured else resolve_cost_option(args.cost, scores),
        beta=args.beta, alpha=parse_alpha(args.alpha), lower=args.lower, upper=args.upper, integer=args.integer,
        unit=args.unit, utility=utility,
    )
    alloc.metadata["scores_file" if not measured else "utility_file"] = str(args.scores if not measured else args.utility)
    rows = [[l.name, "-" if l.q is None else f"{l.q:.4f}", l.n if alloc.integer else f"{l.n:.3f}", f"{l.cost:g}"]
            for l in alloc.layers]
    format_table(["layer", "q", args.unit, "cost"], rows)
    mu = "-" if alloc.mu is None else f"{alloc.mu:.4g}"
    gap = "" if alloc.gap is None else f"  gap {alloc.gap:.3g}"
    print(f"rule {alloc.rule}: spent {alloc.spent:g} of {alloc.budget:g} ({'binds' if alloc.binds else 'does not bind'}), mu {mu}{gap}")
    for w in alloc.metadata.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    save_with_csv(alloc, out, args.csv)
    print(f"wrote {out}" + (f" and {out.with_suffix('.csv')}" if args.csv else ""))
    return 0
