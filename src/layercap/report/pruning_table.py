"""The pruning comparison's record (``layercap.comparison/v1``: shared settings, the dense
reference and one cell per (rule, pruner, sparsity)) and its renderings: CSV rows, a Markdown
table per (pruner, sparsity) block with the best value in bold, and the PNG
(:mod:`layercap.report.compare_plot`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from layercap.errors import LayercapError
from layercap.evaluate import EvalResult
from layercap.io import atomic_write_csv, atomic_write_json, atomic_write_text, read_json
from layercap.programs.damage import spearman
from layercap.programs.rules import RuleSpec

SCHEMA = "layercap.comparison/v1"
CELL_SCHEMA = "layercap.comparison_cell/v1"
# table order of the rules (others after these, by name)
RULE_ORDER = {"uniform": 0, "owl": 1, "alphapruning": 2, "layerif": 3, "mdl": 4}
# the standings compare layercap's own rules (the MDL program on any source, the paper's protocol)
# with every other rule but uniform (the peers); perplexities within TIE of each other tie
LAYERCAP_RULES = ("mdl", "mdl-paper")
TIE = 0.01


def cell_id(rule: RuleSpec, method: str, sparsity: float) -> str:
    """File-name-safe id of a cell, e.g. ``mdl-kfac_wanda_s0.50``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{rule.label}_{method}_s{sparsity:.2f}")


