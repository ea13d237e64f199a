"""Pruner cost: wall time and peak memory of magnitude / Wanda / SparseGPT on a whole model.

Each measurement runs in a fresh subprocess (so peak memory is that run's own):

* ``forward`` -- the reference: load the model, one plain forward over the same calibration
  tokens (micro-batched like the pruners), no pruning;
* ``magnitude`` / ``wanda`` / ``sparsegpt`` -- ``prune_model`` at a uniform ``--sparsity``.

Reported: time of the forward / of ``prune_model`` (s), its ratio to the forward, peak memory
(CPU: peak RSS of the subprocess, ``ru_maxrss``; CUDA: ``torch.cuda.max_memory_allocated``),
and the achieved sparsity. On CPU the model stays in memory whole; with ``--device cuda`` the
model stays on CPU and ``prune_model`` moves one block at a time to the GPU, so the GPU peak is
one block + its statistics + the calibration hidden states.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/pruning.py                       # SmolLM2, CPU
    .venv/bin/python benchmarks/pruning.py --model mistral-7b-shaped --device cuda  # GPU only

``mistral-7b-shaped``: a random-init Mistral with 7B's shape (32 blocks, hidden 4096, FFN 14336,
32 heads / 8 KV heads, vocab 32000), built locally from a config in bfloat16 (no download);
defaults to 128 x 2048 random-token windows, as in the SparseGPT / Wanda papers. Needs a CUDA
GPU with about 24 GB free and about 20 GB of CPU RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WIKITEXT = ROOT.parent / "shared" / "data" / "corpora" / "wikitext-2-raw" / "wiki.test.raw"
KINDS = ("forward", "magnitude", "wanda", "sparsegpt")


def mistral_7b_shaped():
    """Random-init Mistral-7B-shaped model in bfloat16 on CPU (weights small normal, as HF init)."""
    import torch
    import transformers as tf

    config = tf.MistralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, sliding_window=None,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def worker(args) -> dict:
    """One measurement in this process; returns the result row."""
    import torch

    from layercap.apply.prune import prune_model
    from layercap.data.calibration import CalibrationSet, calibration_set
    from layercap.models import find_blocks, load_model

    cuda = args.device.startswith("cuda")
    if args.model == "mistral-7b-shaped":
        model = mistral_7b_shaped()
        ids = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
        calib = CalibrationSet(ids, "random", "random tokens", 0)
    else:
        model, tok = load_model(args.model, dtype=args.dtype)
        calib = calibration_set(tok, args.data, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    blocks = find_blocks(model)
    row = {"kind": args.worker, "model": args.model, "device": args.device, "tokens": calib.num_tokens,
           "nsamples": args.nsamples, "seqlen": args.seqlen, "sparsity": args.sparsity}
    t0 = time.perf_counter()
    if args.worker == "forward":
        if cuda:  # the reference on GPU: the same one-block-at-a-time residency as the pruners
            from layercap.apply.prune import capture_block_calls

            inputs, calls = capture_block_calls(model, blocks, list(calib.batches(args.batch_size)), torch.device(args.device))
            with torch.no_grad():
                for k, b in enumerate(blocks):
                    b.module.to(args.device)
                    inputs = [c.run(b.module, x) for x, c in zip(inputs, calls[k])]
                    b.module.to("cpu")
            torch.cuda.synchronize()
        else:
            with torch.no_grad():
                for batch in calib.batches(args.batch_size):
                    model(input_ids=batch, use_cache=False)
        row["achieved"] = 0.0
    else:
        report = prune_model(model, {b.name: args.sparsity for b in blocks}, args.worker,
                             calib if args.worker != "magnitude" else None, device=args.device if cuda else None,
                             batch_size=args.batch_size, progress=False)
        if cuda:
            torch.cuda.synchronize()
        row["achieved"] = report.achieved
    row["seconds"] = time.perf_counter() - t0
    if cuda:
        row["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        row["memory"] = "cuda max_memory_allocated"
    else:
        row["peak_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
        row["memory"] = "peak RSS"
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (default), a model directory, or mistral-7b-shaped")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda for mistral-7b-shaped, else cpu)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--data", default=str(WIKITEXT), help="calibration text (real models)")
    p.add_argument("--nsamples", type=int, default=None, help="windows (default 32 on SmolLM2, 128 on 7B)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 256 on SmolLM2, 2048 on 7B)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    big = args.model == "mistral-7b-shaped"
    args.device = args.device or ("cuda" if big else "cpu")
    args.nsamples = args.nsamples or (128 if big else 32)
    args.seqlen = args.seqlen or (2048 if big else 256)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"--device {args.device}: CUDA is not available on this machine; this path needs a GPU.", file=sys.stderr)
            return 2
    rows = []
    load0 = os.getloadavg()[0]
    base = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--dtype", args.dtype,
            "--data", args.data, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--batch-size", str(args.batch_size), "--sparsity", str(args.sparsity)]
    for kind in args.kinds:
        out = subprocess.run(base + ["--worker", kind], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{kind}: {rows[-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    ref = next((r["seconds"] for r in rows if r["kind"] == "forward"), None)
    print(f"model {args.model}, device {args.device}, {rows[0]['tokens']} calibration tokens "
          f"({args.nsamples} x {args.seqlen}), sparsity {args.sparsity}, machine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average before/after {load0:.1f}/{os.getloadavg()[0]:.1f}")
    print("| kind | time (s) | x forward | peak memory (GiB) | achieved sparsity |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['seconds'] / ref:.1f}" if ref else "-"
        print(f"| {r['kind']} | {r['seconds']:.2f} | {ratio} | {r['peak_bytes'] / 2**30:.2f} | {r['achieved']:.4f} |")
    if args.json:
        from layercap.io import atomic_write_json

        atomic_write_json(args.json, {"schema": "layercap.bench-pruning/v1", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
