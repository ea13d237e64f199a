"""The main job, ``layercap run``: model -> scores -> decisions -> pruning -> evaluation -> report.

- config:   typed, validated pipeline config (sections model, data, scoring, allocation, pruning,
            evaluation, report), the embedded ``default.yaml`` and ``--set`` overrides
- manifest: ``stages.json``, per-stage input hashes, timings and memory; skip-if-unchanged
- stages:   one function per stage (the only code calling the library APIs) and the plan
- run:      ``run_pipeline(config, run_dir) -> RunSummary``
"""

from layercap.experiments.config import PipelineConfig, load_config

__all__ = ["PipelineConfig", "load_config", "run_pipeline"]


def run_pipeline(config, run_dir, **kwargs):
    """See :func:`layercap.experiments.run.run_pipeline` (imported lazily: it pulls in torch)."""
    from layercap.experiments.run import run_pipeline as _run

    return _run(config, run_dir, **kwargs)
