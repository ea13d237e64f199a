"""The one stage runner of every job and sweep: manifest (``stages.json``), content-hashed
inputs, atomic outputs, resume.

The main job (``layercap run``), the pruning sweep (``compare-pruning``) and the allocation
sweep (``compare-allocation``, with fine-tuning as a stage) are each a list of :class:`Stage`
run by :func:`run_stages` through one :class:`StageRunner`.

Every stage has an *input hash*: the SHA-256 of its config section, the hashes of the upstream
artefacts it reads and the calibration data's SHA-256 (whatever the stage function declares).
After a stage finishes, its record (input hash, output hashes, wall time, peak memory) is added
to the manifest, which is rewritten atomically. A rerun skips a stage when its record has the
same input hash and every recorded output still exists with the recorded hash; so a run that
was interrupted (Ctrl-C, SIGKILL, a crash) continues with the first stage that did not finish,
and changing one config field reruns only the stages that depend on it.

A stage that starts is recorded under ``pending`` with its input hash before it runs. When the
same stage starts again with the same input hash (it was interrupted), ``StageRunner.resuming``
is True while it runs, so a stage with its own checkpoints (fine-tuning) continues them; with a
different input hash it is False, and the stage must start from scratch (never reuse work done
with other settings).

Schema ``layercap.stages/v1``::

    {"schema": "layercap.stages/v1",
     "stages": {"score:kfac": {"input_hash": "...", "outputs": {"scores/kfac.json": "<sha256>"},
                               "wall_time_s": 12.3, "cpu_time_s": 23.1, "peak_rss_bytes": 812345344,
                               "peak_cuda_bytes": null, "finished_at": "2026-11-22T13:01:02Z"}, ...}}
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from layercap.errors import LayercapError
from layercap.io import atomic_write_json, sha256_file, sha256_json

SCHEMA = "layercap.stages/v1"
MANIFEST = "stages.json"


def hash_output(path: Path) -> str:
    """SHA-256 of a file, or of a directory's (relative name, file hash) list (checkpoints)."""
    if path.is_dir():
        entries = [(str(p.relative_to(path)), sha256_file(p)) for p in sorted(path.rglob("*")) if p.is_file()]
        return sha256_json(entries)
    return sha256_file(path)


@dataclass
class StageRecord:
    """One finished stage. Times in seconds; memory in bytes (peak resident set of the process
    during the stage, and peak CUDA memory allocated when a GPU was used)."""

    input_hash: str
    outputs: dict[str, str]
    wall_time_s: float
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    cpu_time_s: float | None = None
    finished_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_hash": self.input_hash, "outputs": dict(self.outputs), "wall_time_s": round(float(self.wall_time_s), 4),
            "cpu_time_s": None if self.cpu_time_s is None else round(float(self.cpu_time_s), 4),
            "peak_rss_bytes": self.peak_rss_bytes, "peak_cuda_bytes": self.peak_cuda_bytes, "finished_at": self.finished_at,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "StageRecord":
        return cls(input_hash=str(doc["input_hash"]), outputs=dict(doc["outputs"]), wall_time_s=float(doc["wall_time_s"]),
                   peak_rss_bytes=doc.get("peak_rss_bytes"), peak_cuda_bytes=doc.get("peak_cuda_bytes"),
                   cpu_time_s=doc.get("cpu_time_s"), finished_at=str(doc.get("finished_at", "")))


@dataclass
class Manifest:
    """Records of the finished stages of one run directory, in the order they finished."""

    stages: dict[str, StageRecord] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)  # stage -> input hash of a started, unfinished run

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"schema": SCHEMA, "stages": {name: rec.to_dict() for name, rec in self.stages.items()}}
        if self.pending:
            doc["pending"] = dict(self.pending)
        return doc

    @classmethod
    def from_dict(cls, doc: Any, source: str = MANIFEST) -> "Manifest":
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("stages"), dict):
            raise LayercapError(f"{source}: not a layercap stage manifest ({SCHEMA}); delete it (the run restarts from "
                                "scratch) or pass another -o directory.")
        try:
            pending = {str(k): str(v) for k, v in (doc.get("pending") or {}).items()}
            return cls({name: StageRecord.from_dict(rec) for name, rec in doc["stages"].items()}, pending)
        except (KeyError, TypeError, ValueError) as exc:
            raise LayercapError(f"{source}: malformed stage record ({exc}); delete the file to rerun every stage.") from exc

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            return cls()
        from layercap.io import read_json

        doc = read_json(path, "run manifest", "Delete it to rerun every stage.")
        return cls.from_dict(doc, str(path))


