"""Which free OBD form ranks blocks as the measured damage does? Diagonal Fisher against K-FAC (issue 13).

For a finished compare-pruning run this reads the measured block damage table
``damage/<method>.json`` (KL when one block alone is pruned, on the sweep's first
``damage_nsamples`` calibration windows), recomputes on exactly those windows the two
second-order estimates 1/2 dW^T C dW of the same pruned weights (C the diagonal Fisher, and its
K-FAC form 1/2 tr(G dW A dW^T)), and prints, per level, the Spearman correlation across blocks
of each estimate with the measured KL, and the cost of each (seconds and plain forward passes).
Calibration data only: this is how the OBD form of ``mdl:obd`` is chosen, never on held-out text.
Nothing is written.

    OMP_NUM_THREADS=1 python benchmarks/obd_agreement.py results/pruning --method sparsegpt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a compare-pruning output directory (run.json, damage/<method>.json)")
    ap.add_argument("--method", required=True, choices=("wanda", "sparsegpt", "magnitude"))
    args = ap.parse_args(argv)

    import torch

    from layercap.apply.prune.damage import curvature_stats, damage_curves
    from layercap.data.calibration import calibration_set
    from layercap.errors import LayercapError
    from layercap.models import load_model
    from layercap.programs.damage import DamageTable, spearman

    st = json.loads((args.run_dir / "run.json").read_text())["settings"]
    path = args.run_dir / "damage" / f"{args.method}.json"
    measured = DamageTable.load(path)
    model, tok = load_model(st["model"], dtype=st["dtype"])
    calib = calibration_set(tok, st["data"], nsamples=st["nsamples"], seqlen=st["seqlen"], seed=st["seed"], model=model,
                            start_token=st["start_token"])
    n = int(measured.calibration["nsamples"])
    calib = calib.first(n)
    if calib.sha256 != measured.calibration["sha256"]:
        raise LayercapError(f"{path}: measured on other calibration windows than {args.run_dir}/run.json describes.")

    ids = calib.input_ids
    with torch.no_grad():
        t0 = time.perf_counter()
        for batch in ids.split(4):
            model(batch)
        forward_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    curv = curvature_stats(model, calib, ("diag", "kfac"))
    curv_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    est = damage_curves(model, calib, measured.levels, args.method, curvature=curv, measure=False, progress=False,
                        model_id=measured.model)
    obd_s = time.perf_counter() - t0
    print(f"{path}: {len(measured.blocks)} blocks x {len(measured.levels)} levels on {calib.num_tokens} tokens; "
          f"plain forward {forward_s:.1f} s; both Fisher passes {curv_s:.0f} s = {curv_s / forward_s:.0f} forwards; "
          f"pruning + both estimates {obd_s:.0f} s")
    print("level  " + "  ".join(f"{lv:>5.2f}" for lv in measured.levels))
    for kind in ("diag", "kfac"):
        rhos = [spearman([r[j] for r in est.obd[kind]], [r[j] for r in measured.kl]) for j in range(len(measured.levels))]
        print(f"{kind:<5}  " + "  ".join("    -" if r is None else f"{r:+.2f}" for r in rhos))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
