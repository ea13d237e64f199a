"""Run the main job: every stage of :func:`layercap.pipeline.stages.plan` in order, with caching.

``run_pipeline(config, run_dir)`` writes the resolved config, then runs each stage through a
:class:`~layercap.pipeline.manifest.StageRunner` (skipping those whose inputs did not change)
and returns a :class:`RunSummary`. Progress goes to stderr: one line per stage plus the stage's
own tqdm bars.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from layercap.errors import LayercapError
from layercap.pipeline.config import PipelineConfig
from layercap.pipeline.manifest import StageRunner
from layercap.pipeline.stages import RunContext, plan, preflight, resolve_device

SUMMARY_SCHEMA = "layercap.run-summary/v1"


@dataclass
class RunSummary:
    """What one invocation did: per stage, whether it ran or was cached, and its wall time (s)."""

    run_dir: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SUMMARY_SCHEMA, "run_dir": self.run_dir, "ran": self.ran, "skipped": self.skipped,
                "wall_time_s": round(self.wall_time_s, 3)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "RunSummary":
        return cls(doc["run_dir"], list(doc["ran"]), list(doc["skipped"]), float(doc["wall_time_s"]))


def _stderr(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def run_pipeline(config: PipelineConfig, run_dir: str | Path, log: Callable[[str], None] = _stderr) -> RunSummary:
    """Run (or resume) the pipeline of ``config`` in ``run_dir``; see the module docstring."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise LayercapError(f"-o {run_dir}: exists and is not a directory; pass a directory for the run's artefacts.")
    preflight(config)
    stages = plan(config)
    device = resolve_device(config.model.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")
    runner = StageRunner(run_dir, device=device, log=log)
    ctx = RunContext(config=config, run_dir=run_dir, runner=runner, device=device, log=log)
    # Stages that a changed config no longer has are dropped from the manifest (their files
    # stay) so that the report lists only this config's stages, in the plan's order.
    runner.reorder([s.name for s in stages])
    summary = RunSummary(str(run_dir))
    start = time.perf_counter()
    for i, stage in enumerate(stages, start=1):
        log(f"[{i}/{len(stages)}] {stage.name}")
        outcome = runner.run(stage.name, stage.inputs(ctx), lambda: stage.run(ctx))
        (summary.skipped if outcome.skipped else summary.ran).append(stage.name)
        runner.reorder([s.name for s in stages])
    summary.wall_time_s = time.perf_counter() - start
    return summary
