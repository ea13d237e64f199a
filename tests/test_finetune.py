"""Fine-tuning: answer-only labels, training lowers the loss, resume equals an uninterrupted run,
bad input writes nothing, the CLI end to end (tiny models, a few steps)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from layercap.apply.finetune import Collator, FinetuneOptions, answer_token_loss
from layercap.data.instruction import encode_example, instruction_task, render_prompt
from layercap.experiments.finetune_job import FinetuneResult, finetune
from layercap.errors import LayercapError
from layercap.models import find_blocks
from layercap.models.tiny import build_tiny, tiny_tokenizer

TASKS = "../shared/data/tasks"


@pytest.fixture()
def arc(shared_data):
    return shared_data / "tasks" / "ARC-Easy"


def _counts(model, values=(1, 2, 3, 2)):
    return {b.name: v for b, v in zip(find_blocks(model), values)}


def _opts(**kw):
    base = dict(adapter="moe", rank=2, max_steps=4, batch_size=4, max_length=64, limit_train=24,
                limit_eval=12, lr=1e-2, save_steps=2, progress=False)
    base.update(kw)
    return FinetuneOptions(**base)


def test_labels_cover_answer_tokens_only():
    tok = tiny_tokenizer()
    ex = encode_example(tok, "Pick one: a or b", "the correct answer is answer1", max_length=200)
    n_prompt = len(tok(render_prompt("Pick one: a or b"), add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id
    n_answer = len(ex["input_ids"]) - n_prompt
    short = encode_example(tok, "Pick one: a or b " * 20, "the correct answer is answer1", max_length=n_answer + 3)
    assert len(short["input_ids"]) == n_answer + 3  # prompt cut from the left, answer kept whole
    assert short["input_ids"][-n_answer:] == ex["input_ids"][-n_answer:] and short["labels"][:3] == [-100] * 3
    tiny = encode_example(tok, "Pick", "the correct answer is answer1", max_length=8)
    assert len(tiny["input_ids"]) == 8 and tiny["labels"][0] == -100 and tiny["input_ids"][-1] == tok.eos_token_id
    batch = Collator(0)([ex, short])
    assert batch["input_ids"].shape == (2, len(ex["input_ids"]))
    k = len(short["input_ids"])
    assert (batch["labels"][1, k:] == -100).all() and (batch["attention_mask"][1, k:] == 0).all()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt", "peft"])
def test_answer_token_loss_equals_full_logits_loss(family):
    """The answer-positions-only head gives Hugging Face's full-logits loss and its gradients."""
    tok = tiny_tokenizer()
    model, _ = build_tiny("llama" if family == "peft" else family)
    if family == "peft":
        from layercap.apply.peft_lora import apply_peft_lora

        model, _ = apply_peft_lora(model, _counts(model), rank_unit=2, targets=("q_proj", "down_proj"))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)  # nonzero, so the adapter path matters
    else:
        model.requires_grad_(True)
    batch = Collator(0)([encode_example(tok, f"Question {i}: pick a or b", "the answer is b" * (i + 1), 64)
                         for i in range(3)])
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, params)
    loss, out = answer_token_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    n_answer = int((batch["labels"][:, 1:] != -100).sum())
    assert out.logits.shape[:2] == (1, n_answer)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # the hook is removed: a plain forward gives full-length logits again
    assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]


def test_instruction_task_choices(arc):
    from layercap.data.tasks import load_task

    task = load_task(arc / "test.json", limit=5)
    inst = instruction_task(task)
    assert [len(i.choices) for i in inst.items] == [len(i.choices) for i in task.items]
    for it, orig in zip(inst.items, task.items):
        assert it.choices[it.label] == orig.answer  # the right answer string is the labelled choice
        assert it.context.endswith("### Response:\n")


