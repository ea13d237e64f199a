"""``layercap damage``: measured damage curves of every block (schema ``layercap.damage/v1``).

For every decoder block and every --levels ratio: the KL divergence to the dense model's
next-token distribution and the NLL increase on the calibration tokens when only that block is
pruned (see :mod:`layercap.apply.prune.damage`). Resumable: the partial table is kept beside
FILE (``FILE.partial``) and a rerun with the same arguments continues from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layercap.errors import LayercapError

NAME = "damage"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="per-block damage curves: KL / NLL increase when one block alone is pruned",
        description="Measure, for every decoder block and pruning ratio, the KL divergence to the dense model and "
                    "the calibration NLL increase when only that block is pruned (the input of the mdl:damage rule). "
                    "Optionally also the second-order OBD estimates from the scorer's Fisher statistics.",
    )
    p.add_argument("model", metavar="MODEL", help="model: a save_pretrained directory, a .gguf file, 'smollm2' or tiny-<family>")
    p.add_argument("--method", choices=("wanda", "sparsegpt", "magnitude"), default="wanda", help="pruner (default wanda)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                   metavar="RHO", help="pruning ratios in [0, 1), increasing (default 0.1 ... 0.9)")
    p.add_argument("--structure", default="unstructured", choices=("unstructured", "2:4", "4:8"), help="sparsity structure")
    p.add_argument("--units", default="block", choices=("block", "linear"), help="a row per decoder block (default) or "
                   "per Linear, as EvoPress does (~7x the cost; read by mdl:damage-linear / mdl:obd-linear)")
    p.add_argument("--data", required=True, metavar="PATH", help="calibration text (file or directory)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window offsets (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward call; bounds the logits memory (default 4)")
    p.add_argument("--obd", nargs="*", choices=("diag", "kfac"), default=[],
                   help="also the second-order estimates (diagonal Fisher and/or K-FAC) and their Spearman agreement")
    p.add_argument("--fisher", choices=("true", "empirical"), default="true", help="Fisher labels for --obd (default true)")
    p.add_argument("--context", default=None, metavar="S|RATIOS.json",
                   help="measure at an operating point instead of around the dense model: every other block pruned "
                        "uniformly at sparsity S, or at the per-block ratios of a layercap.ratios/v1 file; the table holds "
                        "each block's KL increase over itself dense in that context (the input of mdl:context)")
    add_table_options(p, "damage")
    return p


def add_table_options(p: argparse.ArgumentParser, what: str) -> None:
    """The flags every resumable measurement command shares (``layercap damage``, ``layercap utility``)."""
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda; default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    p.add_argument("--fresh", action="store_true", help="discard a partial table from an earlier run instead of resuming")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help=f"output {what} table (JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def measure_resumable(args, measure):
    """Load MODEL, run ``measure(model, tokenizer, partial) -> table`` with the partial table kept
    beside -o (``FILE.partial``; dropped first with --fresh), save the table to -o and drop the
    partial. Returns (table, output path)."""
    from layercap.models import load_model

    out = Path(args.output)
    partial = out.with_name(out.name + ".partial")
    if args.fresh:
        partial.unlink(missing_ok=True)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    table = measure(model, tokenizer, partial)
    table.save(out)
    partial.unlink(missing_ok=True)
    return table, out


def _validate(args) -> None:
    from layercap.programs.damage import check_levels

    check_levels(args.levels)
    for flag, value in (("--nsamples", args.nsamples), ("--seqlen", args.seqlen), ("--batch-size", args.batch_size)):
        if value < 1:
            raise LayercapError(f"{flag} must be >= 1, got {value}.")
    if not Path(args.data).exists():
        raise LayercapError(f"--data {args.data!r} does not exist; pass a text, JSON/JSONL file or a directory.")
    from layercap.commands._options import refuse_ignored
    from layercap.io import check_output_file
    from layercap.models.checks import check_device

    if not args.obd:
        refuse_ignored(args, {"fisher": "--fisher"}, "without --obd (the Fisher labels of the OBD estimates)",
                       "drop it or add --obd diag")
    if args.context is not None and args.obd:
        raise LayercapError("--context and --obd: the damage in context is measured only; drop one of them.")
    check_output_file(args.output, "-o", [args.data])
    check_output_file(Path(args.output).with_name(Path(args.output).name + ".partial"), "-o (its .partial table)", [args.data])
    check_device(args.device)


def _context(value: str | None, blocks) -> dict[str, float] | None:
    """--context: a sparsity (every block at it) or a ratios file naming every block."""
    if value is None:
        return None
    try:
        s = float(value)
    except ValueError:
        s = None
    if s is not None:
        if not 0.0 <= s < 1.0:
            raise LayercapError(f"--context {value}: a sparsity must lie in [0, 1).")
        return {b.name: s for b in blocks}
    from layercap.programs.records import PruningRatios

    ratios = PruningRatios.load(value).ratios()
    names = [b.name for b in blocks]
    if sorted(ratios) != sorted(names):
        raise LayercapError(f"--context {value}: its layers ({len(ratios)}) are not this model's {len(names)} blocks "
                            f"({names[0]} ... {names[-1]}); write ratios for this model (layercap prune-ratios).")
    return ratios


def main(args) -> int:
    _validate(args)
    from layercap.apply.prune.damage import curvature_stats, damage_curves
    from layercap.data.calibration import calibration_set
    from layercap.models import find_blocks

    def measure(model, tokenizer, partial):
        from layercap.models.checks import check_seqlen

        check_seqlen(model, args.seqlen)
        calib = calibration_set(tokenizer, args.data, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        curvature = curvature_stats(model, calib, args.obd, fisher=args.fisher, seed=args.seed) if args.obd else None
        blocks = find_blocks(model)
        return damage_curves(model, calib, args.levels, args.method, structure=args.structure, blocks=blocks,
                             batch_size=args.batch_size, curvature=curvature, checkpoint=partial,
                             progress=not args.quiet, model_id=args.model, context=_context(args.context, blocks), units=args.units)

    table, out = measure_resumable(args, measure)
    c = table.cost
    print(f"damage ({table.method}): {len(table.blocks)} {args.units}s x {len(table.levels)} levels on {c['tokens']} tokens; "
          f"dense NLL {table.dense_nll:.4f}; {c['wall_s']:.1f} s = {c['forward_equivalents']:.1f} forward passes "
          f"({c['per_eval_forward_equivalents'] or 0:.3f} per (block, level) evaluation)")
    for kind, rhos in table.agreement.items():
        vals = ", ".join("-" if r is None else f"{r:.2f}" for r in rhos)
        print(f"obd-{kind} vs measured KL, Spearman per level: {vals}")
    ctx = table.metadata.get("context")
    if ctx:
        print(f"in context: KL of the context-pruned model {ctx['kl']:.4f}; the table holds each block's increase over "
              "itself dense in that context")
    print(f"wrote {out}")
    return 0
