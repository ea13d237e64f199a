"""Damage curves on SmolLM2 and the mdl:damage rule against uniform (issue 13, evidence).

(a) the damage pass (Wanda, 9 levels) on calibration windows drawn from the FIRST HALF of the
    WikiText-2 test file: wall time and cost in forward-pass equivalents; the table is saved.
(b) Wanda at each --sparsity: perplexity of uniform vs mdl:damage ratios (sequential Wanda on
    calibration windows from the first half of WikiText), evaluated on the LAST --eval-tokens
    tokens of WikiText (disjoint from calibration) and the first --eval-tokens of
    TinyShakespeare, 512-token non-overlapping windows.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/damage.py \
        --damage-nsamples 16 --damage-seqlen 256 --json results/damage/benchmark.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "corpora"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/corpora")
WIKI = DATA / "wikitext-2-raw" / "wiki.test.raw"
SHAKES = DATA / "tinyshakespeare" / "input.txt"


def windows_from(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int):
    from layercap.data.calibration import CalibrationSet
    from layercap.io import sha256_bytes

    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    w = torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
    return CalibrationSet(w, sha256_bytes(w.numpy().tobytes()), f"{WIKI} (first half)", seed)


@torch.inference_mode()
def ppl(model, tokens: torch.Tensor, seqlen: int = 512, batch: int = 4) -> float:
    from layercap.evaluate.perplexity import token_nll

    n = tokens.numel() // seqlen * seqlen
    rows = tokens[:n].reshape(-1, seqlen)
    total = count = 0.0
    for s in range(0, rows.shape[0], batch):
        for nll, c in token_nll(model, rows[s : s + batch], [1] * rows[s : s + batch].shape[0]):
            total, count = total + nll, count + c
    return math.exp(total / count)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--damage-nsamples", type=int, default=16)
    ap.add_argument("--damage-seqlen", type=int, default=256)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--calib-nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--table", default=str(ROOT / "results" / "damage" / "smollm2-wanda.json"))
    ap.add_argument("--reuse-table", action="store_true", help="skip (a) when --table exists")
    ap.add_argument("--obd", nargs="*", default=[], help="OBD estimates (diag, kfac) added to the table, with agreement")
    ap.add_argument("--rules", nargs="+", default=["uniform", "mdl:damage"], help="uniform, mdl:damage, mdl:obd, owl")
    ap.add_argument("--skip-eval", action="store_true", help="only (a)")
    ap.add_argument("--generations", type=int, default=12, help="evopress / refine generations")
    ap.add_argument("--search-sparsity", type=float, nargs="*", default=[0.7], help="sparsities at which evopress/refine run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from layercap.apply.prune import prune_model
    from layercap.apply.prune.damage import curvature_stats, damage_curves
    from layercap.data.calibration import read_text, tokenize_text
    from layercap.models import find_blocks, load_model
    from layercap.programs.damage import DamageTable, ratios_from_damage

    t0 = time.perf_counter()
    model, tok = load_model("smollm2")
    print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    wiki = tokenize_text(tok, read_text(WIKI))
    half = wiki[: wiki.numel() // 2]
    eval_texts = {"wikitext_tail": wiki[-args.eval_tokens:], "tinyshakespeare": tokenize_text(tok, read_text(SHAKES))[: args.eval_tokens]}
    assert wiki.numel() - args.eval_tokens > half.numel(), "evaluation tokens overlap the calibration half"
    blocks = find_blocks(model)
    out: dict = {"threads": args.threads, "eval_tokens": args.eval_tokens, "wiki_tokens": int(wiki.numel())}

    table_path = Path(args.table)
    if args.reuse_table and table_path.is_file():
        table = DamageTable.load(table_path)
    else:
        dcal = windows_from(half, args.damage_nsamples, args.damage_seqlen, seed=0)
        curv = curvature_stats(model, dcal, args.obd) if args.obd else None
        table = damage_curves(model, dcal, args.levels, "wanda", blocks=blocks, batch_size=4, curvature=curv,
                              checkpoint=table_path.with_name(table_path.name + ".partial"), model_id="smollm2")
        table.metadata["command"] = " ".join(sys.argv)
        table.save(table_path)
        table_path.with_name(table_path.name + ".partial").unlink(missing_ok=True)
    if args.obd and not table.obd:
        # OBD on the same calibration windows as the measured table, then Spearman agreement
        from layercap.programs.damage import spearman

        dcal = windows_from(half, table.calibration["nsamples"], table.calibration["seqlen"], seed=0)
        assert dcal.sha256 == table.calibration["sha256"]
        curv = curvature_stats(model, dcal, args.obd)
        est = damage_curves(model, dcal, table.levels, table.method, blocks=blocks, curvature=curv, measure=False,
                            model_id=table.model)
        table.obd = est.obd
        table.agreement = {k: [spearman([r[j] for r in est.obd[k]], [r[j] for r in table.kl]) for j in range(len(table.levels))]
                           for k in est.obd}
        table.cost["curvature_s"] = curv.wall_s
        table.cost["obd_s"] = est.cost["wall_s"]
        table.save(table_path)
    out["damage_cost"] = table.cost
    out["agreement"] = table.agreement
    print("damage cost:", json.dumps(table.cost), flush=True)

    if args.skip_eval:
        if args.json:
            from layercap.io import atomic_write_json

            atomic_write_json(args.json, out)
        print("agreement:", json.dumps(table.agreement))
        return 0
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pcal = windows_from(half, args.calib_nsamples, args.calib_seqlen, seed=1)
    t = time.perf_counter()
    out["dense"] = {name: ppl(model, toks) for name, toks in eval_texts.items()}
    out["eval_s"] = time.perf_counter() - t
    print("dense", out["dense"], f"({out['eval_s']:.0f} s)", flush=True)
    names, params = [b.name for b in blocks], [b.num_prunable for b in blocks]
    from layercap.programs.records import PruningRatios

    runs = []
    for s in args.sparsity:
        for rule in args.rules:
            if rule == "uniform":
                ratios = PruningRatios.uniform(names, params, s)
            elif rule == "mdl:damage":
                ratios = ratios_from_damage(table, s)
            elif rule == "mdl:obd":
                ratios = ratios_from_damage(table, s, source="obd-diag")
            elif rule == "owl":
                from layercap.programs.rules import ratios_by_rule
                from layercap.scores import score_model

                model.load_state_dict(dense)
                t = time.perf_counter()
                owl_scores = score_model(model, "owl", pcal)
                ratios = ratios_by_rule("owl", owl_scores, s, max_ratio=0.95)
                out.setdefault("owl_score_s", time.perf_counter() - t)
            elif rule in ("atp", "evopress", "mdl:damage+refine"):
                from layercap.apply.prune.search import KLFitness, atp_search, evolve_ratios

                if rule != "atp" and s not in args.search_sparsity:
                    continue
                # searches score on the damage table's calibration windows (never the evaluation text)
                scal = windows_from(half, table.calibration["nsamples"], table.calibration["seqlen"], seed=0)
                model.load_state_dict(dense)
                t = time.perf_counter()
                if rule == "atp":
                    with KLFitness(model, scal, "wanda", blocks=blocks) as fit:
                        ratios = atp_search(fit, names, params, s)
                else:
                    start = PruningRatios.uniform(names, params, s) if rule == "evopress" else ratios_from_damage(table, s)
                    ratios = evolve_ratios(model, scal, start, method="wanda", step=0.02, screen=2, progress=False,
                                           generations=args.generations, offspring=8, confirm=2, seed=0)
                search_s = time.perf_counter() - t
                print(f"{rule} search {search_s:.0f} s", json.dumps({k: v for k, v in ratios.metadata.items()
                                                                     if k in ("fitness", "start_fitness", "step", "curve", "evaluations")}), flush=True)
            else:
                raise SystemExit(f"unknown rule {rule}")
            model.load_state_dict(dense)
            t = time.perf_counter()
            prune_model(model, ratios.ratios(), "wanda", pcal, progress=False, blocks=blocks)
            prune_s = time.perf_counter() - t
            row = {"rule": rule, "sparsity": s, "achieved": ratios.achieved, "prune_s": prune_s,
                   "search_s": search_s if rule in ("atp", "evopress", "mdl:damage+refine") else None,
                   "search": {k: v for k, v in ratios.metadata.items() if k in ("fitness", "start_fitness", "step", "curve", "evaluations", "search")},
                   "ratios": [round(r, 4) for r in ratios.rho.tolist()],
                   "ppl": {name: ppl(model, toks) for name, toks in eval_texts.items()}}
            runs.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ratios"}), flush=True)
    model.load_state_dict(dense)
    out["runs"] = runs
    out["wall_s"] = time.perf_counter() - t0
    if args.json:
        from layercap.io import atomic_write_json

        atomic_write_json(args.json, out)
    print(f"total {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
