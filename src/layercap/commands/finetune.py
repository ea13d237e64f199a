"""`layercap finetune`: train LoRA-MoE (experts per layer) or PEFT LoRA (rank per layer) adapters."""

from __future__ import annotations

import argparse
from pathlib import Path

from layercap.errors import LayercapError

NAME = "finetune"


def add_training_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by finetune and compare-allocation."""
    p.add_argument("--adapter", choices=("moe", "lora"), default="moe",
                   help="moe: n_k LoRA experts per adapted Linear of block k; lora: PEFT LoRA of rank RANK*n_k (default moe)")
    p.add_argument("--rank", type=int, default=8, help="rank of each expert (moe) or the rank unit (lora); default 8")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (moe; all when a block has fewer); default 2")
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient (moe); default 0.01")
    p.add_argument("--targets", default=None,
                   help="comma-separated Linear names to adapt (default: q,k,v,o and MLP projections of the architecture)")
    p.add_argument("--train", required=True, help="training task file (e.g. ../shared/data/tasks/ARC-Easy/train.json)")
    p.add_argument("--eval", default=None, help="evaluation task file or directory (optional)")
    p.add_argument("--eval-format", choices=("instruction", "zero-shot", "both"), default="instruction",
                   help="score the trained instruction format, the harness zero-shot prompts, or both (default instruction)")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs (ignored when --max-steps > 0); default 1")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate, linear decay; default 2e-4")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size; default 8")
    p.add_argument("--eval-batch-size", type=int, default=8, help="evaluation batch size; default 8")
    p.add_argument("--max-length", type=int, default=256, help="max tokens per training example; default 256")
    p.add_argument("--limit-train", type=int, default=None, help="train on a seeded random subset of N examples")
    p.add_argument("--limit-eval", type=int, default=None, help="evaluate on a fixed random subset of N items (seed 0)")
    p.add_argument("--save-steps", type=int, default=None, help="checkpoint every S steps (default: about 5 per run)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype; default float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def options_from_args(args, seed: int):
    from layercap.apply.finetune import FinetuneOptions

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    return FinetuneOptions(
        adapter=args.adapter, rank=args.rank, alpha=args.alpha, top_k=args.top_k, aux_coef=args.aux_coef,
        targets=targets, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
        max_length=args.max_length, seed=seed, limit_train=args.limit_train, limit_eval=args.limit_eval,
        eval_batch_size=args.eval_batch_size, eval_format=args.eval_format, save_steps=args.save_steps,
        progress=not args.no_progress,
    )


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
    from layercap.apply.finetune import finetune
    from layercap.models import load_model

    options = options_from_args(args, args.seed)
    options.validate()
    counts, allocation = load_counts(args.allocation)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    result = finetune(model, tokenizer, counts, args.train, Path(args.output), options, eval_path=args.eval,
                      allocation=allocation, resume=args.resume)
    print_result(result)
    print(f"wrote {Path(args.output) / 'finetune.json'} and {Path(args.output) / 'adapter'}")
    return 0