def test_finetune_moe_trains_and_writes(arc, tmp_path):
    model, tok = build_tiny("llama")
    result = finetune(model, tok, _counts(model), arc / "train.json", tmp_path / "run", _opts(max_steps=8),
                      eval_path=arc / "test.json")
    curve = [c["lm_loss"] for c in result.train_loss]
    assert len(curve) == 8 and curve[-1] < curve[0]
    assert all(c["aux_loss"] > 0 for c in result.train_loss)
    loaded = FinetuneResult.load(tmp_path / "run" / "finetune.json")
    assert loaded.steps == 8 and loaded.eval["instruction"]["n"] == 12 and 0 <= loaded.acc <= 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists()
    cfg = json.loads((tmp_path / "run" / "adapter" / "lora_moe_config.json").read_text())
    assert cfg["schema"] == "layercap.lora_moe/v1" and cfg["counts"] == _counts(model)


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt


@pytest.mark.parametrize("adapter", ["moe", "lora"])
def test_resume_equals_uninterrupted(arc, tmp_path, adapter):
    def run(out, **kw):
        model, tok = build_tiny("llama")
        return finetune(model, tok, _counts(model), arc / "train.json", out, _opts(adapter=adapter), **kw)

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callbacks=[_Interrupt()])
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(LayercapError, match="--resume"):
        run(tmp_path / "cut")
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed.resumed_from.endswith("checkpoint-2")
    assert [c["loss"] for c in resumed.train_loss] == pytest.approx([c["loss"] for c in full.train_loss], rel=1e-6)
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_lora_adapter_has_allocated_ranks(arc, tmp_path):
    model, tok = build_tiny("llama")
    counts = _counts(model, (0, 1, 3, 2))
    finetune(model, tok, counts, arc / "train.json", tmp_path / "lora", _opts(adapter="lora", max_steps=2))
    cfg = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    want = {n: 2 * c for n, c in counts.items() if c}
    got = {}
    for key, r in cfg["rank_pattern"].items():
        block = key[1:-1].replace("\\", "").rsplit(".", 2)[0]
        got.setdefault(block, set()).add(r)
    assert {b: rs.pop() for b, rs in got.items() if len(rs) == 1} == want


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda c: {**c, "model.layers.7": 1}, "lacks"),
        (lambda c: {k: 0 for k in c}, "nothing to adapt"),
    ],
)
def test_bad_allocation_writes_nothing(arc, tmp_path, change, needle):
    model, tok = build_tiny("llama")
    with pytest.raises(LayercapError, match=needle):
        finetune(model, tok, change(_counts(model)), arc / "train.json", tmp_path / "out", _opts())
    assert not (tmp_path / "out").exists()


def test_unknown_targets_write_nothing(arc, tmp_path):
    model, tok = build_tiny("llama")
    with pytest.raises(LayercapError, match="wq"):
        finetune(model, tok, _counts(model), arc / "train.json", tmp_path / "out", _opts(targets=["wq"]))
    assert not (tmp_path / "out").exists()


def _tiny_dir(tmp_path):
    model, tok = build_tiny("llama")
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", [b.name for b in find_blocks(model)]


def _allocation(path, names, ns):
    doc = {"schema": "layercap.allocation/v1", "rule": "manual", "budget": float(sum(ns)), "unit": "experts",
           "integer": True, "layers": [{"name": n, "n": v, "cost": 1.0} for n, v in zip(names, ns)],
           "mu": None, "binds": True, "spent": float(sum(ns)), "metadata": {}}
    path.write_text(json.dumps(doc))
    return path


