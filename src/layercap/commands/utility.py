"""``layercap utility``: measured utility curves of every block (schema ``layercap.utility/v1``).

For every decoder block and every --levels capacity (units of --rank-unit LoRA rank): the
held-out NLL reduction after --steps Adam steps adapting only that block (see
:mod:`layercap.apply.utility`). Training windows come from the first --split of the text,
held-out windows from the rest. Resumable: the partial table is kept beside FILE
(``FILE.partial``) and a rerun with the same arguments continues from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layercap.commands.damage import add_table_options, measure_resumable
from layercap.errors import LayercapError

NAME = "utility"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="per-block utility curves: held-out loss reduction from adapting one block alone",
        description="Measure, for every decoder block and capacity level, the held-out NLL reduction after a short "
                    "Adam adaptation of a LoRA on that block alone (the input of the mdl:measured allocation rule).",
    )
    p.add_argument("model", metavar="MODEL", help="model: a save_pretrained directory, a .gguf file, 'smollm2' or tiny-<family>")
    p.add_argument("--levels", type=float, nargs="+", default=[0, 1, 2, 4, 8], metavar="N",
                   help="capacity units, whole numbers, increasing (default 0 1 2 4 8)")
    p.add_argument("--adapter", choices=("lora", "moe"), default="lora",
                   help="what a unit is: lora (rank --rank-unit) or moe (one expert of rank --rank-unit; measured as "
                        "the LoRA of the same size)")
    p.add_argument("--rank-unit", type=int, default=4, help="LoRA rank of one unit (default 4)")
    p.add_argument("--targets", default=None, metavar="NAMES", help="Linears to adapt, comma-separated (default: finetune's)")
    p.add_argument("--steps", type=int, default=10, help="Adam steps per (block, level), full batch (default 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--data", required=True, metavar="PATH", help="text (file or directory): train and held-out windows")
    p.add_argument("--split", type=float, default=0.5, help="fraction of the text's tokens for training windows (default 0.5)")
    p.add_argument("--nsamples", type=int, default=8, help="training windows (default 8)")
    p.add_argument("--heldout", type=int, default=8, help="held-out windows (default 8)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows and the LoRA initialisation (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward call (default 4)")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="nats/token a curve may dip with the level before the table is refused (default 0.005)")
    add_table_options(p, "utility")
    return p


def _validate(args) -> None:
    from layercap.io import check_output_file
    from layercap.programs.utility import check_unit_levels

    args.levels = check_unit_levels(args.levels)
    for flag, value in (("--nsamples", args.nsamples), ("--heldout", args.heldout), ("--seqlen", args.seqlen),
                        ("--batch-size", args.batch_size), ("--steps", args.steps), ("--rank-unit", args.rank_unit)):
        if value < 1:
            raise LayercapError(f"{flag} must be >= 1, got {value}.")
    if not args.tolerance >= 0:
        raise LayercapError(f"--tolerance must be >= 0 (nats/token), got {args.tolerance}.")
    if not Path(args.data).exists():
        raise LayercapError(f"--data {args.data!r} does not exist; pass a text, JSON/JSONL file or a directory.")
    check_output_file(Path(args.output), "-o", [args.data])


def main(args) -> int:
    _validate(args)
    from layercap.apply.utility import measure_utility
    from layercap.data.calibration import split_sets

    def measure(model, tokenizer, partial):
        train, heldout = split_sets(tokenizer, args.data, args.nsamples, args.heldout, args.seqlen, seed=args.seed,
                                    split=args.split, model=model)
        targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
        return measure_utility(model, train, heldout, args.levels, steps=args.steps, lr=args.lr, unit_rank=args.rank_unit,
                               adapter=args.adapter, targets=targets, batch_size=args.batch_size, seed=args.seed,
                               tolerance=args.tolerance, checkpoint=partial, progress=not args.quiet, model_id=args.model)

    table, out = measure_resumable(args, measure)
    c = table.cost
    U = table.values()
    print(f"utility ({table.adapter}, rank unit {args.rank_unit}): {len(table.blocks)} blocks x {len(table.levels)} levels, "
          f"{args.steps} Adam steps on {c['train_tokens']} tokens, held-out NLL {table.base_nll:.4f} on "
          f"{c['heldout_tokens']} tokens; {c['wall_s']:.1f} s = {c['fwdbwd_equivalents']:.1f} forward+backward passes "
          f"({c['per_eval_fwdbwd_equivalents'] or 0:.2f} per (block, level))")
    for j, n in enumerate(table.levels):
        col = U[:, j]
        print(f"  {n} units: reduction mean {col.mean():.4f}, min {col.min():.4f} ({table.blocks[int(col.argmin())]}), "
              f"max {col.max():.4f} ({table.blocks[int(col.argmax())]}) nats/token")
    print(f"wrote {out}")
    return 0
