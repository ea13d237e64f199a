"""Cost of each scoring method relative to one plain forward+backward over the same tokens.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/scoring.py --nsamples 8 --seqlen 256
    .venv/bin/python benchmarks/scoring.py --model mistral-7b-shaped   # GPU only (see README)

Every measurement runs in its own subprocess so that peak memory (CUDA max_memory_allocated,
or ru_maxrss on CPU) belongs to that measurement alone. The baseline is the plain training
step over the same windows and micro-batches: forward, mean-token-NLL, backward into .grad.
``exact`` is run on the first ``--exact-blocks`` blocks with ``--cg-iters`` CG iterations (it
is a reference method; its cost scales with blocks x iterations).
The calibrated methods (``kfac-tr``, ``diag-tr``, ``gain``, ...: the base method's passes plus a
few forward passes per block) are measured the same way: ``--methods kfac,kfac-tr,gain``.
Writes a JSON record (``layercap.bench.scoring/v1``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "corpora" / "wikitext-2-raw" / "wiki.test.raw"
METHODS = ("gradnorm", "diag", "kfac", "ekfac", "exact")
# calibrated gains (scores/trust_region.py), measured with --methods, e.g. kfac,kfac-tr,diag-tr,gain
CALIBRATED = ("diag-tr", "kfac-tr", "ekfac-tr", "exact-tr", "gain")


def mistral_7b_shaped(device: str):
    """Mistral-7B architecture (32 layers, 4096 hidden, 14336 FFN, GQA 32/8, vocab 32000),
    random init in bfloat16 directly on ``device``; nothing is downloaded."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                           sliding_window=None, tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.config._layercap_source = "mistral-7b-shaped (random init)"
    return model


def load(args):
    """(model, CalibrationSet) for one measurement."""
    import torch

    from layercap.data.calibration import CalibrationSet, calibration_set
    from layercap.io import sha256_bytes
    from layercap.models import load_model

    if args.model == "mistral-7b-shaped":
        model = mistral_7b_shaped(args.device)
        ids = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
        return model, CalibrationSet(ids, sha256_bytes(ids.numpy().tobytes()), "random ids", 0)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    return model, calibration_set(tok, args.data, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)


def peak_memory(device: str) -> int:
    from layercap.scores.api import peak_memory_bytes

    return peak_memory_bytes(device)


