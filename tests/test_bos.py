"""BOS per model (issue 15): windows and requests start with BOS exactly when they should, the
scored targets are the same tokens either way, and the numbers equal hand loops.

Tokenizers are real configs written by hand (tokenizer.json + tokenizer_config.json of the
family's tokenizer class, loaded with AutoTokenizer), paired with tiny random-init models.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from layercap.data.bos import BosChoice, resolve_bos, tokenizer_adds_bos
from layercap.errors import LayercapError

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz") + ["\u2581"]
BOS_ID = 1

# (model family, tokenizer class, tokenizer_config add_bos_token, bos token, BOS under auto)
CASES = [
    ("gemma", "GemmaTokenizer", True, "<bos>", True),
    ("gemma2", "GemmaTokenizer", True, "<bos>", True),
    ("gemma3", "GemmaTokenizer", False, "<bos>", True),  # family rule: Gemma gets BOS whatever the config says
    ("llama", "LlamaTokenizer", True, "<bos>", True),  # Llama 1/2, Mistral: the tokenizer adds BOS
    ("llama", "LlamaTokenizer", False, "<bos>", False),  # SmolLM2-like: Llama family, no BOS by default
    ("llama", "PreTrainedTokenizerFast", True, "<bos>", True),  # Llama 3 style: post-processor adds BOS
    ("qwen2", "Qwen2Tokenizer", False, None, False),  # Qwen: no BOS token at all
    ("gpt2", "GPT2Tokenizer", False, "<bos>", False),
]


def make_tokenizer(tmp_path, cls: str, add_bos: bool, bos: str | None):
    """A character-level tokenizer saved as a real HF tokenizer folder of class ``cls``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer

    folder = tmp_path / f"tok-{cls}-{add_bos}"
    folder.mkdir()
    vocab = {w: i for i, w in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": cls, "bos_token": bos, "eos_token": "<eos>", "pad_token": "<pad>",
              "unk_token": "<unk>", "add_bos_token": add_bos, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def make_model(family: str):
    from layercap.models.tiny import build_tiny

    model, _ = build_tiny(family, num_layers=2, hidden=32)
    return model


@pytest.fixture()
def text_file(tmp_path):
    words = "the quick brown fox jumps over the lazy dog while layer capacity decides where weights go".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(120))
    path = tmp_path / "text.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("family,cls,add,bos,expect", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_auto_decides_like_the_harness(tmp_path, family, cls, add, bos, expect):
    tok = make_tokenizer(tmp_path, cls, add, bos)
    model = make_model(family)
    assert tokenizer_adds_bos(tok) == (add and bos is not None)
    choice = resolve_bos("auto", tok, model)
    assert choice.add is expect
    assert choice.token_id == (BOS_ID if expect else None)
    assert resolve_bos("never", tok, model).add is False
    if bos is None:
        with pytest.raises(LayercapError, match="no BOS token"):
            resolve_bos("always", tok, model)
    else:
        assert resolve_bos("always", tok, model) == BosChoice("always", True, BOS_ID, "--bos always")
    # record round trip
    assert BosChoice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice


def test_bad_policy_and_record():
    with pytest.raises(LayercapError, match="choose one of auto, always, never"):
        resolve_bos("sometimes")
    with pytest.raises(LayercapError, match="integer token id"):
        BosChoice("always", True, None)


@pytest.mark.parametrize("family,cls,add,bos,expect", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_calibration_windows(tmp_path, text_file, family, cls, add, bos, expect):
    from layercap.data.calibration import calibration_set

    tok = make_tokenizer(tmp_path, cls, add, bos)
    model = make_model(family)
    auto = calibration_set(tok, text_file, nsamples=6, seqlen=24, seed=3, bos="auto", model=model)
    never = calibration_set(tok, text_file, nsamples=6, seqlen=24, seed=3, bos="never", model=model)
    assert auto.input_ids.shape == never.input_ids.shape == (6, 24)
    # the windows start with BOS exactly when they should ...
    assert bool((auto.input_ids[:, 0] == BOS_ID).all()) is expect
    assert not bool((never.input_ids == BOS_ID).any())
    # ... and the targets (positions 1..seqlen-1) are the same tokens either way
    assert torch.equal(auto.input_ids[:, 1:], never.input_ids[:, 1:])
    assert (auto.sha256 != never.sha256) is expect
    assert auto.bos.add is expect and auto.metadata()["bos"]["add"] is expect
    assert auto.shard(0, 2).bos == auto.bos and auto.subset(slice(0, 2)).bos == auto.bos


def _hand_ppl(model, tokens: torch.Tensor, seqlen: int, bos_id: int | None) -> tuple[float, int, list[int]]:
    """Non-overlapping windows, each window's first position context only; BOS replaces it."""
    total, count, targets = 0.0, 0, []
    for b in range(0, tokens.numel(), seqlen):
        seg = tokens[b : b + seqlen]
        if seg.numel() < 2:
            continue
        inp = seg.clone()
        if bos_id is not None:
            inp[0] = bos_id
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=inp[None]).logits[0].double(), dim=-1)
        for i in range(1, seg.numel()):
            total -= float(logp[i - 1, seg[i]])
            count += 1
            targets.append(b + i)
    return math.exp(total / count), count, targets


