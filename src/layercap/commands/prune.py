"""``layercap prune``: prune a model at per-layer ratios and save the pruned checkpoint.

OUTDIR receives a ``save_pretrained`` checkpoint (safetensors), the tokenizer and
``pruning.json`` (a ``layercap.pruning/v1`` report), written atomically: an interrupted or
failed run leaves no OUTDIR behind (or the previous one intact).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layercap.data.bos import add_bos_argument
from layercap.errors import LayercapError
from layercap.io import read_json
from layercap.models.checks import check_device, check_regex, check_seqlen

NAME = "prune"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="prune a model at per-layer ratios (magnitude / Wanda / SparseGPT)",
        description="Prune the Linear weights of every decoder block at per-block ratios (a ratios file from "
        "`layercap prune-ratios`, or one uniform --sparsity) with magnitude, Wanda or SparseGPT, "
        "block by block on calibration data; save the pruned checkpoint and pruning.json to OUTDIR.",
    )
    p.add_argument("model", metavar="MODEL", help="model: a save_pretrained directory, a .gguf file, or 'smollm2'")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ratios", metavar="FILE",
                     help="layercap.ratios/v1 JSON (from prune-ratios), or a JSON object {block or module name: ratio}")
    src.add_argument("--sparsity", type=float, metavar="S", help="uniform ratio S in [0, 1) for every block (no scores needed)")
    p.add_argument("--method", choices=("wanda", "sparsegpt", "magnitude"), default="wanda", help="pruner (default wanda)")
    p.add_argument("--structure", default="unstructured", choices=("unstructured", "2:4", "4:8"),
                   help="unstructured (default) or N:M; N:M needs every ratio = N/M")
    p.add_argument("--data", metavar="PATH", help="calibration text (file or directory); required by wanda and sparsegpt")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window offsets (default 0)")
    add_bos_argument(p)
    p.add_argument("--device", default="cpu", help="where each block is pruned, one at a time (cpu, cuda, cuda:1; default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype (default float32)")
    p.add_argument("--blocks", metavar="REGEX", help="full module names of the decoder blocks (default: found structurally)")
    p.add_argument("--modules", metavar="REGEX", help="only prune Linears whose name inside the block matches")
    p.add_argument("--save-format", choices=("dense", "compressed-tensors"), default="dense",
                   help="dense safetensors (default) or compressed-tensors' sparse bitmask format (2:4 format for 2:4)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output checkpoint directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def read_ratios(path: str) -> dict[str, float]:
    """Ratios by name from a ``layercap.ratios/v1`` file or a plain JSON object {name: ratio}."""
    doc = read_json(path, "--ratios", "Create one with `layercap prune-ratios SCORES --sparsity 0.5 -o ratios.json`.")
    if isinstance(doc, dict) and "schema" in doc:
        from layercap.programs.records import PruningRatios

        return PruningRatios.from_dict(doc, str(path)).ratios()
    if isinstance(doc, dict) and doc:
        return dict(doc)  # values are validated by check_ratio_values
    raise LayercapError(
        f"--ratios {path}: expected a layercap.ratios/v1 record or a JSON object mapping block/module names to ratios."
    )


def _validate(args) -> None:
    """Everything checkable before the model is loaded."""
    if args.method == "magnitude":
        from layercap.commands._options import refuse_ignored

        refuse_ignored(args, {"data": "--data", "nsamples": "--nsamples", "seqlen": "--seqlen", "batch_size": "--batch-size",
                              "bos": "--bos"}, "by --method magnitude (it reads no calibration data)",
                       "drop them or use --method wanda / sparsegpt")
    else:
        if not args.data:
            raise LayercapError(f"--method {args.method} needs calibration data: pass --data PATH (e.g. ../shared/data/corpora/wikitext-2-raw/wiki.test.raw), or use --method magnitude.")
        if not Path(args.data).exists():
            raise LayercapError(f"--data {args.data!r} does not exist; pass a text, JSON/JSONL file or a directory.")
    for flag, value in (("--nsamples", args.nsamples), ("--seqlen", args.seqlen), ("--batch-size", args.batch_size)):
        if value < 1:
            raise LayercapError(f"{flag} must be >= 1, got {value}.")
    from layercap.io import check_output_dir

    model_dir = Path(args.model) if Path(args.model).exists() else None
    check_output_dir(args.output, "-o", [model_dir, args.ratios, args.data])
    check_device(args.device)
    check_regex(args.blocks, "--blocks")
    check_regex(args.modules, "--modules")


def main(args) -> int:
    from layercap.apply.prune import check_ratio_values, module_ratios, prune_model
    from layercap.data.calibration import calibration_set
    from layercap.io import atomic_directory, write_output_marker
    from layercap.models import find_blocks, load_model

    _validate(args)
    if args.save_format == "compressed-tensors":
        from layercap.export.compressed_tensors import check_structure

        check_structure(args.structure)
    if args.sparsity is not None:
        check_ratio_values({"--sparsity": args.sparsity}, args.structure)
        ratios = None
    else:
        ratios = read_ratios(args.ratios)
        check_ratio_values(ratios, args.structure)

    # the model stays on CPU; --device only receives one block at a time
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    blocks = find_blocks(model, args.blocks, args.modules)
    if ratios is None:
        ratios = {b.name: float(args.sparsity) for b in blocks}
    else:
        uncovered = [b.name for b in blocks if b.name not in ratios and not any(k.startswith(b.name + ".") for k in ratios)]
        if uncovered:
            print(f"layercap prune: {len(uncovered)} block(s) not in {args.ratios} stay dense, e.g. {uncovered[:3]}", file=sys.stderr)
    module_ratios(blocks, ratios, args.structure)  # names checked before any work
    calib = None
    if args.method != "magnitude":
        check_seqlen(model, args.seqlen)
        calib = calibration_set(tokenizer, args.data, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                bos=args.bos, model=model)

    report = prune_model(
        model, ratios, method=args.method, calib=calib, structure=args.structure,
        device=None if args.device == "cpu" else args.device, batch_size=args.batch_size,
        progress=not args.quiet, blocks=blocks,
    )
    report.metadata.update({"ratios": args.ratios or f"uniform {args.sparsity:g}", "dtype": args.dtype})
    with atomic_directory(args.output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if args.save_format == "compressed-tensors":
            from layercap.export.compressed_tensors import compress_pruned

            summary = compress_pruned(tmp, blocks, ratios, args.structure)
            report.metadata["save_format"] = {k: v for k, v in summary.items() if k != "modules"}
        report.save(Path(tmp) / "pruning.json")
        write_output_marker(tmp, NAME)
    print(report.table())
    print(f"method {report.method}, structure {report.structure}, {report.wall_time_s:.1f} s; wrote {args.output}/ "
          "(safetensors checkpoint, tokenizer, pruning.json)")
    return 0
