"""`layercap finetune`: train LoRA-MoE (experts per layer) or PEFT LoRA (rank per layer) adapters."""

from __future__ import annotations

import argparse
from pathlib import Path

from layercap.commands._options import add_fields, build_options, field_values
from layercap.errors import LayercapError

NAME = "finetune"


def add_training_args(p: argparse.ArgumentParser, per_task: bool = False) -> None:
    """Flags shared by finetune and compare-allocation: the FinetuneOptions fields, plus data and
    dtype. ``per_task``: --train / --eval take one path per task, paired by position."""
    from layercap.apply.finetune import FinetuneOptions

    add_fields(p, FinetuneOptions, only=FinetuneOptions.cli_fields())
    many = {"nargs": "+"} if per_task else {}
    p.add_argument("--train", required=True, help="training task file (e.g. ../shared/data/tasks/ARC-Easy/train.json) or "
                   "text corpus (.txt/.raw: language modelling, NLL on its held-out last part)"
                   + (", one per task" if per_task else ""), **many)
    p.add_argument("--eval", default=[] if per_task else None, help="evaluation task file or directory"
                   + (", one per --train file (- for a text corpus)" if per_task else " (optional; none for a text corpus)"), **many)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype; default float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_training_flags(args) -> None:
    """Refuse training flags that the chosen settings ignore."""
    from layercap.commands._options import given, refuse_ignored

    if getattr(args, "adapter", "moe") != "moe":
        refuse_ignored(args, {"top_k": "--top-k", "aux_coef": "--aux-coef"}, f"by --adapter {args.adapter} (LoRA-MoE options)",
                       "drop them or use --adapter moe")
    if given(args, "max_steps") and args.max_steps > 0:
        refuse_ignored(args, {"epochs": "--epochs"}, "when --max-steps is given (it overrides epochs)", "give one of the two")
    if not args.eval:
        refuse_ignored(args, {"limit_eval": "--limit-eval", "eval_format": "--eval-format", "eval_batch_size": "--eval-batch-size"},
                       "without --eval (evaluation options)", "drop them or pass --eval TASK")


def options_from_args(args, seed: int):
    from layercap.apply.finetune import FinetuneOptions

    check_training_flags(args)
    return build_options(FinetuneOptions, field_values(args, FinetuneOptions, seed=seed, progress=not args.no_progress))


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="fine-tune LoRA-MoE or PEFT LoRA adapters with per-layer capacity",
        description=(
            "Fine-tune adapters whose per-layer capacity comes from an allocation file "
            "(layercap.allocation/v1): LoRA-MoE with n_k experts in block k, or PEFT LoRA with rank "
            "RANK*n_k. Loss on answer tokens only; resumable; then multiple-choice accuracy on --eval."
        ),
    )
    p.add_argument("model", help="model: smollm2, a save_pretrained directory, or a .gguf file")
    p.add_argument("--allocation", required=True, help="allocation JSON (layercap allocate ... -o allocation.json)")
    add_training_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of adapter init and data order; default 0")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTDIR")
    p.add_argument("-o", "--output", required=True, help="output directory")
    return p


def load_counts(path: str) -> tuple[dict[str, int], dict]:
    from layercap.programs.records import Allocation

    allocation = Allocation.load(path)
    if not allocation.integer:
        raise LayercapError(f"{path} is a continuous allocation; experts and ranks need integers "
                            "(rerun `layercap allocate` with integer counts).")
    return {k: int(v) for k, v in allocation.counts().items()}, allocation.to_dict()


def print_result(result) -> None:
    counts = result.allocation.get("layers") or [{"name": k, "n": v} for k, v in result.allocation.get("counts", {}).items()]
    ns = [int(l["n"]) for l in counts]
    print(f"adapter {result.adapter}: {len(ns)} blocks, units per block {ns} (total {sum(ns)}), "
          f"{result.trainable_params:,} trainable parameters")
    curve = result.train_loss
    if curve:
        print(f"steps {result.steps}: answer-token loss {curve[0]['lm_loss']:.4f} -> {curve[-1]['lm_loss']:.4f} nats"
              f" (train {result.train_time_s:.1f} s, total {result.wall_time_s:.1f} s)")
    if result.eval:
        print(f"{'format':<12} {'task':<16} {'n':>5} {'acc':>7} {'acc_norm':>9} {'chance':>7}")
        for fmt, r in result.eval.items():
            print(f"{fmt:<12} {r['name']:<16} {r['n']:>5} {r['acc']:>7.4f} {r['acc_norm']:>9.4f} {r['chance']:>7.3f}")


def main(args) -> int:
    from layercap.experiments.finetune_job import finetune
    from layercap.models import load_model

    options = options_from_args(args, args.seed)
    counts, allocation = load_counts(args.allocation)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    result = finetune(model, tokenizer, counts, args.train, Path(args.output), options, eval_path=args.eval,
                      allocation=allocation, resume=args.resume)
    print_result(result)
    print(f"wrote {Path(args.output) / 'finetune.json'} and {Path(args.output) / 'adapter'}")
    return 0
