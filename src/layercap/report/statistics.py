"""Statistics over seeds: mean and sample standard deviation, per-rule summaries, paired
differences, and the allocation benchmark's separation check.

Cells are grouped by (task, adapter); a cell has ``task``, ``adapter``, ``rule``, ``seed`` and the
metrics ``acc`` (higher is better) and ``nll`` (nats/token, lower is better), either may be None.
"""

from __future__ import annotations

import math

METRICS = ("acc", "nll")
LOWER_IS_BETTER = {"acc": False, "nll": True}


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(xs)
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, s


def groups_of(cells) -> list[tuple[str, str]]:
    """The (task, adapter) groups in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for c in cells:
        seen.setdefault((c.task, getattr(c, "adapter", "")), None)
    return list(seen)


def _values(cells, task, adapter, rule, metric) -> dict[int, float]:
    return {c.seed: getattr(c, metric) for c in cells
            if c.task == task and getattr(c, "adapter", "") == adapter and c.rule == rule and getattr(c, metric) is not None}


def summarise(cells, rules: list[str]) -> list[dict]:
    """Per (task, adapter, rule): n_seeds and mean +- std over seeds of acc, acc_norm, nll, final loss."""
    rows = []
    for task, adapter in groups_of(cells):
        for rule in rules:
            sel = [c for c in cells if c.task == task and getattr(c, "adapter", "") == adapter and c.rule == rule]
            if not sel:
                continue
            row = {"task": task, "adapter": adapter, "rule": rule, "n_seeds": len(sel)}
            for key, attr in (("acc", "acc"), ("acc_norm", "acc_norm"), ("nll", "nll"), ("final_loss", "final_lm_loss")):
                vals = [getattr(c, attr) for c in sel if getattr(c, attr, None) is not None]
                if vals:
                    row[f"{key}_mean"], row[f"{key}_std"] = mean_std(vals)
            rows.append(row)
    return rows


def paired_differences(cells, rules: list[str], metrics=METRICS) -> list[dict]:
    """For each mdl rule vs each other rule, (task, adapter) and metric: mean and standard error
    of metric(mdl) - metric(other) over seeds (same seed = same data order and adapter init);
    ``better``: the difference is in the metric's good direction; ``beyond_2se``: |mean| > 2 se."""
    out = []
    for task, adapter in groups_of(cells):
        for metric in metrics:
            for mdl in [r for r in rules if r.startswith("mdl")]:
                mine = _values(cells, task, adapter, mdl, metric)
                for other in [r for r in rules if r != mdl]:
                    theirs = _values(cells, task, adapter, other, metric)
                    diffs = [mine[s] - theirs[s] for s in sorted(mine) if s in theirs]
                    if not diffs:
                        continue
                    m, sd = mean_std(diffs)
                    se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else None  # undefined for one seed
                    out.append({"mdl": mdl, "other": other, "task": task, "adapter": adapter, "metric": metric,
                                "n": len(diffs), "diff_mean": m, "diff_se": se,
                                "better": bool(m < 0) if LOWER_IS_BETTER[metric] else bool(m > 0),
                                "beyond_2se": bool(len(diffs) > 1 and abs(m) > 2 * se)})
    return out


def separation(cells, bad: str, reference: str = "uniform", metric: str = "nll", factor: float = 3.0) -> list[dict]:
    """Does the benchmark tell a bad allocation from ``reference``? Per (task, adapter): the gap
    mean(bad) - mean(reference) in the metric's bad direction, against ``factor`` x the larger of
    the two rules' seed standard deviations (``separates``), and against ``factor`` x the standard
    deviation of the same-seed differences (``separates_paired``: the seed's shared part, its data
    order, cancels)."""
    out = []
    for task, adapter in groups_of(cells):
        b = _values(cells, task, adapter, bad, metric)
        r = _values(cells, task, adapter, reference, metric)
        if not b or not r:
            continue
        (mb, sb), (mr, sr) = mean_std(list(b.values())), mean_std(list(r.values()))
        sign = 1.0 if LOWER_IS_BETTER[metric] else -1.0
        gap = sign * (mb - mr)
        noise = max(sb, sr)
        diffs = [sign * (b[s] - r[s]) for s in sorted(b) if s in r]
        paired_mean, paired_std = mean_std(diffs) if diffs else (float("nan"), float("nan"))
        enough = len(b) > 1 and len(r) > 1
        out.append({"task": task, "adapter": adapter, "metric": metric, "bad": bad, "reference": reference,
                    "gap": gap, "seed_std": noise, "gap_over_std": gap / noise if noise > 0 else None,
                    "separates": bool(enough and gap > factor * noise),
                    "paired_gap": paired_mean, "paired_std": paired_std,
                    "separates_paired": bool(len(diffs) > 1 and paired_mean > factor * paired_std)})
    return out
