"""Run the main job: every stage of :func:`layercap.experiments.main_job.plan` in order, with caching.

``run_pipeline(config, run_dir)`` writes the resolved config, then runs each stage through a
:class:`~layercap.experiments.runner.StageRunner` (skipping those whose inputs did not change)
and returns a :class:`RunSummary`. Progress goes to stderr: one line per stage plus the stage's
own tqdm bars.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from layercap.experiments.config import PipelineConfig
from layercap.experiments.runner import RunSummary, StageRunner, check_run_dir, removed_on_failure, run_stages
from layercap.experiments.common import resolve_device
from layercap.experiments.main_job import RunContext, plan, preflight


def _stderr(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def run_pipeline(config: PipelineConfig, run_dir: str | Path, log: Callable[[str], None] = _stderr) -> RunSummary:
    """Run (or resume) the pipeline of ``config`` in ``run_dir``; see the module docstring."""
    run_dir = check_run_dir(run_dir)
    preflight(config)
    stages = plan(config)
    device = resolve_device(config.model.device)
    with removed_on_failure(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
        runner = StageRunner(run_dir, device=device, log=log)
        ctx = RunContext(config=config, run_dir=run_dir, runner=runner, device=device, log=log)
        return run_stages(runner, stages, ctx, log)
