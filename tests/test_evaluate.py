"""Perplexity and multiple-choice scoring against hand-written dense references on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from layercap.data.calibration import tokenize_text
from layercap.data.tasks import MCItem, Task
from layercap.errors import LayercapError
from layercap.evaluate import EvalResult, above_chance_tasks, evaluate_model
from layercap.evaluate.multiple_choice import (
    TaskResult,
    choice_length,
    encode_pair,
    evaluate_task,
    item_metrics,
    loglikelihoods,
)
from layercap.evaluate.perplexity import PerplexityResult, perplexity, windows
from layercap.models.tiny import build_tiny

TEXT = ("The quick brown fox jumps over the lazy dog. Pruning removes weights; experts add capacity. " * 12).strip()


@pytest.fixture()
def text_file(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    return f


def _hand_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-target NLL of ids[1:] given everything before, one forward."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


def test_perplexity_single_window_equals_hand(tiny_llama, text_file):
    model, tok = tiny_llama
    ids = tokenize_text(tok, TEXT)[:200]
    res = perplexity(model, tok, text_file, seqlen=200, max_tokens=200, progress=False)
    nll = _hand_nll(model, ids)
    assert res.tokens == 199 and res.text_tokens == 200
    assert res.nll_per_token == pytest.approx(float(nll.mean()), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


@pytest.mark.parametrize("seqlen,stride,batch", [(64, 64, 4), (64, 64, 1), (48, 16, 3), (40, 7, 2)])
def test_perplexity_windows_equal_hand_loop(tiny_llama, text_file, seqlen, stride, batch):
    model, tok = tiny_llama
    n = 230
    ids = tokenize_text(tok, TEXT)[:n]
    total, count = 0.0, 0
    for begin, end, first in windows(n, seqlen, stride):
        nll = _hand_nll(model, ids[begin:end])  # nll[j] is the NLL of token begin + j + 1
        total += float(nll[first - begin - 1 :].sum())
        count += end - first
    res = perplexity(model, tok, text_file, seqlen=seqlen, stride=stride, max_tokens=n, batch_size=batch, progress=False)
    assert res.tokens == count
    assert res.nll_per_token == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("n,seqlen,stride", [(230, 64, 64), (230, 48, 16), (100, 40, 7), (64, 64, 64), (65, 64, 32), (10, 64, 64)])
def test_windows_score_every_token_once(n, seqlen, stride):
    targets = [t for b, e, f in windows(n, seqlen, stride) for t in range(f, e)]
    if stride == seqlen:  # non-overlapping: the first token of every window is context only
        assert targets == [t for t in range(1, n) if t % seqlen != 0]
    else:
        assert targets == list(range(1, n))
    for b, e, f in windows(n, seqlen, stride):
        assert e - b <= seqlen and b < f <= e


def test_strided_has_more_targets_and_context(tiny_llama, text_file):
    model, tok = tiny_llama
    dense = perplexity(model, tok, text_file, seqlen=64, max_tokens=256, progress=False)
    strided = perplexity(model, tok, text_file, seqlen=64, stride=16, max_tokens=256, progress=False)
    assert dense.tokens == 256 - 4 and strided.tokens == 255
    assert dense.sha256 == strided.sha256 and strided.stride == 16


def test_perplexity_result_roundtrip(tmp_path, tiny_llama, text_file):
    model, tok = tiny_llama
    res = perplexity(model, tok, text_file, seqlen=32, max_tokens=100, progress=False)
    res.save(tmp_path / "p.json")
    assert PerplexityResult.from_dict(json.loads((tmp_path / "p.json").read_text())) == res


def test_perplexity_bad_input(tiny_llama, text_file, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(LayercapError, match="stride"):
        perplexity(model, tok, text_file, seqlen=32, stride=33)
    with pytest.raises(LayercapError, match="positions"):
        perplexity(model, tok, text_file, seqlen=1024)
    with pytest.raises(LayercapError, match="does not exist"):
        perplexity(model, tok, tmp_path / "missing.txt", seqlen=32)


# ---------------------------------------------------------------------------------------------
# multiple choice


def _hand_loglik(model, tok, context: str, continuation: str) -> float:
    """Continuation log-likelihood by one full forward of context + continuation."""
    ctx, cont = encode_pair(tok, context, continuation)
    ids = torch.tensor(ctx + cont)
    return -float(_hand_nll(model, ids)[len(ctx) - 1 :].sum())


ITEMS = [
    MCItem("The quick brown fox", [" jumps", " sleeps over the dog", " x"], 0),
    MCItem("Pruning removes ", ["weights", "experts; capacity"], 1),  # trailing space moves to the continuation
    MCItem("", [" The dog", " A fox."], 0),  # empty context -> BOS prefix
    MCItem("The lazy dog", [" is", " was"], 1, choice_contexts=["The lazy dog is", "The lazy cat"], continuation=" over there."),
]


def test_encode_pair_boundary(tiny_llama):
    _, tok = tiny_llama
    ctx, cont = encode_pair(tok, "Pruning removes ", "weights")
    whole = tok("Pruning removes weights", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole and ctx == tok("Pruning removes", add_special_tokens=False)["input_ids"]
    ctx, cont = encode_pair(tok, "", " The dog")
    assert ctx == [tok.bos_token_id] and cont == tok(" The dog", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2", "qwen3", "phi"])
@pytest.mark.parametrize("share", [True, False])
def test_mc_scores_equal_hand_loop(family, share):
    model, tok = build_tiny(family, num_layers=2)
    task = Task("t", ITEMS, 0.0, "mem")
    hand = [[_hand_loglik(model, tok, c, k) for c, k in it.requests()] for it in ITEMS]
    got = [loglikelihoods(model, tok, it.requests(), batch_size=2, progress=False) for it in ITEMS]
    for h, g in zip(hand, got):
        assert g == pytest.approx(h, rel=1e-4, abs=1e-4)
    res = evaluate_task(model, tok, task, batch_size=3, progress=False, share_context=share)
    expect = [item_metrics(h, it) for h, it in zip(hand, ITEMS)]
    assert res.acc == pytest.approx(sum(a for a, _ in expect) / len(ITEMS))
    assert res.acc_norm == pytest.approx(sum(b for _, b in expect) / len(ITEMS))
    assert res.n == 4


def test_acc_norm_hand_example():
    item = MCItem("Q", [" a", " bbbb", " cc"], 1)
    # raw: choice 0 wins (-2 > -4); per character: -2/1, -4/4 = -1, -3.5/2 -> choice 1 wins
    assert item_metrics([-2.0, -4.0, -3.5], item) == (0.0, 1.0)
    assert [choice_length(c) for c in item.choices] == [1, 4, 2]
    # ties go to the first choice, as numpy.argmax in the harness
    assert item_metrics([-1.0, -1.0, -5.0], MCItem("Q", [" a", " b", " c"], 0)) == (1.0, 1.0)


def test_evaluate_model_and_roundtrip(tmp_path, tiny_llama, text_file):
    model, tok = tiny_llama
    f = tmp_path / "toy.jsonl"
    f.write_text("\n".join(json.dumps(it.to_dict()) for it in ITEMS[:3]) + "\n")
    res = evaluate_model(model, tok, ppl=[text_file], tasks=[f, f], seqlen=32, max_tokens=100, batch_size=2, model_name="tiny", progress=False)
    assert set(res.ppl) == {"text.txt"} and set(res.tasks) == {"toy", "toy#2"}
    assert res.tasks["toy"].acc == res.tasks["toy#2"].acc
    res.save(tmp_path / "eval.json")
    back = EvalResult.load(tmp_path / "eval.json")
    assert back.to_dict() == res.to_dict()
    assert json.loads((tmp_path / "eval.json").read_text())["schema"] == "layercap.eval/v1"
    with pytest.raises(LayercapError, match="schema"):
        EvalResult.from_dict({"schema": "x"})


def _tr(name, acc, n=100, chance=0.25):
    se = math.sqrt(acc * (1 - acc) / (n - 1))
    return TaskResult(name, acc, acc, se, se, n, chance, "mem", "")


def test_above_chance_and_reference():
    tasks = {"good": _tr("good", 0.45), "chance": _tr("chance", 0.27), "bad": _tr("bad", 0.30, chance=0.5)}
    assert above_chance_tasks(tasks) == ["good"]  # 0.27 - 0.25 < 2 * 0.045
    pruned = EvalResult("pruned", tasks={"good": _tr("good", 0.30), "chance": _tr("chance", 0.40), "bad": _tr("bad", 0.1, chance=0.5)})
    dense = EvalResult("dense", tasks=tasks)
    ref = pruned.with_reference(dense)
    assert ref.above_chance == ["good"] and ref.reference == "dense"
    assert ref.mean_acc_above_chance == pytest.approx(0.30)
    assert ref.mean_acc == pytest.approx((0.30 + 0.40 + 0.1) / 3)
    assert EvalResult("none").mean_acc is None and EvalResult("none").mean_acc_above_chance is None


def test_evaluate_cli(tmp_path, text_file):
    from layercap.cli import main

    model, tok = build_tiny("llama", num_layers=2)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    f = tmp_path / "toy.jsonl"
    f.write_text("\n".join(json.dumps(it.to_dict()) for it in ITEMS[:3]) + "\n")
    out = tmp_path / "eval.json"
    rc = main([
        "evaluate", str(tmp_path / "m"), "--ppl", str(text_file), "--seqlen", "32", "--max-tokens", "100",
        "--tasks", str(f), "--limit", "2", "--batch-size", "2", "-o", str(out), "--quiet",
    ])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["tasks"]["toy"]["n"] == 2 and doc["ppl"]["text.txt"]["tokens"] == 100 - 4
    # bad input: error code 2 and nothing written
    bad = tmp_path / "bad.json"
    for args in (
        ["--tasks", str(tmp_path / "missing.jsonl")],
        ["--ppl", str(tmp_path / "missing.txt")],
        ["--ppl", str(text_file), "--stride", "999"],
        [],
        ["--tasks", str(f), "--lm-eval", "no_such_task"],
    ):
        rc = main(["evaluate", str(tmp_path / "m"), *args, "-o", str(bad), "--quiet"])
        assert rc == 2 and not bad.exists()
