"""Build the report of a run directory: ``report.md`` (+ ``report_files/*.png``) and ``report.html``.

Everything shown is read back from the run's artefacts (scores, allocations, ratios, pruned
summaries, evaluations, ``stages.json``, ``config.yaml``), never recomputed, so the report's
numbers are exactly those of the files beside it. :func:`collect` gathers them into a
:class:`RunData`; :func:`report_blocks` lays them out; :func:`write_report` renders and writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from layercap.errors import LayercapError
from layercap.io import atomic_write_bytes, atomic_write_text
from layercap.report.document import Code, Details, Figure, Heading, Para, Table, render_html, render_markdown
from layercap.report.plots import plot_heatmap, plot_bars, plot_lines

FIGURE_DIR = "report_files"


# ---- number formats (the tests check the report against the artefacts with these) --------------
def fmt_ppl(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def fmt_acc(x: float | None) -> str:
    """Accuracy in percent, one decimal."""
    return "n/a" if x is None else f"{100 * x:.1f}"


def fmt_float(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def fmt_seconds(s: float | None) -> str:
    return "n/a" if s is None else f"{s:.1f}"


@dataclass
class RunData:
    """The artefacts of one run directory, loaded (see module docstring)."""

    run_dir: Path
    config: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    scores: dict[str, Any] = field(default_factory=dict)       # method -> LayerScores
    allocations: dict[str, Any] = field(default_factory=dict)  # rule -> Allocation
    ratios: dict[str, Any] = field(default_factory=dict)       # rule -> PruningRatios
    pruned: dict[str, dict] = field(default_factory=dict)      # rule -> pruned/<rule>.json
    damage: dict[str, Any] = field(default_factory=dict)      # kind (obd, damage) -> DamageTable
    utility: Any = None                                       # UtilityTable (mdl:measured) or None
    evals: dict[str, dict] = field(default_factory=dict)       # variant -> eval/<variant>.json
    stages: dict[str, dict] = field(default_factory=dict)      # stages.json "stages"
    versions: dict[str, str] = field(default_factory=dict)


def _json(path: Path) -> Any:
    from layercap.io import read_json

    return read_json(path, "run artefact", "Rerun `layercap run` to recreate it.")


def collect(run_dir: str | Path, versions: dict[str, str] | None = None) -> RunData:
    """Load every artefact of ``run_dir`` that the config says should exist (missing ones are errors)."""
    from layercap.programs.records import Allocation, PruningRatios
    from layercap.programs.rules import rule_file
    from layercap.scorefile import LayerScores

    run_dir = Path(run_dir)
    for required in ("config.yaml", "model.json", "data/data.json"):
        if not (run_dir / required).is_file():
            raise LayercapError(f"{run_dir}: {required} is missing; run `layercap run -o {run_dir}` to (re)create the run.")
    from layercap.io import read_yaml

    config = read_yaml(run_dir / "config.yaml", "run config", "Rerun `layercap run` to recreate it.")
    if not isinstance(config, dict):
        raise LayercapError(f"{run_dir / 'config.yaml'}: expected a YAML mapping, got {type(config).__name__}.")
    run = RunData(run_dir, config, _json(run_dir / "model.json"), _json(run_dir / "data/data.json"), versions=versions or {})
    for method in config["scoring"]["methods"]:
        run.scores[method] = LayerScores.load(run_dir / "scores" / f"{method}.json")
    for rule in config["allocation"]["rules"]:
        run.allocations[rule] = Allocation.load(run_dir / "allocation" / f"{rule_file(rule)}.json")
    for rule in config["pruning"]["rules"]:
        run.ratios[rule] = PruningRatios.load(run_dir / "ratios" / f"{rule_file(rule)}.json")
    for rule in config["pruning"]["apply"]:
        run.pruned[rule] = _json(run_dir / "pruned" / f"{rule_file(rule)}.json")
    variants = (["dense"] if config["evaluation"]["dense"] else []) + list(config["pruning"]["apply"])
    for variant in variants:
        run.evals[variant] = _json(run_dir / "eval" / f"{rule_file(variant)}.json")
    from layercap.programs.damage import DamageTable

    from layercap.programs.rules import LINEAR_SOURCES

    for kind in ("obd", "damage") + LINEAR_SOURCES:
        if f"mdl:{kind}" in config["pruning"]["rules"]:
            run.damage[kind] = DamageTable.load(run_dir / "damage" / f"{kind}.json")
    if "mdl:measured" in config["allocation"]["rules"]:
        from layercap.programs.utility import UtilityTable

        run.utility = UtilityTable.load(run_dir / "utility" / "utility.json")
    if (run_dir / "stages.json").is_file():
        run.stages = _json(run_dir / "stages.json").get("stages", {})
    return run


def winner(run: RunData) -> tuple[str, str] | None:
    """(variant, sentence): the pruned variant with the lowest perplexity on the first text (ties
    broken by mean accuracy), and how it compares with the other pruned variants."""
    pruned = {v: e for v, e in run.evals.items() if v != "dense" and e.get("perplexity")}
    if not pruned:
        return None
    corpus = sorted(next(iter(pruned.values()))["perplexity"])[0]
    best = min(pruned, key=lambda v: (pruned[v]["perplexity"][corpus], -(pruned[v].get("mean_accuracy") or 0.0)))
    others = ", ".join(f"`{v}` {fmt_ppl(e['perplexity'][corpus])}" for v, e in pruned.items() if v != best)
    text = (f"**Best rule: `{best}`**, perplexity {fmt_ppl(pruned[best]['perplexity'][corpus])} on `{corpus}`"
            + (f" (others: {others})" if others else "") + ", all at the same sparsity with the same pruner.")
    kl = {v: run.pruned.get(v, {}).get("calibration", {}).get("kl") for v in pruned}
    kl = {v: x for v, x in kl.items() if x is not None}
    if kl:
        pick = min(kl, key=kl.get)
        text += (f" Chosen without evaluation data, by the pruned model's KL to the dense one on the calibration "
                 f"windows, the pick is `{pick}` ({', '.join(f'`{v}` {x:.4f}' for v, x in kl.items())} nats/token)"
                 + (", the same rule." if pick == best else
                    f", not `{best}`: the calibration KL and `{corpus}` disagree."))
    return best, text


def spearman_matrix(scores: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """Spearman rank correlation between the per-block scores of every pair of methods."""
    from scipy.stats import spearmanr

    names = list(scores)
    k = len(names)
    mat = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            a, b = scores[names[i]].zeta2, scores[names[j]].zeta2
            rho = spearmanr(a, b).statistic if (np.ptp(a) > 0 and np.ptp(b) > 0) else float("nan")
            mat[i, j] = mat[j, i] = rho
    return names, mat


def results_rows(run: RunData) -> tuple[list[str], list[list[str]]]:
    """The results table: one row per evaluated variant (dense first), perplexities, accuracies, mean."""
    corpora = sorted({c for e in run.evals.values() for c in e.get("perplexity", {})})
    tasks = list(dict.fromkeys(t for e in run.evals.values() for t in e.get("accuracy", {})))
    above = any(ev.get("mean_accuracy_above_chance") is not None for ev in run.evals.values()) and len(tasks) > 1
    headers = ["variant", "sparsity"] + [f"ppl {c}" for c in corpora] + [f"acc {t} (%)" for t in tasks] \
        + ["mean acc (%)"] + (["mean above chance (%)"] if above else []) + ["Δ mean vs dense"]
    dense_mean = run.evals.get("dense", {}).get("mean_accuracy")
    rows = []
    for variant, ev in run.evals.items():
        sparsity = run.pruned.get(variant, {}).get("sparsity", 0.0 if variant == "dense" else None)
        mean = ev.get("mean_accuracy")
        delta = "" if (variant == "dense" or dense_mean is None or mean is None) else f"{100 * (mean - dense_mean):+.1f}"
        rows.append([variant, "n/a" if sparsity is None else f"{sparsity:.3f}"]
                    + [fmt_ppl(ev["perplexity"].get(c)) for c in corpora]
                    + [_acc_cell(ev, t) for t in tasks] + [fmt_acc(mean)]
                    + ([fmt_acc(ev.get("mean_accuracy_above_chance"))] if above else []) + [delta])
    return headers, rows


def _acc_cell(ev: dict, task: str) -> str:
    """Accuracy (%) ± its binomial standard error, which small item counts make large."""
    acc = ev["accuracy"].get(task)
    se = ((ev.get("result") or {}).get("tasks") or {}).get(task, {}).get("acc_stderr")
    return fmt_acc(acc) + ("" if acc is None or se is None else f" ± {100 * se:.1f}")


def report_blocks(run: RunData, title: str) -> list:
    cfg = run.config
    blocks: list = [Heading(title, 1)]
    k = len(run.model["blocks"])
    blocks.append(Para(
        f"Model `{run.model['spec']}` ({run.model['architecture']}, {run.model['num_params']:,} parameters, {k} blocks), "
        f"calibrated on {run.data['nsamples']} x {run.data['seqlen']} tokens of `{Path(run.data['source']).name}`. "
        f"Decisions use the **{cfg['allocation']['scores']}** scores (allocation) and the **{cfg['pruning']['scores']}** "
        f"scores (pruning); `mdl` is the curvature-weighted rule, the others are baselines on the same budget."
    ))

    # results first: that is what a reader wants
    if run.evals:
        headers, rows = results_rows(run)
        won = winner(run)
        blocks += [Heading("Results")] + ([Para(won[1])] if won else []) + [Table(headers, rows, caption=(
            f"{cfg['pruning']['method']} pruning at {cfg['pruning']['sparsity']:.0%} sparsity ({cfg['pruning']['structure']}); "
            f"perplexity on the first {cfg['evaluation']['ppl_tokens']} tokens; accuracy on the first "
            f"{cfg['evaluation']['limit'] or 'all'} items per task (zero-shot). Dense is the reference"
            + ("; 'above chance' averages the tasks where the dense model beats chance by more than two standard errors ("
               + (", ".join(run.evals["dense"].get("above_chance") or []) or "none") + ")." if "dense" in run.evals
               and len(run.evals["dense"].get("accuracy", {})) > 1 else ".")))]

    # scores
    blocks.append(Heading("Layer scores"))
    q = {m: s.q for m, s in run.scores.items()}
    blocks.append(Figure("scores", plot_lines(q, "q_k (normalised score)", "Normalised layer scores q_k per method",
                                              reference=1.0 / k, reference_label="uniform 1/K"),
                         caption="q_k = zeta_k^2 / sum_j zeta_j^2 per block, for each score source."))
    names, mat = spearman_matrix(run.scores)
    blocks.append(Table(["Spearman"] + names, [[a] + [f"{mat[i, j]:.2f}" for j in range(len(names))] for i, a in enumerate(names)],
                        caption="Spearman rank correlation of the per-block scores between methods."))

    # allocation
    if run.allocations:
        a_cfg = cfg["allocation"]
        blocks.append(Heading("Capacity allocation"))
        blocks.append(Figure("allocation", plot_bars({r: a.n for r, a in run.allocations.items()}, f"{a_cfg['unit']} per block",
                                                     f"Allocation of {a_cfg['budget']:g} {a_cfg['unit']}"),
                             caption=f"{a_cfg['unit']} per block by rule (budget {a_cfg['budget']:g}, at least {a_cfg['lower']:g} per block)."))
        rows = []
        for rule, a in run.allocations.items():
            rows.append([rule, f"{a.spent:g}", f"{a.n.min():g}", f"{a.n.max():g}", "n/a" if a.mu is None else fmt_float(a.mu),
                         "yes" if a.binds else "no", "" if a.gap is None else fmt_float(a.gap)])
        blocks.append(Table(["rule", "spent", "min", "max", "mu", "budget binds", "integer gap"], rows))
        if run.utility is not None:
            u = run.utility
            blocks.append(Figure("utility", plot_heatmap(u.values(), u.blocks, [str(n) for n in u.levels],
                                                         "Measured utility of adapting one block alone", "nats / token"),
                                 caption=f"`mdl:measured` reads these curves: the held-out NLL reduction when only that block "
                                         f"is adapted with {u.settings.get('steps')} Adam steps at each number of units "
                                         "(calibration windows, half adapted on, half measured)."))

    # pruning ratios, per block (a per-Linear rule's as the weighted mean of each block's Linears)
    per_block = {r: p.block_rho([b["name"] for b in run.model["blocks"]]) for r, p in run.ratios.items()}
    if run.ratios:
        p_cfg = cfg["pruning"]
        blocks.append(Heading("Pruning ratios"))
        measured = {r: np.array([l["sparsity"] for l in d["layers"]]) for r, d in run.pruned.items()}
        blocks.append(Figure("ratios", plot_bars(per_block, "ratio rho_k",
                                                 f"Per-block pruning ratios at {p_cfg['sparsity']:.0%} sparsity", markers=measured),
                             caption="Target ratio per block by rule; black ticks: sparsity measured in the pruned model."))
        rows = [[rule, f"{p.achieved:.4f}", f"{p.rho.min():.3f}", f"{p.rho.max():.3f}", str(p.clipped),
                 "; ".join(p.warnings) or "-"] for rule, p in run.ratios.items()]
        blocks.append(Table(["rule", "achieved", "min", "max", "clipped", "warnings"], rows))
        from layercap.programs.rules import DAMAGE_COLUMNS

        for kind, table in run.damage.items():
            source = DAMAGE_COLUMNS[kind]
            what = ("second-order (OBD, diagonal Fisher) estimate of the KL" if source == "obd-diag"
                    else "KL to the dense model, measured")
            blocks.append(Figure(f"damage-{kind}", plot_heatmap(table.values(source), table.blocks, table.levels,
                                                                f"Damage of pruning one {'Linear' if kind.endswith('-linear') else 'block'} alone ({table.method})",
                                                                "nats / token"),
                                 caption=f"`mdl:{kind}` reads these curves: {what} when only that block (or Linear) is pruned at "
                                         "each ratio (the rest dense); the program spreads the sparsity where it costs least."))

    # per-layer table
    blocks.append(Heading("Per-block decisions"))
    dec = cfg["allocation"]["scores"]
    headers = ["block", "params"] + [f"q {m}" for m in run.scores] + [f"{r} n" for r in run.allocations] + [f"{r} rho" for r in run.ratios]
    rows = []
    for i, b in enumerate(run.model["blocks"]):
        row = [b["name"], f"{b['params']:,}"] + [f"{s.q[i]:.4f}" for s in run.scores.values()]
        row += [f"{a.n[i]:g}" for a in run.allocations.values()] + [f"{rho[i]:.3f}" for rho in per_block.values()]
        rows.append(row)
    blocks.append(Details(f"Per-block table ({k} blocks; decision scores: {dec})", [Table(headers, rows)]))

    # provenance
    blocks.append(Heading("Settings and provenance"))
    prov = [["model", f"`{run.model['spec']}` → {run.model['source']}"],
            ["calibration", f"{run.data['source']} (file sha256 {run.data['source_sha256'][:16]}…)"],
            ["calibration windows sha256", run.data["sha256"]]]
    for name, s in run.scores.items():
        if s.metadata.get("data_sha256"):
            prov.append([f"scores/{name}.json data sha256", s.metadata["data_sha256"]])
            break
    prov += [[k_, v] for k_, v in run.versions.items()]
    blocks.append(Table(["item", "value"], prov, align_right=False))
    if run.stages:
        rows = [[name, fmt_seconds(rec.get("wall_time_s")), fmt_seconds(rec.get("cpu_time_s")), fmt_bytes(rec.get("peak_rss_bytes")),
                 fmt_bytes(rec.get("peak_cuda_bytes")) if rec.get("peak_cuda_bytes") is not None else "-",
                 rec.get("input_hash", "")[:12]] for name, rec in run.stages.items() if name != "report"]
        timed = [rec for name, rec in run.stages.items() if name != "report"]
        rows.append(["total", fmt_seconds(sum(r.get("wall_time_s") or 0.0 for r in timed)),
                     fmt_seconds(sum(r["cpu_time_s"] for r in timed) if all(r.get("cpu_time_s") is not None for r in timed)
                                 else None), "", "", ""])
        blocks.append(Heading("Timings"))
        blocks.append(Table(["stage", "wall time (s)", "CPU time (s)", "peak RSS", "peak CUDA", "input hash"], rows,
                            caption="Wall time, process CPU time (all threads) and peak memory of each stage when it last ran "
                                    "(cached stages keep the timing of the run that computed them)."))
    clean = {k_: v for k_, v in cfg.items() if k_ != "schema"}
    blocks.append(Details("Resolved config", [Code(yaml.safe_dump(clean, sort_keys=False, default_flow_style=None, width=100), "yaml")]))
    return blocks


def write_report(run_dir: str | Path, title: str | None = None, html: bool = True,
                 versions: dict[str, str] | None = None) -> list[str]:
    """Write ``report.md`` (+ figures) and, if ``html``, ``report.html``; return the written paths (relative)."""
    run_dir = Path(run_dir)
    run = collect(run_dir, versions)
    title = title or f"layercap run: {run.model['spec']} ({run_dir.resolve().name})"
    blocks = report_blocks(run, title)
    md, figures = render_markdown(blocks, FIGURE_DIR)
    written = []
    for rel, png in figures.items():
        atomic_write_bytes(run_dir / rel, png)
        written.append(rel)
    atomic_write_text(run_dir / "report.md", md)
    written.append("report.md")
    if html:
        atomic_write_text(run_dir / "report.html", render_html(blocks, title))
        written.append("report.html")
    return written