# ---- peak memory ---------------------------------------------------------------------------
def _read_status(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@contextmanager
def measure(device: str = "cpu") -> Iterator[dict[str, Any]]:
    """Measure wall time (s), process CPU time (user + system, s, all threads) and peak memory
    (bytes) of the enclosed block into the yielded dict. On a shared machine the CPU time is
    the steadier figure: wall time grows with other people's load, CPU time much less.

    Peak RSS is exact per stage on Linux (VmHWM reset through /proc/self/clear_refs); elsewhere
    it falls back to the process-lifetime maximum (ru_maxrss), which is an upper bound.
    """
    out: dict[str, Any] = {}
    per_stage = _reset_peak_rss()
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["wall_time_s"] = time.perf_counter() - start
        out["cpu_time_s"] = time.process_time() - cpu_start
        peak = _read_status("VmHWM") if per_stage else None
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_rss_bytes"] = int(peak)
        out["peak_cuda_bytes"] = None
        if cuda:
            import torch

            out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())


# ---- the stage runner --------------------------------------------------------------------------
@dataclass
class StageOutcome:
    name: str
    skipped: bool
    record: StageRecord


class StageRunner:
    """Runs stages in a run directory, skipping those whose inputs and outputs are unchanged."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", log: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.device = device
        self.manifest_path = self.run_dir / MANIFEST
        self.manifest = Manifest.load(self.manifest_path)
        self.log = log or (lambda msg: None)
        self.resuming = False  # True while a stage runs again with the input hash it was interrupted with

    def reorder(self, names: list[str]) -> None:
        """Keep only the records of ``names``, in that order (the plan's order), and save."""
        stages = {n: self.manifest.stages[n] for n in names if n in self.manifest.stages}
        if list(stages) != list(self.manifest.stages):
            self.manifest.stages = stages
            self.manifest.save(self.manifest_path)

    def _save_merged(self, name: str) -> None:
        """Save this process's record of stage ``name`` into the manifest on disk, keeping the
        records other processes wrote meanwhile: several invocations may fill one sweep folder in
        parallel (each with some of the cells); an exclusive lock makes read-merge-write atomic."""
        import fcntl

        with open(self.run_dir / (MANIFEST + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                disk = Manifest.load(self.manifest_path)
                for table in ("stages", "pending"):
                    mine, theirs = getattr(self.manifest, table), getattr(disk, table)
                    if name in mine:
                        theirs[name] = mine[name]
                    else:
                        theirs.pop(name, None)
                    # what others finished is ours to see too (their outputs feed our later stages)
                    for other, value in theirs.items():
                        if other != name:
                            mine[other] = value
                    for other in [k for k in mine if k not in theirs]:
                        mine.pop(other)
                disk.save(self.manifest_path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def upstream(self, *rels: str) -> dict[str, str]:
        """Recorded hashes of finished upstream artefacts (part of a later stage's cache key)."""
        return {rel: self.output_hash(rel) for rel in rels}

    def output_hash(self, rel: str) -> str:
        """Hash of an output of a finished stage, as recorded (the upstream hash of later stages)."""
        for rec in self.manifest.stages.values():
            if rel in rec.outputs:
                return rec.outputs[rel]
        raise LayercapError(f"internal: {rel} was not produced by any finished stage")

    def is_fresh(self, name: str, input_hash: str) -> bool:
        rec = self.manifest.stages.get(name)
        if rec is None or rec.input_hash != input_hash:
            return False
        for rel, digest in rec.outputs.items():
            path = self.run_dir / rel
            if not path.exists() or hash_output(path) != digest:
                return False
        return True

    def run(self, name: str, inputs: Any, fn: Callable[[], list[str]]) -> StageOutcome:
        """Run ``fn`` (returns its outputs, paths relative to the run dir) unless cached."""
        input_hash = sha256_json({"stage": name, "inputs": inputs})
        if self.is_fresh(name, input_hash):
            self.log(f"{name}: unchanged, skipped")
            return StageOutcome(name, True, self.manifest.stages[name])
        # An out-of-date record stays until the stage finishes (its input hash no longer
        # matches, so it can never be mistaken for a fresh one) and keeps its place in the order.
        self.resuming = self.manifest.pending.get(name) == input_hash
        self.manifest.pending[name] = input_hash
        self._save_merged(name)
        _test_hook(name)
        try:
            with measure(self.device) as m:
                outputs = fn()
        finally:
            self.resuming = False
        missing = [rel for rel in outputs if not (self.run_dir / rel).exists()]
        if missing:
            raise LayercapError(f"internal: stage {name} did not write {missing}")
        rec = StageRecord(
            input_hash=input_hash,
            outputs={rel: hash_output(self.run_dir / rel) for rel in outputs},
            wall_time_s=m["wall_time_s"], cpu_time_s=m["cpu_time_s"], peak_rss_bytes=m["peak_rss_bytes"],
            peak_cuda_bytes=m["peak_cuda_bytes"],
            finished_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        self.manifest.stages[name] = rec
        self.manifest.pending.pop(name, None)
        self._save_merged(name)
        self.log(f"{name}: done in {rec.wall_time_s:.1f} s")
        return StageOutcome(name, False, rec)


TEST_HOOK_ENV = "LAYERCAP_TEST_INTERRUPT"


def _test_hook(name: str) -> None:
    """Test hook: ``LAYERCAP_TEST_INTERRUPT=<stage>[@kill]`` interrupts the run as that stage starts.

    ``<stage>`` alone raises KeyboardInterrupt (as Ctrl-C would); ``<stage>@kill`` sends SIGKILL
    to the process (a hard crash: no cleanup code runs). Used by the resume tests only.
    """
    spec = os.environ.get(TEST_HOOK_ENV)
    if not spec:
        return
    stage, _, mode = spec.partition("@")
    if stage != name:
        return
    if mode == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    raise KeyboardInterrupt(f"{TEST_HOOK_ENV}={spec}")


# ---- plans --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One stage of a plan: its name, what its cache key is made of, and what to run.

    ``inputs(ctx)`` returns JSON-able data (settings, upstream artefact hashes, data hashes);
    ``run(ctx)`` writes the stage's artefacts and returns their paths relative to the run dir.
    """

    name: str
    inputs: Callable[[Any], Any]
    run: Callable[[Any], list[str]]


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


def run_stages(runner: StageRunner, stages: list[Stage], ctx: Any, log: Callable[[str], None] = lambda msg: None,
               keep_only_plan: bool = True) -> RunSummary:
    """Run (or skip, when unchanged) every stage in order; return what ran and what was cached.

    ``keep_only_plan``: records of stages the plan no longer has are dropped from the manifest
    (their files stay), so that the manifest lists this plan's stages in the plan's order.
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise LayercapError(f"internal: a plan names a stage twice ({sorted(n for n in names if names.count(n) > 1)[0]})")
    if keep_only_plan:
        runner.reorder(names)
    summary = RunSummary(str(runner.run_dir))
    start = time.perf_counter()
    for i, stage in enumerate(stages, start=1):
        log(f"[{i}/{len(stages)}] {stage.name}")
        outcome = runner.run(stage.name, stage.inputs(ctx), lambda stage=stage: stage.run(ctx))
        (summary.skipped if outcome.skipped else summary.ran).append(stage.name)
        if keep_only_plan:
            runner.reorder(names)
    summary.wall_time_s = time.perf_counter() - start
    return summary


# ---- output folders ----------------------------------------------------------------------------
def check_run_dir(run_dir: str | Path, markers: tuple[str, ...] = (MANIFEST,), flag: str = "-o") -> Path:
    """``run_dir`` if layercap may write there: new, empty, or holding one of ``markers`` (files a
    layercap job wrote). A folder of someone else's files is refused: a job writes fixed names
    (config.yaml, report.md, ...) and must never overwrite what it did not write."""
    from layercap.io import check_output_parent

    run_dir = Path(run_dir)
    check_output_parent(run_dir, flag)
    if run_dir.exists() and not run_dir.is_dir():
        raise LayercapError(f"{flag} {run_dir}: exists and is not a directory; pass a directory for the run's artefacts.")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not any((run_dir / m).exists() for m in markers):
        raise LayercapError(f"{flag} {run_dir} holds files that layercap did not write (no {markers[0]}); "
                            "choose a new or empty folder.")
    return run_dir


@contextmanager
def removed_on_failure(run_dir: str | Path) -> Iterator[None]:
    """Remove ``run_dir`` again when the job that created it fails before any stage finished, so a
    failed first attempt leaves nothing behind to block the corrected rerun. An interruption
    (Ctrl-C) keeps it: the rerun resumes there."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        yield
    except Exception:
        if created and run_dir.is_dir() and not Manifest.load(run_dir / MANIFEST).stages:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
