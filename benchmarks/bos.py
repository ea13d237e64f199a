"""Perplexity with and without a BOS token (issue 15): does a model need one, and what changes.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bos.py --json benchmarks/results/bos_smollm2.json

Loads the model, prints what ``--bos auto`` decides for it (and why), then the WikiText-2
perplexity of the first ``--tokens`` tokens in ``--seqlen`` windows under auto, never, always
(the tokenizer's BOS) and, optionally, another token id at position 0 (``--also-id``). The scored
tokens are the same in every row (the BOS replaces the first, never-scored position of a window).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "corpora" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    from layercap.data.bos import BosChoice, resolve_bos, tokenizer_adds_bos
    from layercap.evaluate.perplexity import perplexity
    from layercap.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=str(WIKI))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--also-id", type=int, default=0, help="another token id to try at position 0 (-1: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - t0
    auto = resolve_bos("auto", tok, model)
    info = {"model": args.model, "model_type": model.config.model_type, "tokenizer": type(tok).__name__,
            "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id, "tokenizer_adds_bos": tokenizer_adds_bos(tok),
            "auto": auto.to_dict(), "load_s": round(load_s, 1), "tokens": args.tokens, "seqlen": args.seqlen, "rows": []}
    print(f"{args.model}: model_type {info['model_type']}, bos {tok.bos_token!r} ({tok.bos_token_id}), "
          f"tokenizer adds BOS: {info['tokenizer_adds_bos']}; auto -> {auto.add} ({auto.reason})")
    policies: list = ["auto", "never", "always"]
    if args.also_id >= 0 and args.also_id != tok.bos_token_id:
        policies.append(BosChoice("always", True, args.also_id, f"token {tok.convert_ids_to_tokens(args.also_id)!r}"))
    print("| BOS | perplexity | NLL (nats/token) | scored tokens | wall s |\n|---|---:|---:|---:|---:|")
    for pol in policies:
        t = time.perf_counter()
        r = perplexity(model, tok, args.text, seqlen=args.seqlen, max_tokens=args.tokens, batch_size=1, progress=False, bos=pol)
        wall = time.perf_counter() - t
        label = pol if isinstance(pol, str) else pol.reason
        info["rows"].append({"bos": label, "add": r.bos["add"], "token_id": r.bos["token_id"], "ppl": r.ppl,
                             "nll_per_token": r.nll_per_token, "tokens": r.tokens, "wall_s": round(wall, 1)})
        print(f"| {label} | {r.ppl:.3f} | {r.nll_per_token:.4f} | {r.tokens} | {wall:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