@dataclass
class CellResult:
    """One (rule, pruner, sparsity) cell: the per-block ratios applied, the achieved sparsity
    of the pruned Linear weights, the evaluation, and wall times (s)."""

    rule: str
    source: str | None
    method: str
    sparsity: float
    achieved: float
    ratios: dict[str, float]
    eval: EvalResult
    prune_seconds: float = 0.0
    eval_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    settings_sha256: str | None = None  # the shared settings the cell was computed with (None: written before they were recorded)
    decision_seconds: float | None = None  # wall time of the rule's decision: its scores / damage stage plus program or search
    decision: dict = field(default_factory=dict)  # what a searched rule tried: "search" [[x, calibration KL]], "fitness", "radius", "fitness_windows"
    # mean KL(p_dense || p_pruned) of the cell's pruned model on the calibration windows (nats/token),
    # attached from the sweep's fidelity/ files; None where not measured
    calibration_kl: float | None = None

    @property
    def label(self) -> str:
        return RuleSpec(self.rule, self.source, "pruning").label

    def to_dict(self) -> dict:
        return {
            "schema": CELL_SCHEMA,
            "rule": self.rule,
            "source": self.source,
            "method": self.method,
            "sparsity": self.sparsity,
            "achieved": self.achieved,
            "ratios": dict(self.ratios),
            "eval": self.eval.to_dict(),
            "prune_seconds": self.prune_seconds,
            "eval_seconds": self.eval_seconds,
            "warnings": list(self.warnings),
            "settings_sha256": self.settings_sha256,
            "decision_seconds": self.decision_seconds,
            "decision": dict(self.decision),
            **({} if self.calibration_kl is None else {"calibration_kl": self.calibration_kl}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CellResult":
        if d.get("schema") != CELL_SCHEMA:
            raise LayercapError(f"not a comparison cell (schema {d.get('schema')!r}).")
        return cls(
            d["rule"], d.get("source"), d["method"], float(d["sparsity"]), float(d["achieved"]),
            {k: float(v) for k, v in d["ratios"].items()}, EvalResult.from_dict(d["eval"]),
            float(d.get("prune_seconds", 0.0)), float(d.get("eval_seconds", 0.0)), list(d.get("warnings", [])),
            d.get("settings_sha256"), d.get("decision_seconds"), dict(d.get("decision") or {}),
            None if d.get("calibration_kl") is None else float(d["calibration_kl"]),
        )


@dataclass
class Comparison:
    """The whole table: shared ``settings``, the ``dense`` reference and the ``cells``."""

    settings: dict
    dense: EvalResult
    cells: list[CellResult]

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "settings": dict(self.settings),
            "dense": self.dense.to_dict(),
            "cells": [c.to_dict() for c in self.cells],
            "standings": self.standings(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Comparison":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not a comparison (schema {d.get('schema')!r}, expected {SCHEMA!r}).")
        return cls(dict(d["settings"]), EvalResult.from_dict(d["dense"]), [CellResult.from_dict(c) for c in d["cells"]])

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Comparison":
        try:
            return cls.from_dict(read_json(path, "comparison", "Rebuild it with --report-only."))
        except (OSError, json.JSONDecodeError) as exc:
            raise LayercapError(f"cannot read comparison {path}: {exc}.") from exc

    # ---- tables -----------------------------------------------------------------------------
    def columns(self) -> tuple[list[str], list[str]]:
        return list(self.dense.ppl), list(self.dense.tasks)

    def rows(self) -> list[dict]:
        """One flat row per model (dense first): ppl per text, acc per task, the means."""
        ppl_keys, task_keys = self.columns()

        def row(label, method, sparsity, achieved, ev: EvalResult, decision=None, kl=None) -> dict:
            r = {"rule": label, "method": method, "sparsity": sparsity, "achieved": achieved, "decision_seconds": decision,
                 "calibration_kl": kl}
            r.update({f"ppl:{k}": ev.ppl[k].ppl if k in ev.ppl else None for k in ppl_keys})
            r.update({f"acc:{k}": ev.tasks[k].acc if k in ev.tasks else None for k in task_keys})
            r["mean_acc"] = ev.mean_acc
            r["mean_acc_above_chance"] = ev.mean_acc_above_chance
            return r

        out = [row("dense", "-", 0.0, 0.0, self.dense)]
        out += [row(c.label, c.method, c.sparsity, c.achieved, c.eval, c.decision_seconds, c.calibration_kl) for c in self.cells]
        return out

    def standings(self) -> list[dict]:
        """Per (pruner, sparsity) and perplexity text: the best layercap rule, the best peer and
        uniform, with ``vs_uniform`` (best layercap / uniform) and ``verdict``: ``wins`` (lower than
        the best peer by more than TIE), ``ties`` (within TIE) or ``loses``; ``beats_uniform``:
        best layercap <= uniform x (1 + TIE). Only blocks that hold at least one of each.

        "Best" is chosen on the evaluation text itself, an upper bound on what a user gets. The
        ``pick_*`` fields are the honest counterpart: ``pick`` is the layercap rule whose pruned
        model has the lowest calibration KL (no evaluation data involved; None where no layercap
        cell has one), with its ``pick_ppl``, ``pick_vs_peer``, ``pick_verdict``, ``pick_vs_uniform``
        against the same best peer (still chosen on the evaluation text: the comparison is
        conservative)."""
        out = []
        groups: dict[tuple[str, float], list[CellResult]] = {}
        for c in self.cells:
            groups.setdefault((c.method, c.sparsity), []).append(c)
        for (method, s), cells in groups.items():
            for text in self.columns()[0]:
                scored = [(c.eval.ppl[text].ppl, c.label, c.rule) for c in cells if text in c.eval.ppl]
                ours = min((t for t in scored if t[2] in LAYERCAP_RULES), default=None)
                peer = min((t for t in scored if t[2] not in LAYERCAP_RULES and t[2] != "uniform"), default=None)
                uniform = min((t for t in scored if t[2] == "uniform"), default=None)
                if ours is None or peer is None:
                    continue
                rel = ours[0] / peer[0]
                verdict = _verdict(rel)
                row = {"method": method, "sparsity": s, "text": text, "best_layercap": ours[1], "layercap_ppl": ours[0],
                       "best_peer": peer[1], "peer_ppl": peer[0], "vs_peer": rel, "verdict": verdict,
                       "uniform_ppl": None, "vs_uniform": None, "beats_uniform": None}
                if uniform is not None:
                    row.update(uniform_ppl=uniform[0], vs_uniform=ours[0] / uniform[0],
                               beats_uniform=bool(ours[0] <= uniform[0] * (1.0 + TIE)))
                measured = [c for c in cells if c.rule in LAYERCAP_RULES and c.calibration_kl is not None and text in c.eval.ppl]
                pick = min(measured, key=lambda c: c.calibration_kl, default=None)
                ranked = [c for c in cells if c.calibration_kl is not None and text in c.eval.ppl]
                row["kl_spearman"] = (spearman([c.calibration_kl for c in ranked], [c.eval.ppl[text].ppl for c in ranked])
                                      if len(ranked) >= 3 else None)
                row.update(pick=None, pick_kl=None, pick_ppl=None, pick_vs_peer=None, pick_verdict=None, pick_vs_uniform=None)
                if pick is not None:
                    ppl = pick.eval.ppl[text].ppl
                    row.update(pick=pick.label, pick_kl=pick.calibration_kl, pick_ppl=ppl, pick_vs_peer=ppl / peer[0],
                               pick_verdict=_verdict(ppl / peer[0]),
                               pick_vs_uniform=None if uniform is None else ppl / uniform[0])
                out.append(row)
        return out

    def standings_markdown(self) -> str:
        rows = self.standings()
        if not rows:
            return ""
        def x(v):
            return "n/a" if v is None else f"{v:.3f}x"

        lines = [f"Best layercap rule ({', '.join(LAYERCAP_RULES)}) against the best peer (every other rule but uniform) "
                 f"and uniform, perplexity; ties within {TIE:.0%}. Both bests are chosen on the evaluation text:", "",
                 "| pruner | sparsity | text | best layercap | ppl | best peer | ppl | vs peer | verdict | vs uniform |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['text']} | {r['best_layercap']} | {r['layercap_ppl']:.2f} | "
                         f"{r['best_peer']} | {r['peer_ppl']:.2f} | {r['vs_peer']:.3f}x | {r['verdict']} | {x(r['vs_uniform'])} |")
        picked = [r for r in rows if r.get("pick") is not None]
        if picked:
            lines += ["", "Layercap's pick: of its rules, the one whose pruned model has the lowest KL to the dense model on the "
                      "calibration windows (chosen without evaluation data), against the same best peer (chosen on the "
                      "evaluation text). Spearman: calibration KL against perplexity over every rule of the block:", "",
                      "| pruner | sparsity | text | pick | calibration KL | ppl | vs best peer | verdict | vs uniform | Spearman |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in picked:
                rho = "n/a" if r["kl_spearman"] is None else f"{r['kl_spearman']:+.2f}"
                lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['text']} | {r['pick']} | {r['pick_kl']:.4f} | "
                             f"{r['pick_ppl']:.2f} | {x(r['pick_vs_peer'])} | {r['pick_verdict']} | {x(r['pick_vs_uniform'])} | {rho} |")
        return "\n".join(lines) + "\n"

    def write_csv(self, path: str | Path) -> Path:
        rows = self.rows()
        header = list(rows[0])
        return atomic_write_csv(path, header, [[r[h] for h in header] for r in rows])

    def markdown(self) -> str:
        """Markdown table per (pruner, sparsity) block of rows; best value per block in bold."""
        ppl_keys, task_keys = self.columns()
        above = self.dense.above_chance
        head = ["rule", "pruner", "sparsity"] + [f"ppl {k}" for k in ppl_keys] + [f"{k} acc" for k in task_keys]
        head += [f"mean acc (above chance: {', '.join(above) or 'none'})", "mean acc (all)", "decision (s)", "calibration KL"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def fmt(v, digits):
            return "n/a" if v is None else f"{v:.{digits}f}"

        d = self.dense
        lines.append(
            "| " + " | ".join(["dense", "-", "0"] + [fmt(d.ppl[k].ppl, 2) for k in ppl_keys] + [fmt(d.tasks[k].acc, 3) for k in task_keys]
                              + [fmt(d.mean_acc_above_chance, 4), fmt(d.mean_acc, 4), "-", "0"]) + " |"
        )
        groups: dict[tuple[str, float], list[CellResult]] = {}
        for c in self.cells:
            groups.setdefault((c.method, c.sparsity), []).append(c)
        for (method, s), cells in groups.items():
            best_ppl = {k: min((c.eval.ppl[k].ppl for c in cells if k in c.eval.ppl), default=None) for k in ppl_keys}
            accs = [c.eval.mean_acc_above_chance for c in cells if c.eval.mean_acc_above_chance is not None]
            best_acc = max(accs) if accs else None
            for c in cells:
                vals = []
                for k in ppl_keys:
                    v = c.eval.ppl[k].ppl if k in c.eval.ppl else None
                    vals.append(f"**{fmt(v, 2)}**" if v is not None and v == best_ppl[k] and len(cells) > 1 else fmt(v, 2))
                vals += [fmt(c.eval.tasks[k].acc if k in c.eval.tasks else None, 3) for k in task_keys]
                m = c.eval.mean_acc_above_chance
                vals.append(f"**{fmt(m, 4)}**" if m is not None and m == best_acc and len(cells) > 1 else fmt(m, 4))
                vals.append(fmt(c.eval.mean_acc, 4))
                vals.append(fmt(c.decision_seconds, 1))
                vals.append(fmt(c.calibration_kl, 4))
                lines.append("| " + " | ".join([c.label, method, f"{s:g}"] + vals) + " |")
        return "\n".join(lines) + "\n"


def _verdict(rel: float) -> str:
    """``wins`` / ``ties`` / ``loses`` of a perplexity ratio (layercap / peer), ties within TIE."""
    return "wins" if rel < 1.0 - TIE else ("ties" if rel <= 1.0 + TIE else "loses")


def write_outputs(result: Comparison, outdir: str | Path) -> None:
    """comparison.json, .csv, .md and .png in ``outdir``."""
    from layercap.report.compare_plot import plot_comparison

    outdir = Path(outdir)
    result.save(outdir / "comparison.json")
    result.write_csv(outdir / "comparison.csv")
    standings = result.standings_markdown()
    atomic_write_text(outdir / "comparison.md", result.markdown() + ("\n" + standings if standings else ""))
    plot_comparison(result, outdir / "comparison.png")
