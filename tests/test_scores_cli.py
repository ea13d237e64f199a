"""`layercap score` end to end on a tiny saved model: output, table, --csv, --resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layercap import LayerScores
from layercap.cli import main
from layercap.models.tiny import build_tiny


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tok = build_tiny("llama", num_layers=2, hidden=16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def text(wikitext, tmp_path):
    # a slice of the real WikiText test split keeps tokenisation fast
    path = tmp_path / "calib.txt"
    path.write_text(wikitext.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return path


def run(args):
    return main(["score", *map(str, args)])


def test_score_command_writes_json_csv_and_table(saved_model, text, tmp_path, capsys):
    out = tmp_path / "scores.json"
    rc = run([saved_model, "--data", text, "--method", "kfac", "--nsamples", 3, "--seqlen", 16, "--batch-size", 2,
              "-o", out, "--csv", "--quiet"])
    assert rc == 0
    scores = LayerScores.load(out)
    assert scores.names == ["model.layers.0", "model.layers.1"] and scores.method == "kfac"
    assert scores.metadata["nsamples"] == 3 and scores.metadata["seqlen"] == 16
    csv_scores = LayerScores.load(tmp_path / "scores.csv")
    np.testing.assert_allclose(csv_scores.zeta2, scores.zeta2)
    table = capsys.readouterr().out
    assert "model.layers.1" in table and "zeta2" in table
    assert not (tmp_path / "scores.json.ckpt").exists()  # removed after success
    # a factor budget below one block streams the blocks one per pass, with the same scores
    streamed = tmp_path / "streamed.json"
    assert run([saved_model, "--data", text, "--method", "kfac", "--nsamples", 3, "--seqlen", 16, "--batch-size", 2,
                "--max-factor-gb", "1e-9", "-o", streamed, "--quiet"]) == 0
    np.testing.assert_allclose(LayerScores.load(streamed).zeta2, scores.zeta2, rtol=1e-6)
    assert LayerScores.load(streamed).metadata["method_info"]["statistics_passes"] == 2


def test_score_command_module_and_groups(saved_model, text, tmp_path):
    out = tmp_path / "m.csv"
    assert run([saved_model, "--data", text, "--method", "diag", "--granularity", "module", "--nsamples", 2,
                "--seqlen", 8, "--modules", "mlp", "-o", out, "--quiet"]) == 0
    assert len(LayerScores.load(out)) == 2 * 3
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"attn": "self_attn", "mlp": r"\.mlp\."}))
    out2 = tmp_path / "g.json"
    assert run([saved_model, "--data", text, "--method", "gradnorm", "--groups", groups, "--nsamples", 2,
                "--seqlen", 8, "-o", out2, "--quiet"]) == 0
    assert LayerScores.load(out2).names == ["attn", "mlp"]


def test_score_command_resume(saved_model, text, tmp_path, monkeypatch):
    common = [saved_model, "--data", text, "--method", "diag", "--nsamples", 4, "--seqlen", 8, "--batch-size", 1, "--quiet"]
    full = tmp_path / "full.json"
    assert run([*common, "-o", full]) == 0
    # an interrupted run leaves its checkpoint; --resume finishes it with the same answer
    from layercap.scores import engine

    out = tmp_path / "resumed.json"
    ckpt = tmp_path / "ck"
    original = engine.make_context

    def interrupting(*a, **k):
        ctx = original(*a, **k)
        ctx.options.extra["_interrupt_after_batches"] = 2
        return ctx

    import layercap.scores.methods as methods

    monkeypatch.setattr(methods, "make_context", interrupting)
    # the CLI safety net turns the simulated crash into exit code 2 (no traceback); --debug re-raises it
    assert run([*common, "-o", out, "--checkpoint-dir", ckpt, "--checkpoint-every", 1]) == 2
    with pytest.raises(engine.Interrupted):
        run([*common, "-o", out, "--checkpoint-dir", ckpt, "--checkpoint-every", 1, "--debug"])
    monkeypatch.undo()
    assert not out.exists() and any(ckpt.iterdir())
    assert run([*common, "-o", out, "--checkpoint-dir", ckpt, "--resume"]) == 0
    np.testing.assert_allclose(LayerScores.load(out).zeta2, LayerScores.load(full).zeta2, rtol=1e-6)
    assert not ckpt.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "nope"], "unknown score method"),
        (["--data", "/no/such/file"], "does not exist"),
        (["--nsamples", "0"], "--nsamples"),
        (["--damping", "0"], "--damping"),
        (["--max-factor-gb", "-1"], "--max-factor-gb"),
        (["-o", "scores.txt"], ".json or .csv"),
        (["--groups", "/no/groups.json"], "--groups"),
    ],
)
def test_score_command_bad_input_writes_nothing(saved_model, text, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    args = [saved_model, "--data", text, "--nsamples", 2, "--seqlen", 8, "-o", "scores.json"]
    # later flags override earlier ones in argparse
    rc = run([*args, *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "scores.json").exists() and not (tmp_path / "scores.txt").exists()
