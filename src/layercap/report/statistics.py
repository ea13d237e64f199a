"""Statistics over seeds: mean and sample standard deviation, per-rule summaries, paired differences."""

from __future__ import annotations

import math


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(xs)
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, s


def summarise(cells, rules: list[str], tasks: list[str]) -> list[dict]:
    """Per (task, rule), and per rule averaged over tasks (task \"mean\"): mean +- std over seeds."""
    rows = []
    for task in tasks + ["mean"]:
        for rule in rules:
            if task == "mean":
                # per seed, the mean over tasks; then mean/std over seeds
                seeds = sorted({c.seed for c in cells if c.rule == rule})
                per_seed = []
                for s in seeds:
                    vals = [c.acc for c in cells if c.rule == rule and c.seed == s and c.acc is not None]
                    if len(vals) == len(tasks):
                        per_seed.append(sum(vals) / len(vals))
                accs, norms, losses = per_seed, [], []
            else:
                sel = [c for c in cells if c.rule == rule and c.task == task and c.acc is not None]
                accs = [c.acc for c in sel]
                norms = [c.acc_norm for c in sel]
                losses = [c.final_lm_loss for c in sel if c.final_lm_loss is not None]
            if not accs:
                continue
            m, s = mean_std(accs)
            row = {"task": task, "rule": rule, "n_seeds": len(accs), "acc_mean": m, "acc_std": s}
            if norms:
                row["acc_norm_mean"], row["acc_norm_std"] = mean_std(norms)
            if losses:
                row["final_loss_mean"], row["final_loss_std"] = mean_std(losses)
            rows.append(row)
    return rows


def paired_differences(cells, rules: list[str], tasks: list[str]) -> list[dict]:
    """For each mdl rule vs each other rule and task: mean and std error of acc(mdl) - acc(other)
    over seeds (same seed = same data order and adapter init), and whether |mean| > 2 se."""
    out = []
    acc = {(c.task, c.rule, c.seed): c.acc for c in cells if c.acc is not None}
    for mdl in [r for r in rules if r.startswith("mdl")]:
        for other in [r for r in rules if r != mdl]:
            for task in tasks:
                diffs = [acc[(task, mdl, s)] - acc[(task, other, s)] for (t, r, s) in acc
                         if t == task and r == mdl and (task, other, s) in acc]
                if not diffs:
                    continue
                m, sd = mean_std(diffs)
                se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else None  # undefined for one seed
                out.append({"mdl": mdl, "other": other, "task": task, "n": len(diffs), "diff_mean": m,
                            "diff_se": se, "beyond_2se": bool(len(diffs) > 1 and abs(m) > 2 * se)})
    return out
