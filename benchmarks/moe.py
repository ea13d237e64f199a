"""LoRA-MoE layer cost: forward+backward time and memory vs a single LoRA and a Python loop.

For each number of experts n (rank r each, top-k routing) it times, on the same input:

* ``moe-dense``   -- LoraMoELinear, kernel "dense" (all experts, two matmuls, gated);
* ``moe-grouped`` -- LoraMoELinear, kernel "grouped" (only selected experts, padded bmm);
* ``moe-loop``    -- LoraMoELinear.forward_loop (Python loop over experts; the reference);
* ``lora-nr``     -- one LoRA of rank n*r (same total adapter parameters as the MoE);
* ``lora-kr``     -- one LoRA of rank k*r (same active rank per token).

Time: minimum over ``--reps`` forward+backward passes after warm-up (ms): CPU time of the
process on CPU (the work done, robust to other jobs sharing the cores), wall time on CUDA. Memory: bytes of the
tensors autograd saves for backward (``saved_tensors_hooks``; exact and device independent),
plus ``torch.cuda.max_memory_allocated`` on CUDA. Runs on CUDA when available, else CPU.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe.py            # SmolLM2 MLP shape
    .venv/bin/python benchmarks/moe.py --tokens 256 --experts 2 4 --reps 3   # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from layercap.apply.lora_moe import LoraMoELinear  # noqa: E402


class LoRA(nn.Module):
    """Plain LoRA on a frozen Linear: y = base(x) + s B A x."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype) * 0.01)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype) * 0.01)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scaling * ((x @ self.A.t()) @ self.B.t())


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().square().mean().backward()
    return total


def time_fb(fn, reps: int, device) -> tuple[float, float]:
    """(wall ms, CPU ms) of one forward+backward: minimum over ``reps``. CPU time (process time,
    all threads) is what the work costs when the machine is shared; on CUDA use the wall time."""

    def once():
        out = fn()
        out.float().square().mean().backward()

    for _ in range(2):
        once()
    walls, cpus = [], []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return 1000 * min(walls), 1000 * min(cpus)


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    rows = []
    for n in args.experts:
        torch.manual_seed(0)
        base = nn.Linear(args.d_in, args.d_out, device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype)
        variants = {}
        for kernel in ("dense", "grouped"):
            layer = LoraMoELinear(base, n, args.rank, 2.0 * args.rank, args.top_k, kernel=kernel)
            with torch.no_grad():
                layer.lora_B.normal_(std=0.01)
                layer.router.weight.normal_(std=0.1)
            variants[f"moe-{kernel}"] = (layer, layer.forward)
        loop_layer = variants["moe-dense"][0]
        variants["moe-loop"] = (loop_layer, loop_layer.forward_loop)
        variants["lora-nr"] = (LoRA(base, n * args.rank, 2.0 * n * args.rank), None)
        variants["lora-kr"] = (LoRA(base, min(args.top_k, n) * args.rank, 2.0 * args.rank), None)
        results = {}
        for name, (module, fwd) in variants.items():
            fwd = fwd or module.forward
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            mem = saved_bytes(lambda: fwd(x))
            wall, cpu = time_fb(lambda: fwd(x), args.reps, device)
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            ms = wall if device.type == "cuda" else cpu
            results[name] = ms
            rows.append({"experts": n, "variant": name, "ms": ms, "wall_ms": wall, "cpu_ms": cpu, "saved_mb": mem / 2**20,
                         "cuda_peak_mb": None if peak is None else peak / 2**20})
        for r in rows[-len(variants):]:
            r["vs_lora_nr"] = r["ms"] / results["lora-nr"]
            r["vs_loop"] = r["ms"] / results["moe-loop"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per batch (batch x seq); default 1024")
    p.add_argument("--d-in", type=int, default=576, help="input width (SmolLM2 hidden 576)")
    p.add_argument("--d-out", type=int, default=1536, help="output width (SmolLM2 FFN 1536)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = run(args)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {device}, tokens {args.tokens}, {args.d_in}->{args.d_out}, rank {args.rank}, top-k {args.top_k}, {args.dtype}")
    clock = "wall" if torch.cuda.is_available() else "CPU"
    print(f"{'n':>3} {'variant':<12} {clock + ' ms':>9} {'wall ms':>9} {'saved MiB':>10} {'x lora-nr':>10} {'x loop':>7}")
    for r in rows:
        print(f"{r['experts']:>3} {r['variant']:<12} {r['ms']:>9.2f} {r['wall_ms']:>9.2f} {r['saved_mb']:>10.2f} "
              f"{r['vs_lora_nr']:>10.2f} {r['vs_loop']:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
