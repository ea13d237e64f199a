"""lm-evaluation-harness on local task YAMLs agrees with layercap's own multiple-choice evaluator:
same items, same per-choice log-likelihoods, same acc and acc_norm."""

from __future__ import annotations

import json

import pytest
import torch

from layercap.data.tasks import load_task
from layercap.errors import LayercapError
from layercap.evaluate import evaluate_task
from layercap.evaluate.lm_eval import local_tasks, parse_tasks, run_lm_eval, task_config
from layercap.evaluate.multiple_choice import loglikelihoods
from layercap.models.tiny import build_tiny

pytest.importorskip("lm_eval")  # fallback only: `make env` installs the interop extra

CASES = [("arc_easy", "ARC-Easy"), ("boolq", "boolq")]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return build_tiny("llama")


def test_lm_eval_equals_layercap_on_the_same_items(tiny, shared_data):
    model, tok = tiny
    out = run_lm_eval(model, tok, ",".join(n for n, _ in CASES), batch_size=4, limit=12, seed=3,
                      data_root=shared_data, per_item=True)
    json.dumps(out)  # JSON-safe (goes into eval.json)
    for name, folder in CASES:
        task = load_task(shared_data / "tasks" / folder, limit=12, seed=3)
        ours = evaluate_task(model, tok, task, batch_size=4, progress=False)
        theirs = out["tasks"][name]
        assert theirs["n"] == ours.n == 12
        # per choice, the harness's log-likelihood of the same request equals ours
        lls = theirs["loglikelihoods"]
        assert sorted(lls) == theirs["indices"]
        for doc_id, item in zip(theirs["indices"], task.items):
            want = loglikelihoods(model, tok, item.requests(), progress=False)
            assert lls[doc_id] == pytest.approx(want, abs=2e-4), (name, doc_id)
        assert theirs["acc"] == pytest.approx(ours.acc, abs=1e-12)
        assert theirs["acc_norm"] == pytest.approx(ours.acc_norm, abs=1e-12)
        assert theirs["acc_stderr"] == pytest.approx(ours.acc_stderr, abs=1e-9)


def test_shipped_tasks_resolve_to_local_files(shared_data):
    assert {"arc_easy", "arc_challenge", "boolq", "openbookqa", "commonsenseqa"} <= set(local_tasks())
    for name in local_tasks():
        config, files = task_config(name, shared_data)
        assert config["task"] == f"layercap_{name}"
        assert all(f.is_file() and shared_data.resolve() in f.parents for f in files.values())


def test_bad_task_names_and_missing_data(tmp_path):
    with pytest.raises(LayercapError, match="neither a shipped"):
        parse_tasks("hellaswag")
    with pytest.raises(LayercapError, match="names no task"):
        parse_tasks(" , ")
    with pytest.raises(LayercapError, match="does not exist"):
        task_config("arc_easy", tmp_path)


def test_evaluate_cli_lm_eval_on_the_same_subset(tmp_path, shared_data, monkeypatch):
    from layercap.cli import main

    model, tok = build_tiny("llama", num_layers=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("LAYERCAP_SHARED_DATA", str(shared_data))
    out = tmp_path / "eval.json"
    rc = main(["evaluate", str(tmp_path / "m"), "--tasks", str(shared_data / "tasks" / "ARC-Easy"), "--limit", "8",
               "--seed", "5", "--lm-eval", "arc_easy", "--batch-size", "4", "-o", str(out), "--quiet"])
    assert rc == 0
    doc = json.loads(out.read_text())
    ours, theirs = doc["tasks"]["ARC-Easy"], doc["lm_eval"]["tasks"]["arc_easy"]
    assert theirs["n"] == ours["n"] == 8
    assert theirs["acc"] == pytest.approx(ours["acc"], abs=1e-12)
    assert theirs["acc_norm"] == pytest.approx(ours["acc_norm"], abs=1e-12)


@pytest.mark.slow
def test_smollm2_lm_eval_equals_layercap(smollm2, shared_data):
    model, tok = smollm2  # session fixture: HFLM only runs forward passes on it
    out = run_lm_eval(model, tok, "arc_easy", batch_size=8, limit=10, seed=0, data_root=shared_data)
    task = load_task(shared_data / "tasks" / "ARC-Easy", limit=10, seed=0)
    ours = evaluate_task(model, tok, task, batch_size=8, progress=False)
    theirs = out["tasks"]["arc_easy"]
    assert theirs["n"] == ours.n == 10
    assert theirs["acc"] == pytest.approx(ours.acc, abs=1e-12)
    assert theirs["acc_norm"] == pytest.approx(ours.acc_norm, abs=1e-12)
