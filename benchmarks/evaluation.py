"""Zero-shot scoring speed: shared-context KV caching vs independent requests, and perplexity.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/evaluation.py --limit 20 --json /tmp/bench_eval.json

Scores ARC-Easy items (seeded subset) with SmolLM2-135M both ways (the accuracies must agree),
then WikiText-2 perplexity on ``--ppl-tokens`` tokens. Runs on CUDA when available
(``--device auto``), else CPU. Prints a Markdown table; ``--json`` keeps the raw figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default=str(DATA / "tasks" / "ARC-Easy"))
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from layercap.data.tasks import load_task
    from layercap.evaluate import evaluate_task, perplexity
    from layercap.models import load_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tok = load_model(args.model, device=device)
    task = load_task(args.task, limit=args.limit, seed=0)
    rows = []
    for share in (True, False):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = evaluate_task(model, tok, task, batch_size=args.batch_size, progress=False, share_context=share)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append({"what": f"{task.name} x{task.__len__()} share_context={share}", "seconds": time.perf_counter() - t0, "acc": r.acc, "acc_norm": r.acc_norm})
    t0 = time.perf_counter()
    p = perplexity(model, tok, DATA / "corpora" / "wikitext-2-raw" / "wiki.test.raw", max_tokens=args.ppl_tokens, batch_size=4, progress=False)
    rows.append({"what": f"wikitext ppl {p.tokens} tokens", "seconds": time.perf_counter() - t0, "ppl": p.ppl})
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    print("| what | seconds | result |\n| --- | ---: | --- |")
    for r in rows:
        res = f"ppl {r['ppl']:.3f}" if "ppl" in r else f"acc {r['acc']:.3f}, acc_norm {r['acc_norm']:.3f}"
        print(f"| {r['what']} | {r['seconds']:.1f} | {res} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