@pytest.mark.parametrize("family,cls,add", [("gemma", "GemmaTokenizer", True), ("gpt2", "GPT2Tokenizer", False),
                                            ("llama", "LlamaTokenizer", True)])
def test_perplexity_equals_hand_loop(tmp_path, text_file, family, cls, add):
    from layercap.data.calibration import read_text, tokenize_text
    from layercap.evaluate.perplexity import perplexity, windows

    tok = make_tokenizer(tmp_path, cls, add, "<bos>")
    model = make_model(family)
    tokens = tokenize_text(tok, read_text(text_file))
    for policy in ("always", "never"):
        r = perplexity(model, tok, text_file, seqlen=32, batch_size=3, progress=False, bos=policy)
        hand, n, targets = _hand_ppl(model, tokens, 32, BOS_ID if policy == "always" else None)
        assert r.tokens == n and r.bos["add"] is (policy == "always")
        assert r.ppl == pytest.approx(hand, rel=1e-5)
        # the scored targets are the same set of positions whatever the policy
        assert targets == [t for _, e, f in windows(tokens.numel(), 32, 32) for t in range(f, e)]
    r_always = perplexity(model, tok, text_file, seqlen=32, progress=False, bos="always")
    r_never = perplexity(model, tok, text_file, seqlen=32, progress=False, bos="never")
    assert r_always.tokens == r_never.tokens and r_always.ppl != r_never.ppl
    assert r_always.sha256 != r_never.sha256
    # strided windows: same target count with and without BOS
    s_a = perplexity(model, tok, text_file, seqlen=32, stride=8, progress=False, bos="always")
    s_n = perplexity(model, tok, text_file, seqlen=32, stride=8, progress=False, bos="never")
    assert s_a.tokens == s_n.tokens == tokens.numel() - 1


def test_perplexity_result_reads_old_records(tmp_path, text_file):
    from layercap.evaluate.perplexity import PerplexityResult, perplexity

    tok = make_tokenizer(tmp_path, "GemmaTokenizer", True, "<bos>")
    r = perplexity(make_model("gemma"), tok, text_file, seqlen=32, progress=False)
    d = r.to_dict()
    assert PerplexityResult.from_dict(d) == r
    del d["bos"]
    assert PerplexityResult.from_dict(d).bos is None
    del d["ppl"]
    with pytest.raises(LayercapError, match="lacks ppl"):
        PerplexityResult.from_dict(d)


