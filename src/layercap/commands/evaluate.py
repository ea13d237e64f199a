"""``layercap evaluate``: perplexity and zero-shot multiple-choice accuracy of one model.

Writes a ``layercap.eval/v1`` JSON (``-o``) and prints a table. ``--lm-eval`` additionally runs
lm-evaluation-harness on the in-memory model with the local task YAMLs shipped in
``layercap/evaluate/lm_eval_tasks`` (no hub access; ``pip install -e .[interop]``), on the same
``--limit``/``--seed`` subset as ``--tasks``; its results go under ``"lm_eval"`` in the same file
(see :mod:`layercap.evaluate.lm_eval`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layercap.data.bos import add_bos_argument
from layercap.errors import LayercapError
from layercap.models.checks import check_device, check_seqlen

NAME = "evaluate"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="perplexity and zero-shot multiple-choice accuracy",
        description="Perplexity on text files (strided windows) and zero-shot accuracy (acc, acc_norm as "
        "lm-evaluation-harness) on task files or directories (format A JSON, format B JSONL, generic JSONL, "
        "GLUE CoLA/RTE/MRPC TSV).",
    )
    p.add_argument("model", metavar="MODEL_OR_DIR", help="model: a save_pretrained directory, a .gguf file, or 'smollm2'")
    p.add_argument("--ppl", nargs="+", default=[], metavar="PATH", help="text file(s) for perplexity")
    p.add_argument("--seqlen", type=int, default=512, help="perplexity window in tokens (default 512)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window step (default = --seqlen: non-overlapping)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score only the first N tokens of each text")
    p.add_argument("--tasks", nargs="+", default=[], metavar="PATH", help="task file(s) or directories")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="seeded random subset of N items per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward call (default 8)")
    add_bos_argument(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype (default float32)")
    p.add_argument("--reference", metavar="EVAL_JSON", help="eval.json of a reference (dense) model: decides the tasks 'above chance'")
    p.add_argument("--lm-eval", metavar="TASKS", help="also run lm-evaluation-harness on local tasks (comma-separated: "
                   "arc_easy, arc_challenge, boolq, openbookqa, commonsenseqa, or task YAML paths; data from "
                   "$LAYERCAP_SHARED_DATA, default ../shared/data)")
    p.add_argument("-o", "--output", required=True, metavar="EVAL_JSON", help="output JSON (layercap.eval/v1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def validate(args) -> None:
    """Everything checkable before the model is loaded."""
    if not args.ppl and not args.tasks and not args.lm_eval:
        raise LayercapError("nothing to evaluate: pass --ppl TEXT and/or --tasks PATH (or --lm-eval TASKS).")
    for flag, value in (("--seqlen", args.seqlen), ("--batch-size", args.batch_size)):
        if value < 1:
            raise LayercapError(f"{flag} must be >= 1, got {value}.")
    if args.stride is not None and not (1 <= args.stride <= args.seqlen):
        raise LayercapError(f"--stride must be in [1, --seqlen={args.seqlen}], got {args.stride}.")
    if args.limit is not None and args.limit < 1:
        raise LayercapError(f"--limit must be >= 1, got {args.limit}.")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise LayercapError(f"--max-tokens must be >= 2, got {args.max_tokens}.")
    from layercap.commands._options import refuse_ignored

    if not args.ppl:
        refuse_ignored(args, {"stride": "--stride", "max_tokens": "--max-tokens"},
                       "without --ppl (perplexity options)", "drop them or pass --ppl TEXT")
    if not args.tasks:
        refuse_ignored(args, {"limit": "--limit"} if args.lm_eval else {"limit": "--limit", "seed": "--seed"},
                       "without --tasks or --lm-eval (task options)", "drop them or pass --tasks PATH")
    from layercap.io import check_input_file

    for p in args.ppl:
        check_input_file(p, "--ppl", "Pass a text file such as ../shared/data/corpora/wikitext-2-raw/wiki.test.raw.")
    from layercap.io import check_output_file

    check_output_file(args.output, "-o", [*args.ppl, *args.tasks, args.reference])
    check_device(args.device)
    if args.lm_eval:
        try:
            import lm_eval  # noqa: F401
        except ImportError as exc:
            raise LayercapError("--lm-eval needs lm-evaluation-harness: `pip install -e .[interop]`, or drop --lm-eval.") from exc
        from layercap.evaluate.lm_eval import parse_tasks, task_config

        for name in parse_tasks(args.lm_eval):
            task_config(name)  # data files checked before the model loads


def main(args) -> int:
    from layercap.data.tasks import load_task
    from layercap.evaluate import EvalResult, evaluate_model
    from layercap.io import atomic_write_json
    from layercap.models import load_model

    from layercap.data.calibration import read_text

    validate(args)
    for t in args.tasks:  # parse errors before the model loads
        load_task(t, limit=args.limit, seed=args.seed)
    for p in args.ppl:  # binary or non-UTF-8 text is refused before the model loads
        read_text(p)
    reference = EvalResult.load(args.reference) if args.reference else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.ppl:
        check_seqlen(model, args.seqlen)
    result = evaluate_model(
        model,
        tokenizer,
        ppl=args.ppl,
        tasks=args.tasks,
        limit=args.limit,
        seqlen=args.seqlen,
        stride=args.stride,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        reference=reference,
        model_name=str(args.model),
        progress=not args.quiet,
        bos=args.bos,
    )
    doc = result.to_dict()
    if args.lm_eval:
        from layercap.evaluate.lm_eval import run_lm_eval

        doc["lm_eval"] = run_lm_eval(model, tokenizer, args.lm_eval, batch_size=args.batch_size, limit=args.limit,
                                     seed=args.seed, device=args.device)
    atomic_write_json(args.output, doc)
    print(result.table())
    for name, r in doc.get("lm_eval", {}).get("tasks", {}).items():
        print(f"lm-eval {name}: acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  (n={r['n'] or 'all'})")
    print(f"wrote {args.output}")
    return 0
