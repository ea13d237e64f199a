"""`layercap compare-allocation`: fine-tune the same adapter under several allocation rules.

Every rule gets the same total budget, training data, steps and seeds; rules are ``RULE`` or
``RULE:METHOD`` (``mdl:kfac``, ``mdl:diag``). A ``--train`` file may be a text corpus (``.txt``:
language-modelling adaptation scored by the NLL of its held-out last part; its ``--eval`` is ``-``). The sweep is a plan of stages on the one runner
(:mod:`layercap.experiments.allocation_sweep`): ``--resume`` continues it, rerunning exactly the
stages whose settings changed.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from layercap.commands._options import build_options

NAME = "compare-allocation"


def register(subparsers) -> argparse.ArgumentParser:
    from layercap.commands.finetune import add_training_args

    p = subparsers.add_parser(
        NAME,
        help="compare allocation rules by fine-tuning on the same budget",
        description=(
            "Fine-tune the same adapter (LoRA-MoE experts or LoRA rank units per block) under several "
            "allocation rules with one total budget, on the same data and seeds; report mean +- std "
            "held-out NLL (and accuracy) per rule, task and adapter. Resumable per (task, adapter, rule, seed) cell."
        ),
    )
    p.add_argument("model", help="model: smollm2, a save_pretrained directory, or a .gguf file")
    p.add_argument("--budget", type=float, required=True, help="total units over all blocks (e.g. 120 experts)")
    p.add_argument("--rules", nargs="+", required=True,
                   help="rules, RULE or RULE:METHOD (e.g. uniform mola-2468 mola-8642 alphalora layerif mdl:diag mdl:kfac)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; default 0")
    p.add_argument("--adapters", nargs="+", default=None, help="compare several adapters (moe lora); overrides --adapter")
    p.add_argument("--beta", type=float, default=0.9, help="score exponent of mdl/layerif/alphalora; default 0.9")
    p.add_argument("--lower", type=int, default=None, help="minimum units per block (default 1 for moe, 0 for lora)")
    p.add_argument("--calib-nsamples", type=int, default=32, help="calibration windows for scoring; default 32")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration window; default 256")
    p.add_argument("--calib-batch-size", type=int, default=4, help="windows per scoring micro-batch; default 4")
    p.add_argument("--utility-levels", type=int, nargs="+", default=[0, 1, 2, 4, 8],
                   help="mdl:measured: unit levels of the measured utility curves; default 0 1 2 4 8")
    p.add_argument("--utility-steps", type=int, default=5, help="mdl:measured: Adam steps per (block, level); default 5")
    p.add_argument("--utility-nsamples", type=int, default=4, help="mdl:measured: training (and as many held-out) windows; default 4")
    p.add_argument("--utility-seqlen", type=int, default=64, help="mdl:measured: tokens per window; default 64")
    p.add_argument("--utility-lr", type=float, default=None, help="mdl:measured: their learning rate (default --lr)")
    add_training_args(p, per_task=True)
    p.add_argument("--resume", action="store_true", help="continue the comparison in OUTDIR (reruns what changed)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    return p


def main(args) -> int:
    from layercap.commands.finetune import options_from_args
    from layercap.experiments.allocation_sweep import AllocationSweepOptions, run_allocation_sweep
    from layercap.report.allocation_table import markdown_table

    options = build_options(AllocationSweepOptions, dict(
        model=args.model, budget=args.budget, rules=args.rules, train=args.train, eval=args.eval, seeds=args.seeds,
        beta=args.beta, lower=args.lower, calib_nsamples=args.calib_nsamples, calib_seqlen=args.calib_seqlen,
        calib_batch_size=args.calib_batch_size, dtype=args.dtype, finetune=options_from_args(args, args.seeds[0]),
        adapters=args.adapters or [], utility_levels=args.utility_levels, utility_steps=args.utility_steps,
        utility_lr=args.utility_lr, utility_nsamples=args.utility_nsamples, utility_seqlen=args.utility_seqlen), flags={"model": "MODEL"})
    command = "layercap " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    comparison, summary = run_allocation_sweep(options, args.output, resume=args.resume, command=command)
    print(markdown_table(comparison))
    print(f"ran {len(summary.ran)} stage(s), {len(summary.skipped)} unchanged; "
          f"wrote {args.output}/comparison.json, .csv, .md, .png")
    return 0
