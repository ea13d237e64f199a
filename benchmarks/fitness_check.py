"""Does calibration KL rank pruning configurations as held-out perplexity does? (issue 13)

For finished compare-pruning cells (same model, pruner and sparsity) this prunes the dense model
at each cell's ratios *sequentially*, exactly as the cell was pruned, on the first ``--windows``
calibration windows of the sweep's settings, and prints the mean KL(p_dense || p_pruned) on those
windows (`calibration_fidelity`, what the sweep's `fit:` stages measure on all windows) next to the
cell's held-out perplexities. Calibration data only; nothing is written.

    OMP_NUM_THREADS=1 python benchmarks/fitness_check.py results/pruning --method wanda --sparsity 0.7 \\
        --windows 32 --rules mdl-obd-refine mdl-obd atp mdl-context
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a compare-pruning output directory (run.json, cells/)")
    ap.add_argument("--method", required=True)
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--windows", type=int, default=32, help="calibration windows to prune on and measure (default 32)")
    ap.add_argument("--rules", nargs="+", required=True, help="cell file prefixes, e.g. mdl-obd atp uniform")
    args = ap.parse_args(argv)

    from layercap.apply.prune import calibration_fidelity, prune_model
    from layercap.data.calibration import calibration_set
    from layercap.models import load_model

    st = json.loads((args.run_dir / "run.json").read_text())["settings"]
    model, tok = load_model(st["model"], dtype=st["dtype"])
    calib = calibration_set(tok, st["data"], nsamples=st["nsamples"], seqlen=st["seqlen"], seed=st["seed"], model=model,
                            start_token=st["start_token"])
    n = args.windows
    calib = calib.first(n)

    for rule in args.rules:
        cell = json.loads((args.run_dir / "cells" / f"{rule}_{args.method}_s{args.sparsity:.2f}.json").read_text())
        t0 = time.perf_counter()
        pruned = copy.deepcopy(model)
        prune_model(pruned, cell["ratios"], args.method, calib, progress=False, batch_size=8)
        kl = calibration_fidelity(model, pruned, calib, batch_size=8).kl
        del pruned
        ppl = " / ".join(f"{v['ppl']:.1f}" for v in cell["eval"]["ppl"].values())
        print(f"{rule}: KL {kl:.4f} nats/token on {n} windows; held-out ppl {ppl}; {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
