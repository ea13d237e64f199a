"""``layercap score``: zeta_k^2 of every layer block of a causal LM on calibration text.

Writes a ``layercap.scores/v1`` JSON (and a CSV twin with ``--csv``) atomically. Statistics
passes checkpoint to ``<output>.ckpt/`` every ``--checkpoint-every`` micro-batches; rerun
with ``--resume`` after an interruption to continue (the directory is removed on success).
Under ``torchrun`` (WORLD_SIZE > 1) every rank scores its shard of the windows, the sums are
all-reduced (gloo on CPU, nccl on CUDA) and rank 0 writes the output.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from layercap.data.bos import add_bos_argument
from layercap.errors import LayercapError
from layercap.io import read_json
from layercap.models.checks import check_device, check_regex

NAME = "score"
BUILTIN = ("gradnorm", "diag", "kfac", "ekfac", "exact")
CALIBRATED = ("diag-tr", "kfac-tr", "ekfac-tr", "exact-tr", "gain")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="score every layer of a causal LM on calibration text (zeta^2 and baselines)",
        description="Compute zeta_k^2 = g_k^T (C_k + lambda_k I)^-1 g_k for every decoder block (or Linear, or "
        "user group) of MODEL on calibration windows drawn from --data, and write a layercap.scores/v1 file.",
    )
    p.add_argument("model", metavar="MODEL", help="a save_pretrained directory, a .gguf file, or 'smollm2'")
    p.add_argument("--data", metavar="PATH", help="calibration text: a file (txt, JSON, JSONL) or a directory")
    p.add_argument("--method", default="kfac",
                   help=f"score method: {', '.join(BUILTIN)}; calibrated by a per-block trust region: {', '.join(CALIBRATED)} "
                   "(gain = gain-kfac; also gain-diag, gain-ekfac, gain-exact); or a registered baseline (alpha-hill, owl, "
                   "influence); default kfac")
    p.add_argument("--granularity", default="block", choices=("block", "module"), help="one score per block (default) or per Linear")
    p.add_argument("--groups", metavar="FILE", help="JSON object {group name: regex over parameter names}; overrides --granularity")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per micro-batch (default 4; results do not depend on it)")
    p.add_argument("--damping", type=float, default=0.1, help="rho (relative) or lambda (absolute); default 0.1")
    p.add_argument("--damping-mode", default="relative", choices=("relative", "absolute"),
                   help="relative: lambda_k = rho * trace(C_k)/dim_k (default); absolute: lambda_k = --damping")
    p.add_argument("--fisher", default="empirical", choices=("empirical", "true"),
                   help="empirical (observed next tokens, default) or true (labels sampled from the model, seeded)")
    p.add_argument("--cg-tol", type=float, default=1e-6, help="exact: CG relative residual tolerance (default 1e-6)")
    p.add_argument("--cg-max-iter", type=int, default=100, help="exact: CG iteration cap (default 100)")
    p.add_argument("--tr-max-evals", type=int, default=6,
                   help="-tr / gain methods: forward passes of the per-block Levenberg-Marquardt search (default 6)")
    p.add_argument("--tr-factor", type=float, default=30.0,
                   help="-tr / gain methods: lambda grows (r < 1/4) or shrinks (r > 3/4) by this factor (default 30)")
    p.add_argument("--max-factor-gb", type=float, default=None, metavar="GIB",
                   help="kfac/ekfac: stream the blocks in chunks whose statistics fit GIB (one data pass per chunk); "
                   "default: one pass on CPU, 60%% of free memory on CUDA")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu; torchrun ranks use cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (statistics are float32 regardless); default float32")
    p.add_argument("--blocks", metavar="REGEX", help="full module names of the decoder blocks (default: found structurally)")
    p.add_argument("--modules", metavar="REGEX", help="only Linears whose name inside the block matches")
    p.add_argument("--seed", type=int, default=0, help="seed of window offsets and sampled labels (default 0)")
    add_bos_argument(p)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint directory of an interrupted run")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint directory (default <output>.ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=16,
                   help="checkpoint the running sums every N micro-batches (default 16; 0 disables)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="scores file (.json, or .csv)")
    p.add_argument("--csv", action="store_true", help="also write a CSV twin (name,zeta2,params) next to a JSON output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def read_groups(path: str) -> dict[str, str]:
    doc = read_json(path, "--groups", 'Pass a JSON object like {"attn": "self_attn", "mlp": "mlp"}.')
    if not isinstance(doc, dict) or not doc or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise LayercapError(f"--groups {path}: expected a non-empty JSON object mapping group names to regex strings.")
    return doc


def _validate(args):
    """Everything checkable before the model is loaded; returns (method, granularity)."""
    from layercap.scores.registry import get_method

    method = get_method(args.method)  # unknown names -> LayercapError listing the available ones
    from layercap.commands._options import check_score_method_options

    check_score_method_options(args, BUILTIN)
    if method.needs_data:
        if not args.data:
            raise LayercapError(f"--method {args.method} needs calibration data: pass --data PATH "
                                "(e.g. ../shared/data/corpora/wikitext-2-raw/wiki.test.raw).")
        if not Path(args.data).exists():
            raise LayercapError(f"--data {args.data!r} does not exist; pass a text, JSON/JSONL file or a directory.")
    for flag, value, low in (("--nsamples", args.nsamples, 1), ("--seqlen", args.seqlen, 2), ("--batch-size", args.batch_size, 1),
                             ("--checkpoint-every", args.checkpoint_every, 0), ("--cg-max-iter", args.cg_max_iter, 1),
                             ("--tr-max-evals", args.tr_max_evals, 1)):
        if value < low:
            raise LayercapError(f"{flag} must be >= {low}, got {value}.")
    if not args.damping > 0:
        raise LayercapError(f"--damping must be > 0, got {args.damping}.")
    if not (args.tr_factor > 1 and math.isfinite(args.tr_factor)):
        raise LayercapError(f"--tr-factor must be a finite number > 1, got {args.tr_factor}.")
    if not (args.cg_tol > 0 and math.isfinite(args.cg_tol)):
        raise LayercapError(f"--cg-tol must be a finite number > 0, got {args.cg_tol}.")
    if args.max_factor_gb is not None and not args.max_factor_gb > 0:
        raise LayercapError(f"--max-factor-gb must be > 0, got {args.max_factor_gb}.")
    from layercap.io import check_holds_no_input, check_output_file

    out, inputs = Path(args.output), [args.data, args.groups]
    check_output_file(out, "-o", inputs)
    if out.suffix.lower() not in (".json", ".csv"):
        raise LayercapError(f"-o {args.output!r}: use a .json or .csv file name.")
    if args.csv and out.suffix.lower() != ".csv":
        check_output_file(out.with_suffix(".csv"), "--csv (the CSV beside -o)", inputs)
    if args.checkpoint_dir and Path(args.checkpoint_dir).exists() and not Path(args.checkpoint_dir).is_dir():
        raise LayercapError(f"--checkpoint-dir {args.checkpoint_dir!r} is a file; pass a folder.")
    if args.checkpoint_dir:
        check_holds_no_input(args.checkpoint_dir, "--checkpoint-dir", [i for i in (*inputs, args.model) if i and Path(i).exists()])
    check_regex(args.blocks, "--blocks")
    check_regex(args.modules, "--modules")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        check_device(args.device)
    granularity = read_groups(args.groups) if args.groups else args.granularity
    return method, granularity


def main(args) -> int:
    from layercap.experiments.score_job import format_table, init_distributed, run_score_job

    _, granularity = _validate(args)
    rank, world, device = init_distributed(args.device)
    try:
        scores, written = run_score_job(args, granularity, rank, world, device)
        if rank == 0:
            print(format_table(scores))
            meta = scores.metadata
            print(f"method {args.method}, {meta.get('tokens', 0):,} tokens, {meta['wall_time_s']:.1f} s, "
                  f"peak memory {meta['peak_memory_bytes'] / 2**20:.0f} MiB; wrote {', '.join(written)}")
        return 0
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
