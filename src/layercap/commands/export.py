"""``layercap export``: write ratios / allocations in the formats of other tools.

    layercap export ratios.json --format llmcompressor [--method sparsegpt|wanda] [--structure 2:4] -o recipe.yaml
    layercap export experts.json --format peft --model MODEL [--rank-unit 8] [--targets q_proj,v_proj] -o adapter/
    layercap export ratios.json|experts.json --format csv|json [--model MODEL] -o table.csv

The work is :func:`layercap.export.export`.
"""

from __future__ import annotations

import argparse

NAME = "export"


def register(subparsers) -> argparse.ArgumentParser:
    from layercap.export import FORMATS, STRUCTURES

    p = subparsers.add_parser(
        NAME,
        help="export ratios / allocations for llm-compressor, PEFT, or as a per-module table",
        description="Write a layercap.ratios/v1 or layercap.allocation/v1 record in another tool's format: "
        + "; ".join(f"{f.name}: {f.summary}" for f in FORMATS.values()) + ".",
    )
    p.add_argument("decisions", metavar="DECISIONS", help="ratios.json (from prune-ratios) or allocation.json (from allocate)")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="output format")
    p.add_argument("--model", metavar="MODEL", help="model whose module names the decisions are checked against and "
                   "expanded to (a save_pretrained directory is read from config.json only); required by --format peft")
    p.add_argument("--method", choices=("sparsegpt", "wanda"), default="sparsegpt", help="llmcompressor: pruning modifier (default sparsegpt)")
    p.add_argument("--structure", choices=STRUCTURES, default="unstructured", help="llmcompressor: mask structure (default unstructured)")
    p.add_argument("--dampening-frac", type=float, default=0.01, help="llmcompressor sparsegpt: Hessian dampening (default 0.01)")
    p.add_argument("--block-size", type=int, default=128, help="llmcompressor sparsegpt: columns per pass (default 128)")
    p.add_argument("--rank-unit", type=int, default=8, help="peft: LoRA rank per allocated unit (default 8, as finetune --rank)")
    p.add_argument("--targets", metavar="NAMES", help="peft: adapted modules, last name components (default: the architecture's)")
    p.add_argument("--alpha-ratio", type=float, default=2.0, help="peft: lora_alpha / rank (default 2)")
    p.add_argument("--dropout", type=float, default=0.0, help="peft: lora_dropout (default 0)")
    p.add_argument("--blocks", metavar="REGEX", help="table: full module names of the decoder blocks (default: found structurally)")
    p.add_argument("--modules", metavar="REGEX", help="table: only Linears whose name inside the block matches")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="output file (peft: output directory)")
    return p


def main(args) -> int:
    from layercap.errors import LayercapError
    from layercap.export import ExportOptions, export

    from layercap.commands._options import refuse_ignored

    llmc = {"method": "--method", "structure": "--structure", "dampening_frac": "--dampening-frac", "block_size": "--block-size"}
    peft = {"rank_unit": "--rank-unit", "targets": "--targets", "alpha_ratio": "--alpha-ratio", "dropout": "--dropout"}
    table = {"blocks": "--blocks", "modules": "--modules"}
    if args.format == "llmcompressor":
        refuse_ignored(args, {**peft, **table}, "by --format llmcompressor", "drop them")
    elif args.format == "peft":
        refuse_ignored(args, {**llmc, **table}, "by --format peft", "drop them")
    else:  # the tables read the structure (ratios) and the LoRA options (ranks)
        refuse_ignored(args, {k: v for k, v in llmc.items() if k != "structure"}, f"by --format {args.format}", "drop them")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    if args.targets is not None and not targets:
        raise LayercapError(f"--targets {args.targets!r} names no module; pass e.g. q_proj,v_proj.")
    options = ExportOptions(method=args.method, structure=args.structure, dampening_frac=args.dampening_frac,
                            block_size=args.block_size, rank_unit=args.rank_unit, targets=targets,
                            alpha_ratio=args.alpha_ratio, dropout=args.dropout, blocks=args.blocks, modules=args.modules)
    path = export(args.decisions, args.format, args.output, model_spec=args.model, options=options)
    print(f"wrote {path} ({args.format})")
    return 0