def test_cli_finetune(arc, tmp_path, capsys):
    from layercap.cli import main

    model_dir, names = _tiny_dir(tmp_path)
    alloc = _allocation(tmp_path / "alloc.json", names, [1, 2, 2, 3])
    argv = ["finetune", str(model_dir), "--allocation", str(alloc), "--adapter", "moe", "--rank", "2",
            "--train", str(arc / "train.json"), "--eval", str(arc / "test.json"), "--max-steps", "3",
            "--batch-size", "4", "--max-length", "64", "--limit-train", "16", "--limit-eval", "8",
            "--no-progress", "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "instruction" in out and "acc" in out
    rec = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert rec["schema"] == "layercap.finetune/v1" and rec["steps"] == 3
    assert [l["n"] for l in rec["allocation"]["layers"]] == [1, 2, 2, 3]
    # bad: no expert anywhere -> exit 2, nothing written
    bad = _allocation(tmp_path / "bad.json", names, [0, 0, 0, 0])
    assert main(argv[:3] + [str(bad)] + argv[4:-1] + [str(tmp_path / "bad_out")]) == 2
    assert "nothing to adapt" in capsys.readouterr().err
    assert not (tmp_path / "bad_out").exists()
    # a block may have 0 experts: it trains without an adapter there
    skip = _allocation(tmp_path / "skip.json", names, [0, 2, 2, 3])
    assert main(argv[:3] + [str(skip)] + argv[4:-1] + [str(tmp_path / "skip_out")]) == 0
    rec = json.loads((tmp_path / "skip_out" / "finetune.json").read_text())
    assert [l["n"] for l in rec["allocation"]["layers"]] == [0, 2, 2, 3]


def test_shared_prefix_scoring_equals_choice_by_choice(arc, shared_data):
    from layercap.evaluate.shared_prefix import score_shared_prefix
    from layercap.data.tasks import load_task
    from layercap.evaluate.multiple_choice import evaluate_task, loglikelihoods

    model, tok = build_tiny("llama", seed=3)
    for path in (arc / "test.json", shared_data / "tasks" / "boolq" / "test.json"):
        inst = instruction_task(load_task(path, limit=10))
        fast = score_shared_prefix(model, tok, inst, batch_size=4, progress=False)
        slow = evaluate_task(model, tok, inst, batch_size=4, progress=False)
        assert (fast.acc, fast.acc_norm, fast.n) == (slow.acc, slow.acc_norm, slow.n)
        assert fast.acc_stderr == pytest.approx(slow.acc_stderr, nan_ok=True)
    # and the log-likelihoods themselves agree with choice-by-choice scoring
    from layercap.evaluate.shared_prefix import shared_prefix_logliks

    got = shared_prefix_logliks(model, tok, inst, batch_size=3, progress=False)
    for it, ll in zip(inst.items, got):
        ref = loglikelihoods(model, tok, it.requests(), batch_size=1, progress=False)
        assert ll == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_a_failed_first_attempt_leaves_nothing(arc, tmp_path):
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("disk full")

    model, tok = build_tiny("llama")
    with pytest.raises(RuntimeError, match="disk full"):
        finetune(model, tok, _counts(model), arc / "train.json", tmp_path / "out", _opts(), callbacks=[Boom()])
    assert not (tmp_path / "out").exists()  # the corrected rerun is not blocked by leftovers


def test_resume_skips_a_truncated_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from layercap.apply.finetune import last_complete_checkpoint

    for step in (2, 4):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        save_file({"w": torch.randn(64, 64)}, str(d / "adapter.safetensors"))
        (d / "trainer_state.json").write_text("{}")
    newest = tmp_path / "checkpoint-4" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # killed mid-write
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def _train_order(tmp_path, **kw) -> list[list[int]]:
    """The example indices of the first batches the Trainer would feed, for these options."""
    import torch.nn as nn

    from layercap.apply.finetune.trainer import make_trainer_class, training_args

    options = _opts(**kw)
    torch.manual_seed(options.seed)  # as train_adapter does before injecting the adapter
    data = [{"input_ids": [i + 1, 1], "labels": [i + 1, 1]} for i in range(24)]
    trainer = make_trainer_class()(model=nn.Linear(1, 1), args=training_args(tmp_path / f"ck{kw}", options, 6),
                                   train_dataset=data, data_collator=Collator(0), moe_config=None)
    return [(batch["input_ids"][:, 0] - 1).tolist() for batch in trainer.get_train_dataloader()][:6]


def test_data_seed_fixes_the_order_across_seeds(tmp_path):
    fixed = [_train_order(tmp_path, seed=s, data_seed=7) for s in (0, 1)]
    free = [_train_order(tmp_path, seed=s) for s in (0, 1)]
    assert fixed[0] == fixed[1]
    assert free[0] != free[1]
    assert sorted(sum(fixed[0][:6], [])) == list(range(24))  # a permutation: 6 batches of 4 = one epoch
    assert FinetuneOptions(seed=3).order_seed == 3 and FinetuneOptions(seed=3, data_seed=5).order_seed == 5
