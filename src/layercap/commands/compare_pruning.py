"""``layercap compare-pruning``: ratio rules x pruners x sparsities on one model.

Writes OUTDIR/comparison.json (``layercap.comparison/v1``), comparison.csv, comparison.md and
comparison.png; the sweep is a plan of stages on the one runner
(:mod:`layercap.experiments.pruning_sweep`), so a rerun computes only what is new or changed.
"""

from __future__ import annotations

import argparse
import sys

from layercap.commands._options import build_options

NAME = "compare-pruning"


def register(subparsers) -> argparse.ArgumentParser:
    from layercap.apply.prune import PRUNERS
    from layercap.data.bos import add_bos_argument

    p = subparsers.add_parser(
        NAME,
        help="compare ratio rules x pruners x sparsities on one model",
        description="Prune fresh copies of MODEL with every (rule, pruner, sparsity) on the same calibration windows, "
        "evaluate perplexity and zero-shot accuracy against the dense model, and write comparison.{json,csv,md,png} "
        "to OUTDIR. Resumable: a rerun computes only the cells (and scores) whose settings are new or changed.",
    )
    p.add_argument("model", metavar="MODEL", help="model: a save_pretrained directory, a .gguf file, 'smollm2' or tiny-<family>")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5], metavar="S", help="target sparsities (default 0.5)")
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=tuple(PRUNERS),
                   help="pruners (default wanda sparsegpt)")
    p.add_argument("--rules", nargs="+", default=["uniform", "owl", "alphapruning", "mdl:kfac"], metavar="RULE[:SOURCE]",
                   help="ratio rules: uniform, owl, alphapruning, layerif, atp, evopress, mdl-paper, mdl:SOURCE (SOURCE = a "
                   "score method: diag, kfac, ekfac, gradnorm, exact..., or damage / obd: the convex program on measured "
                   "KL / second-order damage curves; context: the same program on the KL increase measured with every other block pruned uniformly at the target (one table per sparsity); damage+refine / obd+refine: that program's ratios refined by the evopress "
                   "search for --search-generations; damage-linear / obd-linear: the program on tables with a row, and a "
                   "ratio, per Linear); default uniform owl alphapruning mdl:kfac")
    p.add_argument("--damage-levels", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                   metavar="RHO", help="ratios at which mdl:damage / mdl:obd / mdl:context measure each block (default 0.1 .. 0.9)")
    p.add_argument("--damage-nsamples", type=int, default=None, metavar="N",
                   help="calibration windows KL is measured on by mdl:damage's curves and the atp / evopress searches "
                   "(the first N; default all --nsamples; the pruners always use all)")
    p.add_argument("--fitness-nsamples", type=int, default=None, metavar="N",
                   help="calibration windows the searches' KL fitness reads (atp's step, evopress and +refine, "
                   "mdl:context's trust radius; the first N; default: as --damage-nsamples). Each candidate costs "
                   "one partial pass over them")
    p.add_argument("--search-generations", type=int, default=20, metavar="G", help="evopress generations (default 20)")
    p.add_argument("--data", metavar="PATH", help="calibration text (file or directory), shared by scores and pruners (required)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--start-token", type=int, default=0, metavar="N",
                   help="draw calibration windows from token N on (hold out the first N for --ppl on the same text)")
    p.add_argument("--ppl", nargs="+", default=[], metavar="PATH", help="text file(s) for perplexity")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window (default 512, non-overlapping)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="perplexity on the first N tokens of each text")
    p.add_argument("--tasks", nargs="+", default=[], metavar="PATH", help="task file(s) or directories for zero-shot accuracy")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="seeded random subset of N items per task")
    p.add_argument("--min-ratio", type=float, default=0.0, help="lowest per-block ratio, every rule (default 0)")
    p.add_argument("--max-ratio", type=float, default=0.9, help="highest per-block ratio, every rule (default 0.9)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration windows and task subsets (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype (default float32)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild comparison.{json,csv,md,png} from the finished cells in OUTDIR (no model work)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_bos_argument(p)
    return p


def main(args) -> int:
    from layercap.errors import LayercapError
    from layercap.experiments.pruning_sweep import PruningSweepOptions, collect, run_pruning_sweep
    from layercap.report.pruning_table import write_outputs

    if args.report_only:
        result = collect(args.output)
        write_outputs(result, args.output)
        print(result.markdown())
        print(f"wrote {args.output}/comparison.json, comparison.csv, comparison.md, comparison.png ({len(result.cells)} cells)")
        return 0
    from layercap.commands._options import refuse_ignored
    from layercap.programs.rules import damage_kind, is_refined

    sources = {r.partition(":")[2].strip() for r in args.rules}
    measures_damage = any(damage_kind(s) for s in sources)
    searches = "evopress" in args.rules or any(is_refined(s) for s in sources)
    if not measures_damage:
        refuse_ignored(args, {"damage_levels": "--damage-levels"},
                       "without an mdl:damage or mdl:obd rule (a damage-curve option)", "drop it or add such a rule")
    if not measures_damage and not {"atp", "evopress"} & set(args.rules):
        refuse_ignored(args, {"damage_nsamples": "--damage-nsamples"},
                       "without an mdl:damage, mdl:obd, atp or evopress rule (the windows KL is measured on)",
                       "drop it or add such a rule")
    if not searches and "atp" not in args.rules and not any(damage_kind(s) == "context" for s in sources):
        refuse_ignored(args, {"fitness_nsamples": "--fitness-nsamples"},
                       "without an atp, evopress, +refine or mdl:context rule (the searches' fitness)",
                       "drop it or add such a rule")
    if not searches:
        refuse_ignored(args, {"search_generations": "--search-generations"}, "without the evopress rule or a +refine rule",
                       "drop it or add --rules evopress (or mdl:damage+refine)")
    if not args.data:
        raise LayercapError("--data is required: pass calibration text, e.g. --data ../shared/data/corpora/wikitext-2-raw/wiki.test.raw.")
    options = build_options(PruningSweepOptions, dict(
        model=args.model, rules=args.rules, methods=args.methods, sparsities=args.sparsity, data=args.data,
        nsamples=args.nsamples, seqlen=args.seqlen, start_token=args.start_token, ppl=args.ppl, tasks=args.tasks, limit=args.limit,
        eval_seqlen=args.eval_seqlen, max_tokens=args.max_tokens, batch_size=args.batch_size, min_ratio=args.min_ratio,
        max_ratio=args.max_ratio, seed=args.seed, dtype=args.dtype, device=args.device, bos=args.bos,
        damage_levels=args.damage_levels, damage_nsamples=args.damage_nsamples, fitness_nsamples=args.fitness_nsamples,
        search_generations=args.search_generations,
        progress=not args.quiet), flags={"sparsities": "--sparsity", "model": "MODEL"})
    result, summary = run_pruning_sweep(options, args.output, log=lambda msg: print(msg, file=sys.stderr))
    print(result.markdown())
    print(f"ran {len(summary.ran)} stage(s), {len(summary.skipped)} unchanged; "
          f"wrote {args.output}/comparison.json, comparison.csv, comparison.md, comparison.png")
    return 0
