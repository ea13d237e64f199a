"""``layercap score`` as a job: load, draw calibration windows, score, save (rank 0), clean up.

Under ``torchrun`` every rank scores its shard of the windows and all ranks hold the same scores
(see :func:`layercap.scores.score_model`); rank 0 writes the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from layercap.errors import LayercapError


def init_distributed(device: str) -> tuple[int, int, str]:
    """Initialise torch.distributed under torchrun; returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LayercapError(f"--device {device} requested but CUDA is not available; use --device cpu.")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def run_score_job(args, granularity, rank: int, world: int, device: str):
    """Score ``args.model`` by ``args.method`` (the command's validated arguments); on rank 0
    write ``args.output`` (and its CSV twin with ``args.csv``, both or neither). Returns
    ``(scores, written paths)``."""
    from layercap.data.calibration import calibration_set
    from layercap.io import all_or_nothing
    from layercap.models import load_model
    from layercap.models.checks import check_seqlen
    from layercap.scores import ScoreOptions, get_method, score_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    calib = None
    if get_method(args.method).needs_data:
        check_seqlen(model, args.seqlen)
        calib = calibration_set(tokenizer, args.data, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                bos=args.bos, model=model)
    ckpt_dir = args.checkpoint_dir or f"{args.output}.ckpt"
    options = ScoreOptions(
        batch_size=args.batch_size, damping=args.damping, damping_mode=args.damping_mode, fisher=args.fisher,
        seed=args.seed, device=device, progress=not args.quiet,
        checkpoint_dir=ckpt_dir if args.checkpoint_every > 0 else None,
        checkpoint_every=max(args.checkpoint_every, 1), resume=args.resume,
        cg_tol=args.cg_tol, cg_max_iter=args.cg_max_iter, max_factor_gb=args.max_factor_gb,
        tr_max_evals=args.tr_max_evals, tr_factor=args.tr_factor,
    )
    scores = score_model(model, args.method, calib, granularity=granularity, options=options,
                         blocks_regex=args.blocks, modules_regex=args.modules,
                         metadata={"world_size": world, "dtype": args.dtype})
    written: list[str] = []
    if rank == 0:
        out = Path(args.output)
        written.append(str(out))
        with all_or_nothing(out, out.with_suffix(".csv")):
            scores.save(out)
            if args.csv and out.suffix.lower() != ".csv":
                scores.save(out.with_suffix(".csv"))
                written.append(str(out.with_suffix(".csv")))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0 and options.checkpoint_dir:
        remove_checkpoints(options.checkpoint_dir)
    return scores, written


def remove_checkpoints(folder: str) -> None:
    """Delete the checkpoint files the engine wrote (``PHASE.rankRofW.pt`` and their temporaries),
    then the folder if that leaves it empty; anything else in it is left alone."""
    import re

    path = Path(folder)
    if not path.is_dir():
        return
    ours = re.compile(r"^\.?[\w-]+\.rank\d+of\d+\.pt(\..*\.tmp)?$")
    for f in path.iterdir():
        if f.is_file() and ours.match(f.name):
            f.unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass  # not empty: it holds files layercap did not write


def format_table(scores) -> str:
    """One row per layer; the calibrated methods add the trust region's r and accepted lambda."""
    q = scores.q
    info = scores.metadata.get("method_info", {})
    tr = "tr_ratio" in info
    width = max(len("layer"), *(len(n) for n in scores.names))
    lines = [f"{'layer':<{width}}  {'zeta2':>12}  {'q':>8}  {'params':>12}" + (f"  {'r':>8}  {'lambda':>10}" if tr else "")]
    for k, (layer, qk) in enumerate(zip(scores.layers, q)):
        row = f"{layer.name:<{width}}  {layer.zeta2:>12.6g}  {qk:>8.4f}  {layer.params:>12,d}"
        if tr:
            row += f"  {info['tr_ratio'][k]:>8.3g}  {info['damping_lambda'][k]:>10.3g}"
        lines.append(row)
    return "\n".join(lines)