def measure_one(args) -> dict:
    """Run in a subprocess: one method (or the plain baseline); returns its record."""
    import torch

    from layercap.scores import ScoreOptions, score_model
    from layercap.scores.engine import logits_of, summed_nll

    model, calib = load(args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if args.one == "plain":
        n_tok = calib.input_ids.shape[0] * (calib.input_ids.shape[1] - 1)
        start = time.perf_counter()
        for ids in calib.batches(args.batch_size):
            ids = ids.to(args.device)
            loss = summed_nll(logits_of(model, ids), ids) / n_tok
            loss.backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return {"method": "plain fwd+bwd", "wall_s": time.perf_counter() - start, "peak_bytes": peak_memory(args.device)}
    blocks = None
    if args.one == "exact" and args.exact_blocks:
        blocks = rf"model\.layers\.({'|'.join(str(i) for i in range(args.exact_blocks))})"
    opts = ScoreOptions(batch_size=args.batch_size, cg_max_iter=args.cg_iters, cg_tol=1e-12, max_factor_gb=args.max_factor_gb)
    scores = score_model(model, args.one, calib, options=opts, blocks_regex=blocks)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    info = scores.metadata.get("method_info", {})
    return {"method": args.one, "wall_s": scores.metadata["wall_time_s"], "peak_bytes": scores.metadata["peak_memory_bytes"],
            "timing": info.get("timing"), "statistics_passes": info.get("statistics_passes"),
            "blocks": len(scores), "cg_iterations": info.get("cg_iterations"),
            "forward_passes": info.get("forward_passes"), "tr_evals": info.get("tr_evals"),
            "zeta2": scores.zeta2.tolist()}


def write_record(out: Path, args, records: list[dict]) -> str:
    """Write the JSON record and return the Markdown table of ``records`` (first = baseline)."""
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from layercap.io import atomic_write_json

    base = records[0]
    lines = ["| method | wall s | x plain fwd+bwd | peak MiB | x plain | notes |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in records:
        note = ""
        if r.get("timing") and r["method"] in ("kfac", "ekfac"):
            t = r["timing"]
            note = f"stats pass {t['fisher_pass_s']:.1f} s ({t['fisher_pass_s'] / base['wall_s']:.2f}x)"
            if r["method"] == "ekfac":
                note += f", 2nd pass + eig {t['ekfac_pass_s']:.1f} s"
            note += f", eig+solve {t['solve_s']:.1f} s"
            if (r.get("statistics_passes") or 1) > 1:
                note += f"; blocks streamed in {r['statistics_passes']} chunks"
        if r["method"] == "exact":
            note = f"{r['blocks']} block(s) x {r['cg_iterations']} CG iterations"
        if r.get("forward_passes"):
            t = r["timing"]
            note = (f"{r['forward_passes']} forward passes ({r['forward_passes'] / r['blocks']:.1f} per block), "
                    f"trust region {t['trust_region_s']:.1f} s")
            if t.get("gain_line_search_s"):
                note += f", line search {t['gain_line_search_s']:.1f} s"
            if "fisher_pass_s" in t:
                note += f"; stats pass {t['fisher_pass_s']:.1f} s"
        lines.append(f"| {r['method']} | {r['wall_s']:.1f} | {r['wall_s'] / base['wall_s']:.2f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / base['peak_bytes']:.2f} | {note} |")
    table = "\n".join(lines)
    doc = {"schema": "layercap.bench.scoring/v1", "model": args.model, "device": args.device, "dtype": args.dtype,
           "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
           "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "load_average": os.getloadavg(), "records": records, "table": table}
    atomic_write_json(out, doc)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), a model path, or mistral-7b-shaped (GPU)")
    parser.add_argument("--data", default=str(WIKITEXT), help="calibration text (default WikiText-2 test)")
    parser.add_argument("--nsamples", type=int, default=None, help="windows (default 8 on CPU, 128 for mistral-7b-shaped)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 256 on CPU, 2048 for mistral-7b-shaped)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--exact-blocks", type=int, default=2, help="exact: score only the first N blocks (0 = all)")
    parser.add_argument("--cg-iters", type=int, default=10, help="exact: CG iterations per block")
    parser.add_argument("--max-factor-gb", type=float, default=None,
                        help="kfac/ekfac statistics budget in GiB (default: all blocks at once on CPU, 60%% of free memory on CUDA)")
    parser.add_argument("-o", "--output", default=None, help="JSON record (default benchmarks/results/scoring-<model>.json)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    big = args.model == "mistral-7b-shaped"
    if big and not args.device.startswith("cuda"):
        print("mistral-7b-shaped needs a CUDA GPU (14.5 GiB of bfloat16 weights; kfac/ekfac stream their statistics in "
              "chunks that fit --max-factor-gb, by default 60% of the free memory); none is available here.", file=sys.stderr)
        return 2
    args.nsamples = args.nsamples or (128 if big else 8)
    args.seqlen = args.seqlen or (2048 if big else 256)
    if big and args.dtype == "float32":
        args.dtype = "bfloat16"

    if args.one:
        print(json.dumps(measure_one(args)))
        return 0

    forwarded = ["--model", args.model, "--data", args.data, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                 "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--device", args.device,
                 "--exact-blocks", str(args.exact_blocks), "--cg-iters", str(args.cg_iters)]
    if args.max_factor_gb is not None:
        forwarded += ["--max-factor-gb", str(args.max_factor_gb)]
    out = Path(args.output or REPO / "benchmarks" / "results" / f"scoring-{args.model}.json")
    records = []
    for name in ["plain", *args.methods.split(",")]:
        proc = subprocess.run([sys.executable, __file__, *forwarded, "--one", name], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: {records[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
        table = write_record(out, args, records)  # after every measurement: partial results survive
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
