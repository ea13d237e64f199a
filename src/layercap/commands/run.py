"""``layercap run``: the main job, from a model to decisions to a report (see layercap.experiments)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "run"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME,
        help="the main job: score, decide, prune, evaluate, report",
        description=(
            "Run the whole pipeline: score every block (several methods), allocate a capacity budget and "
            "per-block pruning ratios (MDL and baselines), prune, evaluate dense and pruned models, and "
            "write report.md / report.html. Without CONFIG the embedded default runs (bundled SmolLM2-135M, "
            "WikiText-2). Stages whose inputs did not change are skipped, so rerunning an interrupted run "
            "continues where it stopped."
        ),
    )
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG.yaml",
                   help="pipeline config (YAML); keys it omits keep the embedded defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field, value parsed as YAML (repeatable), e.g. "
                        "--set scoring.methods=[gradnorm,diag] --set pruning.sparsity=0.6")
    p.add_argument("-o", "--output", default=None, metavar="DIR",
                   help="run directory (default: runs/<config name>, or runs/default)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit (runs nothing)")
    return p


def default_run_dir(config_path: str | None) -> Path:
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def main(args: argparse.Namespace) -> int:
    from layercap.experiments.config import load_config

    config = load_config(args.config, args.overrides)
    out = Path(args.output) if args.output else default_run_dir(args.config)
    print(f"# layercap run -> {out}\n# resolved config:")
    print(config.to_yaml(), flush=True)
    if args.print_config:
        return 0

    import transformers

    from layercap.experiments.run import run_pipeline
    from layercap.experiments.main_job import read_json
    from layercap.report.build import collect, results_rows

    # one bar per long step is enough: silence transformers' per-load "Loading weights" bars
    transformers.utils.logging.disable_progress_bar()
    summary = run_pipeline(config, out)
    run = collect(out)
    if run.evals:
        headers, rows = results_rows(run)
        print(_table(headers, rows))
    manifest = read_json(out / "stages.json")["stages"]
    rows = [[name, "cached" if name in summary.skipped else "ran", f"{rec['wall_time_s']:.1f}",
             "n/a" if rec.get("cpu_time_s") is None else f"{rec['cpu_time_s']:.1f}",
             f"{(rec.get('peak_rss_bytes') or 0) / 2**20:.0f}"]
            for name, rec in manifest.items()]
    print()
    print(_table(["stage", "this run", "wall time (s)", "CPU time (s)", "peak RSS (MiB)"], rows))
    print(f"\nran {len(summary.ran)} stage(s), skipped {len(summary.skipped)} in {summary.wall_time_s:.1f} s")
    print(f"report: {out / 'report.md'}" + (f" and {out / 'report.html'}" if config.report.html else ""))
    sys.stdout.flush()
    return 0


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
