"""Cost of the measured utility curves (issue 14.3) as a multiple of one forward + backward.

On SmolLM2 with TinyShakespeare (training windows from the first half of the text, held-out
windows from the second), it measures the utility of a few blocks (``--blocks``, indices) at the
given levels, timing in the same run one plain forward + backward over the training windows
(every weight trainable, a fine-tuning step), and reports

* per (block, level): the cost in forward+backward equivalents (``steps`` Adam steps on blocks
  k..K-1 plus the head, and one held-out evaluation);
* the whole table for all blocks, extrapolated from the mean over the measured blocks (the cost
  of block k falls linearly with k, so spread the indices over the depth).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/utility.py --blocks 0 15 29 \
        --levels 0 1 8 --steps 10 --json /tmp/bench_utility.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "corpora"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/corpora")
SHAKES = DATA / "tinyshakespeare" / "input.txt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(SHAKES))
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29], help="block indices measured")
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 1, 8])
    ap.add_argument("--all-levels", type=int, default=4, help="nonzero levels of the full table extrapolated to")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank-unit", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from layercap.apply.utility import measure_utility
    from layercap.data.calibration import split_sets
    from layercap.models import find_blocks, load_model

    model, tokenizer = load_model(args.model)
    train, held = split_sets(tokenizer, args.data, args.nsamples, args.heldout, args.seqlen, model=model)
    every = find_blocks(model)
    table = measure_utility(model, train, held, args.levels, steps=args.steps, lr=args.lr, unit_rank=args.rank_unit,
                            only=args.blocks, tolerance=1.0, progress=True, model_id=args.model)
    c = table.cost
    per_eval = c["per_eval_fwdbwd_equivalents"]
    K = len(every)
    result = {
        "model": args.model, "blocks": [table.blocks[i] for i in args.blocks], "levels": table.levels, "steps": args.steps,
        "train_tokens": c["train_tokens"], "heldout_tokens": c["heldout_tokens"], "threads": c["threads"],
        "fwdbwd_s": c["fwdbwd_s"], "setup_s": c["setup_s"], "train_s": c["train_s"], "eval_s": c["eval_s"],
        "evaluations": c["evaluations"], "per_eval_fwdbwd_equivalents": per_eval,
        "per_step_fwdbwd_equivalents": c["per_step_fwdbwd_equivalents"],
        "full_table_evaluations": K * args.all_levels,
        "full_table_fwdbwd_equivalents_estimate": K * args.all_levels * per_eval,
        "full_table_s_estimate": K * args.all_levels * per_eval * c["fwdbwd_s"],
        "base_nll": table.base_nll, "reduction": [table.reduction[i] for i in args.blocks],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "reduction"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