@pytest.mark.parametrize("share", [True, False])
def test_mc_requests_start_with_bos(tmp_path, share):
    from layercap.data.tasks import MCItem, Task
    from layercap.evaluate.multiple_choice import encode_pair, evaluate_task, loglikelihoods

    tok = make_tokenizer(tmp_path, "GemmaTokenizer", True, "<bos>")
    model = make_model("gemma")
    choice = resolve_bos("auto", tok, model)
    ctx, cont = encode_pair(tok, "the quick fox", " jumps over", choice)
    ctx0, cont0 = encode_pair(tok, "the quick fox", " jumps over", BosChoice())
    assert ctx == [BOS_ID] + ctx0 and cont == cont0  # same scored continuation tokens
    assert encode_pair(tok, "", " dog", choice)[0] == [BOS_ID]
    # log-likelihood equals a hand loop over [BOS] + context + continuation
    requests = [("the quick fox", " jumps over"), ("the quick fox", " lazy dog"), ("a dog", " runs")]
    got = loglikelihoods(model, tok, requests, batch_size=2, progress=False, bos="auto")
    for (c, k), value in zip(requests, got):
        cids, kids = encode_pair(tok, c, k, choice)
        assert cids[0] == BOS_ID
        ids = torch.tensor([cids + kids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        hand = sum(float(logp[len(cids) - 1 + j, t]) for j, t in enumerate(kids))
        assert value == pytest.approx(hand, abs=1e-4)
    items = [MCItem("the quick fox", [" jumps", " sleeps", " runs"], 0), MCItem("a lazy", [" dog", " fox"], 1)]
    task = Task("t", items, 0.5, "mem")
    res = evaluate_task(model, tok, task, batch_size=2, progress=False, share_context=share, bos="auto")
    assert res.bos["add"] is True
    never = evaluate_task(model, tok, task, batch_size=2, progress=False, share_context=share, bos="never")
    assert never.bos["add"] is False


def test_mc_truncation_keeps_bos():
    from layercap.evaluate.multiple_choice import _inputs

    bos = BosChoice("always", True, 1)
    ctx, cont = [1, 10, 11, 12, 13, 14], [20, 21]
    assert _inputs(ctx, cont, 100, bos) == [1, 10, 11, 12, 13, 14, 20]
    assert _inputs(ctx, cont, 4, bos) == [1, 13, 14, 20]
    assert _inputs([10, 11, 12, 13, 14], cont, 4, BosChoice()) == [12, 13, 14, 20]


def test_score_cli_records_bos(tmp_path, text_file):
    """tiny-gemma (tokenizer without BOS by default): auto adds BOS by the family rule; the
    predicted-token count is the same as with --bos never; the choice is in the metadata and hash."""
    from layercap.cli import main

    docs = {}
    for policy in ("auto", "never"):
        out = tmp_path / f"{policy}.json"
        rc = main(["score", "tiny-gemma", "--method", "gradnorm", "--data", str(text_file), "--nsamples", "2",
                   "--seqlen", "16", "--bos", policy, "-o", str(out), "--quiet"])
        assert rc == 0
        docs[policy] = json.loads(out.read_text())["metadata"]
    assert docs["auto"]["bos"]["add"] is True and docs["never"]["bos"]["add"] is False
    assert docs["auto"]["predicted_tokens"] == docs["never"]["predicted_tokens"] == 2 * 15
    assert docs["auto"]["data_sha256"] != docs["never"]["data_sha256"]


def test_prune_and_evaluate_cli_record_bos(tmp_path, text_file):
    from layercap.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "tiny-gemma", "--sparsity", "0.5", "--method", "wanda", "--data", str(text_file),
                 "--nsamples", "2", "--seqlen", "16", "--quiet", "-o", str(out)]) == 0
    calibration = json.loads((out / "pruning.json").read_text())["calibration"]
    assert calibration["bos"]["add"] is True and calibration["bos"]["policy"] == "auto"
    ev = tmp_path / "eval.json"
    assert main(["evaluate", "tiny-gpt2", "--ppl", str(text_file), "--seqlen", "32", "--bos", "always", "--quiet", "-o", str(ev)]) == 0
    doc = json.loads(ev.read_text())
    assert doc["settings"]["bos"]["policy"] == "always" and doc["ppl"]["text.txt"]["bos"]["add"] is True


def test_shared_context_equals_plain_with_bos(tmp_path):
    """The KV-cache path (one context pass) and the independent rows agree when contexts start with BOS."""
    from layercap.evaluate.multiple_choice import _score_groups

    tok = make_tokenizer(tmp_path, "GemmaTokenizer", True, "<bos>")
    model = make_model("gemma2")
    groups = [[("the quick fox", " jumps"), ("the quick fox", " sleeps over"), ("the quick fox", " x")],
              [("a lazy", " dog"), ("a lazy", " fox runs")]]
    shared = _score_groups(model, tok, groups, 4, None, False, "t", share=True, bos="auto")
    plain = _score_groups(model, tok, groups, 4, None, False, "t", share=False, bos="auto")
    never = _score_groups(model, tok, groups, 4, None, False, "t", share=False, bos="never")
    for s, p in zip(shared, plain):
        assert s == pytest.approx(p, abs=1e-4)
    assert any(abs(a - b) > 1e-4 for g, h in zip(plain, never) for a, b in zip(g, h))  # the BOS matters
