"""Stage caching: input hashes, output verification, interruption, timings and memory."""

from __future__ import annotations

import json
import mmap

import pytest

from layercap.errors import LayercapError
from layercap.io import atomic_write_text, sha256_file
from layercap.experiments.runner import MANIFEST, TEST_HOOK_ENV, Manifest, StageRunner, hash_output, measure


def _writer(run_dir, rel, text, calls):
    def fn():
        calls.append(rel)
        atomic_write_text(run_dir / rel, text)
        return [rel]
    return fn


def test_stage_runs_once_then_is_skipped_until_inputs_change(tmp_path):
    calls: list[str] = []
    runner = StageRunner(tmp_path)
    out = runner.run("a", {"x": 1}, _writer(tmp_path, "a.txt", "one", calls))
    assert not out.skipped and calls == ["a.txt"]
    assert out.record.outputs == {"a.txt": sha256_file(tmp_path / "a.txt")}
    # a fresh runner reads the manifest from disk: same inputs -> skipped
    runner = StageRunner(tmp_path)
    assert runner.run("a", {"x": 1}, _writer(tmp_path, "a.txt", "one", calls)).skipped
    assert calls == ["a.txt"]
    # changed inputs -> rerun
    assert not runner.run("a", {"x": 2}, _writer(tmp_path, "a.txt", "two", calls)).skipped
    assert calls == ["a.txt", "a.txt"]
    doc = json.loads((tmp_path / MANIFEST).read_text())
    assert doc["schema"] == "layercap.stages/v1" and list(doc["stages"]) == ["a"]


def test_tampered_or_missing_output_reruns_the_stage(tmp_path):
    calls: list[str] = []
    runner = StageRunner(tmp_path)
    runner.run("a", {}, _writer(tmp_path, "a.txt", "one", calls))
    (tmp_path / "a.txt").write_text("edited by hand")
    assert not runner.run("a", {}, _writer(tmp_path, "a.txt", "one", calls)).skipped
    (tmp_path / "a.txt").unlink()
    assert not runner.run("a", {}, _writer(tmp_path, "a.txt", "one", calls)).skipped
    assert calls == ["a.txt"] * 3


def test_upstream_hash_and_directory_hash(tmp_path):
    runner = StageRunner(tmp_path)

    def make_dir():
        (tmp_path / "ck").mkdir(exist_ok=True)
        (tmp_path / "ck" / "w.bin").write_bytes(b"\x00\x01")
        (tmp_path / "ck" / "sub").mkdir(exist_ok=True)
        (tmp_path / "ck" / "sub" / "c.json").write_text("{}")
        return ["ck"]

    runner.run("ckpt", {}, make_dir)
    h = runner.output_hash("ck")
    assert h == hash_output(tmp_path / "ck")
    (tmp_path / "ck" / "sub" / "c.json").write_text("{ }")
    assert hash_output(tmp_path / "ck") != h
    with pytest.raises(LayercapError):
        runner.output_hash("never-written.json")


def test_failed_stage_is_not_recorded_and_earlier_ones_stay(tmp_path):
    calls: list[str] = []
    runner = StageRunner(tmp_path)
    runner.run("a", {}, _writer(tmp_path, "a.txt", "one", calls))

    def boom():
        raise RuntimeError("crash inside the stage")

    with pytest.raises(RuntimeError):
        runner.run("b", {}, boom)
    manifest = Manifest.load(tmp_path / MANIFEST)
    assert list(manifest.stages) == ["a"]


def test_interrupt_hook(tmp_path, monkeypatch):
    runner = StageRunner(tmp_path)
    monkeypatch.setenv(TEST_HOOK_ENV, "score:kfac")
    calls: list[str] = []
    runner.run("score:diag", {}, _writer(tmp_path, "d.txt", "d", calls))
    with pytest.raises(KeyboardInterrupt):
        runner.run("score:kfac", {}, _writer(tmp_path, "k.txt", "k", calls))
    assert calls == ["d.txt"] and not (tmp_path / "k.txt").exists()


def test_measure_reports_time_and_per_stage_peak_memory():
    with measure() as big:
        # an anonymous mapping is always fresh memory: malloc could serve np.ones from pages a
        # long-lived test worker (one that loaded SmolLM2 earlier) already holds resident
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * (64 * 2**20))  # 64 MiB touched
        block.close()
    with measure() as small:
        pass
    assert big["wall_time_s"] > 0 and big["peak_cuda_bytes"] is None
    # the peak counter is reset per stage (on Linux), so the small stage's peak is lower
    assert big["peak_rss_bytes"] >= small["peak_rss_bytes"] + 32 * 2**20


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(LayercapError, match="(?i)delete it"):
        StageRunner(tmp_path)
    (tmp_path / MANIFEST).write_text('{"schema": "other"}')
    with pytest.raises(LayercapError, match="not a layercap stage manifest"):
        StageRunner(tmp_path)


def test_two_runners_fill_one_folder_without_losing_records(tmp_path):
    """Two invocations filling one sweep folder in parallel: each save merges with the manifest
    on disk, so neither overwrites the other's finished stages."""
    calls: list[str] = []
    first, second = StageRunner(tmp_path), StageRunner(tmp_path)  # both read the empty manifest
    first.run("a", {"x": 1}, _writer(tmp_path, "a.txt", "one", calls))
    second.run("b", {"x": 1}, _writer(tmp_path, "b.txt", "two", calls))
    doc = json.loads((tmp_path / MANIFEST).read_text())
    assert set(doc["stages"]) == {"a", "b"} and not doc.get("pending")
    # a third invocation sees both as finished
    third = StageRunner(tmp_path)
    assert third.run("a", {"x": 1}, _writer(tmp_path, "a.txt", "one", calls)).skipped
    assert third.run("b", {"x": 1}, _writer(tmp_path, "b.txt", "two", calls)).skipped
    assert calls == ["a.txt", "b.txt"]


def test_an_interrupted_stage_resumes_only_with_the_same_inputs(tmp_path):
    seen = []

    def interrupted():
        seen.append(runner.resuming)
        raise KeyboardInterrupt

    def finishes():
        seen.append(runner.resuming)
        atomic_write_text(tmp_path / "c.txt", "x")
        return ["c.txt"]

    runner = StageRunner(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runner.run("c", {"x": 1}, interrupted)
    runner = StageRunner(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runner.run("c", {"x": 2}, interrupted)  # other settings: start afresh
    runner = StageRunner(tmp_path)
    runner.run("c", {"x": 2}, finishes)  # same settings as the interrupted attempt: resume
    assert seen == [False, False, True] and not json.loads((tmp_path / MANIFEST).read_text()).get("pending")
