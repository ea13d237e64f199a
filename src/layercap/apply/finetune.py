"""Fine-tune LoRA-MoE or PEFT LoRA adapters with per-layer capacity, then score the eval split.

Training data: ``Task.training_examples()`` (prompt, answer) pairs rendered with the Alpaca
template that LoRA fine-tuning papers (LLM-Adapters, MoLA) use::

    Below is an instruction that describes a task. Write a response that appropriately
    completes the request.\\n\\n### Instruction:\\n{prompt}\\n\\n### Response:\\n{answer}<eos>

The loss is the mean NLL of the answer tokens only (labels are -100 on prompt tokens and
padding); LoRA-MoE adds ``aux_coef`` x the mean Switch load-balancing loss. Long examples keep
the answer and lose prompt tokens from the left. Output logits are computed for the answer
positions only (:func:`answer_token_loss`), which gives the same loss and gradients as full
logits at a fraction of the vocabulary-projection cost.

Training runs in ``transformers.Trainer`` (linear LR decay, AdamW, seeded data order) with
checkpoints under ``OUTDIR/checkpoints``; ``resume=True`` continues from the newest complete
checkpoint (one whose ``trainer_state.json``, written last by Trainer, parses) with the
optimizer, scheduler, RNG and data position restored, so the result equals an uninterrupted run.

Evaluation (``eval_format``):
  * ``instruction``: the trained format. Each item's prompt is rendered as above and the
    candidate answers "the correct answer is answer1" .. "answerN" (or true/false) are scored by
    log-likelihood with :func:`layercap.evaluate.multiple_choice.evaluate_task`. This is what
    fine-tuning changes, so it is the headline accuracy.
  * ``zero-shot``: the lm-evaluation-harness prompts of :mod:`layercap.data.tasks` (unchanged
    base-model protocol), to see whether the adapter also moved general choice scoring.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercap.errors import LayercapError
from layercap.io import atomic_write_json, read_json
from layercap.models.load import model_source

SCHEMA = "layercap.finetune/v1"
ADAPTERS = ("moe", "lora")
EVAL_FORMATS = ("instruction", "zero-shot", "both")
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)
CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"
RESULT_FILE = "finetune.json"
RUN_FILE = "run_config.json"


def render_prompt(prompt: str) -> str:
    return TEMPLATE.format(prompt=prompt)


@dataclass
class FinetuneOptions:
    """Training and evaluation settings. ``max_steps`` > 0 overrides ``epochs``. ``alpha`` None = 2 x rank."""

    adapter: str = "moe"
    rank: int = 8
    alpha: float | None = None
    top_k: int = 2
    aux_coef: float = 0.01
    targets: list[str] | None = None
    kernel: str = "dense"
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    limit_train: int | None = None
    limit_eval: int | None = None
    eval_batch_size: int = 8
    eval_format: str = "instruction"
    save_steps: int | None = None  # None: about 5 checkpoints per run
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    progress: bool = True

    def validate(self) -> None:
        if self.adapter not in ADAPTERS:
            raise LayercapError(f"--adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}.")
        if self.eval_format not in EVAL_FORMATS:
            raise LayercapError(f"--eval-format must be one of {', '.join(EVAL_FORMATS)}, got {self.eval_format!r}.")
        checks = [
            (self.rank >= 1, f"--rank must be >= 1, got {self.rank}"),
            (self.top_k >= 1, f"--top-k must be >= 1, got {self.top_k}"),
            (self.aux_coef >= 0, f"--aux-coef must be >= 0, got {self.aux_coef}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.max_length >= 8, f"--max-length must be >= 8, got {self.max_length}"),
            (self.max_steps > 0 or self.epochs > 0, "give --epochs > 0 or --max-steps > 0"),
            (self.alpha is None or self.alpha > 0, f"--alpha must be > 0, got {self.alpha}"),
            (self.limit_train is None or self.limit_train >= 1, f"--limit-train must be >= 1, got {self.limit_train}"),
            (self.limit_eval is None or self.limit_eval >= 1, f"--limit-eval must be >= 1, got {self.limit_eval}"),
            (self.save_steps is None or self.save_steps >= 1, f"--save-steps must be >= 1, got {self.save_steps}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LayercapError(msg + ".")

    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneOptions":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class FinetuneResult:
    """What a fine-tuning run did. Accuracies in [0, 1]; ``train_loss``: per logged step
    ``{"step", "loss" (total), "lm_loss" (answer-token NLL, nats), "aux_loss"}``; wall time in s."""

    model_source: str | None
    adapter: str
    allocation: dict[str, Any]
    options: dict[str, Any]
    steps: int
    train_examples: int
    train_source: str
    trainable_params: int
    train_loss: list[dict[str, float]]
    eval: dict[str, dict] = field(default_factory=dict)
    acc: float | None = None
    acc_norm: float | None = None
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    seed: int = 0
    resumed_from: str | None = None
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        d = _no_nan(asdict(self))
        d["schema"] = SCHEMA
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneResult":
        if d.get("schema") != SCHEMA:
            raise LayercapError(f"not a fine-tuning record: schema {d.get('schema')!r}, expected {SCHEMA!r}.")
        missing = [k for k in ("adapter", "allocation", "options", "steps", "train_loss") if k not in d]
        if missing:
            raise LayercapError(f"fine-tuning record lacks {missing}; rerun finetune.")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FinetuneResult":
        return cls.from_dict(read_json(path, "fine-tuning result", "Run `layercap finetune` first."))


def _no_nan(obj):
    """JSON has no NaN: undefined statistics (e.g. a standard error of one item) become null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


# ---- data ---------------------------------------------------------------------------------
def encode_example(tokenizer, prompt: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of rendered prompt + answer + eos and labels (-100 on the prompt)."""
    p = tokenizer(render_prompt(prompt), add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    a = a[: max_length - 1 - len(eos)] + eos  # at least one prompt token stays as context
    p = p[-(max_length - len(a)):]  # keep the answer; drop prompt tokens from the left
    return {"input_ids": p + a, "labels": [-100] * len(p) + a}


class Collator:
    """Right-pads a list of encoded examples: input_ids, attention_mask, labels (-100 on padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


_KEY = re.compile(r"([a-z]+)(\d+)")


def instruction_task(task):
    """The task re-expressed in the trained format: context = rendered prompt, choices = answers.

    Returns None when an item's answer does not name a choice key (answerN / optionN / true/false).
    """
    from layercap.data.tasks import MCItem, Task

    items = []
    for it in task.items:
        if not it.prompt or not it.answer:
            return None
        head, _, word = it.answer.strip().rpartition(" ")
        prefix = (head + " ") if head else ""
        m = _KEY.fullmatch(word.lower())
        if m:
            keys = [f"{m.group(1)}{i}" for i in range(1, len(it.choices) + 1)]
        elif word.lower() in ("true", "false") and len(it.choices) == 2:
            keys = ["false", "true"]  # tasks.py orders two-way choices no/yes = false/true
        else:
            return None
        if keys[it.label] != word.lower():
            return None
        items.append(MCItem(render_prompt(it.prompt), [prefix + k for k in keys], it.label))
    chance = sum(1.0 / len(i.choices) for i in items) / len(items)
    return Task(task.name, items, chance, task.source, task.sha256, "instruction")


def score_shared_prefix(model, tokenizer, task, batch_size: int = 8, progress: bool = True):
    """``evaluate_task`` for items whose choices differ only in their last token, one forward per item.

    See :func:`shared_prefix_logliks`. Returns a ``TaskResult``.
    """
    import statistics

    from layercap.evaluate.multiple_choice import TaskResult, item_metrics

    lls = shared_prefix_logliks(model, tokenizer, task, batch_size=batch_size, progress=progress)
    metrics = [item_metrics(ll, it) for ll, it in zip(lls, task.items)]
    accs, norms = [m[0] for m in metrics], [m[1] for m in metrics]
    n = len(accs)
    se = lambda xs: statistics.stdev(xs) / math.sqrt(n) if n > 1 else float("nan")  # noqa: E731
    return TaskResult(name=task.name, acc=sum(accs) / n, acc_norm=sum(norms) / n, acc_stderr=se(accs),
                      acc_norm_stderr=se(norms), n=n, chance=task.chance, source=task.source, sha256=task.sha256,
                      template=task.template)


@torch.inference_mode()
def shared_prefix_logliks(model, tokenizer, task, batch_size: int = 8, progress: bool = True) -> list[list[float]]:
    """Per item, the summed continuation log-probability (nats) of every choice, in choice order.

    Instruction-format choices ("the correct answer is answer1" .. "answer4") share the context
    and every continuation token but the last, so the log-likelihood of choice i is
    (shared continuation log-prob) + log p(last token i | shared prefix): the same numbers as
    scoring each choice separately (:func:`layercap.evaluate.multiple_choice.loglikelihoods`,
    same tokenisation via ``encode_pair``), for 1/n_choices of the compute. Items that do not
    have this form are scored choice by choice with that function.
    """
    from tqdm.auto import tqdm

    from layercap.evaluate.multiple_choice import encode_pair, loglikelihoods

    dev = next(model.parameters()).device
    cfg = getattr(model, "config", None)
    max_len = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)
    shared, other = [], []  # shared: (item index, input ids, n shared continuation tokens, last-token ids)
    for i, it in enumerate(task.items):
        enc = [encode_pair(tokenizer, c, k) for c, k in it.requests()]
        ctx, conts = enc[0][0], [k for _, k in enc]
        same = all(c == ctx for c, _ in enc) and len({len(k) for k in conts}) == 1 and len(conts[0]) >= 1
        same = same and all(k[:-1] == conts[0][:-1] for k in conts)
        if same and len(set(k[-1] for k in conts)) == len(conts):
            seq = (ctx + conts[0])[-(max_len + 1):][:-1]
            shared.append((i, seq, len(conts[0]) - 1, [k[-1] for k in conts]))
        else:
            other.append(i)
    lls: dict[int, list[float]] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shared.sort(key=lambda r: -len(r[1]))
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(shared), desc=f"{task.name} (shared prefix)", unit="item", disable=not progress, leave=False)
    try:
        for s in range(0, len(shared), batch_size):
            rows = shared[s:s + batch_size]
            width = len(rows[0][1])
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (_, seq, _, _) in enumerate(rows):
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            for r, (i, seq, n_shared, lasts) in enumerate(rows):
                n = len(seq)
                lp = torch.log_softmax(logits[r, n - n_shared - 1:n].float(), dim=-1)  # (n_shared + 1, vocab)
                cont = seq[n - n_shared:]  # the shared continuation tokens (inputs after the context)
                common = float(lp[torch.arange(n_shared), torch.tensor(cont, dtype=torch.long)].sum()) if n_shared else 0.0
                lls[i] = [common + float(lp[-1, t]) for t in lasts]
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    if other:
        reqs, spans = [], []
        for i in other:
            r = task.items[i].requests()
            spans.append((i, len(reqs), len(reqs) + len(r)))
            reqs.extend(r)
        flat = loglikelihoods(model, tokenizer, reqs, batch_size=batch_size, progress=progress, desc=task.name)
        for i, a, b in spans:
            lls[i] = flat[a:b]
    return [lls[i] for i in range(len(task.items))]


# ---- trainer ------------------------------------------------------------------------------
def answer_token_loss(model: nn.Module, inputs: dict[str, torch.Tensor]):
    """Mean NLL (nats) of the answer tokens, computing output logits for those positions only.

    Equal to the Hugging Face ``labels=`` loss (shifted, -100 ignored, mean over tokens), but
    the vocabulary projection runs on the answer positions alone: on instruction data they are a
    few tokens of each ~100-token example, and the (B, T, vocab) logits with their log-softmax
    and backward are otherwise a sizeable share of a CPU training step. A forward pre-hook on
    the output embedding keeps the selected hidden states only, so any architecture whose
    forward ends in ``get_output_embeddings()`` works unchanged (softcapping, logit scales).
    Returns ``(loss, outputs)``; ``outputs.logits`` has shape (1, n_answer_tokens, vocab).
    """
    labels = inputs["labels"]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        outputs = model(**inputs)
        return outputs.loss, outputs
    targets = labels[:, 1:]
    keep = (targets != -100).nonzero(as_tuple=True)

    def answer_positions(module, args):
        hidden = args[0]
        return (hidden[:, :-1][keep].unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(answer_positions)
    try:
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        handle.remove()
    loss = nn.functional.cross_entropy(outputs.logits[0].float(), targets[keep])
    return loss, outputs


def _make_trainer_class():
    from transformers import Trainer

    from layercap.apply.lora_moe import load_balancing_loss, load_lora_moe_weights, write_lora_moe_files

    class CapacityTrainer(Trainer):
        """Trainer + Switch load-balancing loss (LoRA-MoE) and adapter-only checkpoints."""

        def __init__(self, *args, moe_config=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.moe_config = moe_config
            self._acc = {"lm": 0.0, "aux": 0.0, "n": 0}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            lm, outputs = answer_token_loss(model, inputs)
            loss = lm
            if self.moe_config is not None and self.moe_config.aux_coef > 0:
                aux = load_balancing_loss(model, inputs.get("attention_mask"))
                loss = lm + self.moe_config.aux_coef * aux
                self._acc["aux"] += float(aux.detach())
            self._acc["lm"] += float(lm.detach())
            self._acc["n"] += 1
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self._acc["n"]:
                logs["lm_loss"] = self._acc["lm"] / self._acc["n"]
                logs["aux_loss"] = self._acc["aux"] / self._acc["n"]
                self._acc = {"lm": 0.0, "aux": 0.0, "n": 0}
            super().log(logs, *args, **kwargs)

        def _save(self, output_dir=None, state_dict=None):
            if self.moe_config is None:
                return super()._save(output_dir, state_dict)
            write_lora_moe_files(self.model, self.moe_config, output_dir or self.args.output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if self.moe_config is None:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_lora_moe_weights(model or self.model, resume_from_checkpoint)

    return CapacityTrainer


def last_complete_checkpoint(directory: Path) -> Path | None:
    """Newest ``checkpoint-N`` whose trainer_state.json (written last by Trainer) parses."""
    if not directory.is_dir():
        return None
    found = []
    for p in directory.glob("checkpoint-*"):
        try:
            step = int(p.name.split("-")[1])
            json.loads((p / "trainer_state.json").read_text())
        except (ValueError, IndexError, OSError):
            continue
        found.append((step, p))
    return max(found)[1] if found else None


# ---- the run ------------------------------------------------------------------------------
def attach_adapter(model: nn.Module, counts: dict[str, int], options: FinetuneOptions):
    """Inject the adapter (validating the allocation first). Returns ``(model_to_train, moe_config | None)``."""
    from layercap.apply.lora_moe import LoraMoEConfig, apply_lora_moe, parse_targets

    targets = list(parse_targets(",".join(options.targets) if options.targets else None, model))
    if options.adapter == "moe":
        config = LoraMoEConfig(
            counts=dict(counts), targets=targets, rank=options.rank, alpha=options.lora_alpha(),
            top_k=options.top_k, aux_coef=options.aux_coef, kernel=options.kernel,
        )
        apply_lora_moe(model, config)
        return model, config
    from layercap.apply.peft_lora import apply_peft_lora

    peft_model, _ = apply_peft_lora(model, counts, rank_unit=options.rank, targets=targets,
                                    alpha_ratio=options.lora_alpha() / options.rank)
    return peft_model, None


def check_counts_for(model: nn.Module, counts: dict[str, int], options: FinetuneOptions) -> dict[str, int]:
    """Validate the allocation and targets against ``model`` without modifying it."""
    from layercap.apply.lora_moe import check_counts, parse_targets, resolve_targets

    targets = parse_targets(",".join(options.targets) if options.targets else None, model)
    per_block = resolve_targets(model, targets)
    return check_counts(list(per_block), counts, minimum=1 if options.adapter == "moe" else 0)


def _train_steps(n_examples: int, options: FinetuneOptions) -> int:
    if options.max_steps > 0:
        return options.max_steps
    return max(1, math.ceil(math.ceil(n_examples / options.batch_size) * options.epochs))


def finetune(
    model: nn.Module,
    tokenizer,
    counts: dict[str, int],
    train_path: str | os.PathLike,
    outdir: str | os.PathLike,
    options: FinetuneOptions,
    eval_path: str | os.PathLike | None = None,
    allocation: dict[str, Any] | None = None,
    resume: bool = False,
    callbacks: list | None = None,
) -> FinetuneResult:
    """Train adapters on ``train_path`` with per-block ``counts``; evaluate on ``eval_path``; write OUTDIR.

    ``model`` is modified in place (adapters injected). Everything is validated before the first
    write. OUTDIR gets ``adapter/`` (LoRA-MoE safetensors + config, or a PEFT adapter),
    ``finetune.json`` and ``checkpoints/`` (removed at the end of a successful run).
    ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g. to stop early in tests).
    """
    from layercap.data.tasks import load_task

    options.validate()
    outdir = Path(outdir)
    counts = check_counts_for(model, counts, options)
    train_task = load_task(train_path, limit=options.limit_train, seed=options.seed)
    pairs = train_task.training_examples()
    if not all(p and a for p, a in pairs):
        raise LayercapError(f"{train_path}: some items have no (prompt, answer) form for fine-tuning; use a task file.")
    eval_tasks = {}
    if eval_path is not None:
        # the eval subset does not depend on the training seed: every run is scored on the same items
        base_eval = load_task(eval_path, limit=options.limit_eval, seed=0)
        if options.eval_format in ("instruction", "both"):
            inst = instruction_task(base_eval)
            if inst is None:
                raise LayercapError(
                    f"{eval_path}: answers do not name choice keys (answerN / optionN / true/false), so the "
                    "instruction format cannot be scored; pass --eval-format zero-shot."
                )
            eval_tasks["instruction"] = inst
        if options.eval_format in ("zero-shot", "both"):
            eval_tasks["zero-shot"] = base_eval
    checkpoints = outdir / CHECKPOINTS
    run_config = {"options": {k: v for k, v in options.to_dict().items() if k != "progress"}, "counts": counts,
                  "train": str(train_path), "eval": str(eval_path) if eval_path else None}
    resume_from = None
    if (outdir / RESULT_FILE).exists() and not resume:
        raise LayercapError(f"{outdir} already holds a finished run ({RESULT_FILE}); choose a new -o, or delete it.")
    if checkpoints.exists() and any(checkpoints.iterdir()) and not resume:
        raise LayercapError(f"{checkpoints} holds checkpoints of an earlier run; pass --resume to continue it, or choose a new -o.")
    if resume:
        previous = outdir / RUN_FILE
        if previous.is_file():
            before = json.loads(previous.read_text())
            if before != json.loads(json.dumps(run_config)):
                diff = sorted(k for k in set(before["options"]) | set(run_config["options"])
                              if before["options"].get(k) != run_config["options"].get(k))
                raise LayercapError(
                    f"--resume with different settings than the run in {outdir} (differs in: "
                    f"{', '.join(diff) or 'allocation/data'}); use the same arguments or a new -o."
                )
        resume_from = last_complete_checkpoint(checkpoints)
        if (outdir / RESULT_FILE).exists():
            return FinetuneResult.load(outdir / RESULT_FILE)

    started = time.perf_counter()
    torch.manual_seed(options.seed)  # adapter init is seeded
    train_model, moe_config = attach_adapter(model, counts, options)
    if moe_config is not None:
        moe_config.model_source = model_source(model)
    trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
    dataset = [encode_example(tokenizer, p, a, options.max_length) for p, a in pairs]
    steps = _train_steps(len(dataset), options)
    atomic_write_json(outdir / RUN_FILE, run_config)

    args = _training_args(checkpoints, options, steps)
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(
        model=train_model, args=args, train_dataset=dataset,
        data_collator=Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        moe_config=moe_config, callbacks=list(callbacks or []),
    )
    _quiet_logs(trainer, options.progress)
    train_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_time = time.perf_counter() - train_start
    curve = [
        {"step": int(h["step"]), "loss": float(h["loss"]), "lm_loss": float(h.get("lm_loss", h["loss"])),
         "aux_loss": float(h.get("aux_loss", 0.0))}
        for h in trainer.state.log_history if "loss" in h
    ]
    train_model.eval()

    results = {}
    if eval_tasks:
        from layercap.evaluate.multiple_choice import evaluate_task

        for fmt, task in eval_tasks.items():
            score = score_shared_prefix if fmt == "instruction" else evaluate_task
            res = score(train_model, tokenizer, task, batch_size=options.eval_batch_size, progress=options.progress)
            results[fmt] = res.to_dict()
    head = results.get("instruction") or results.get("zero-shot")
    result = FinetuneResult(
        model_source=model_source(model),
        adapter=options.adapter,
        allocation=allocation or {"counts": counts},
        options=run_config["options"],
        steps=int(trainer.state.global_step),
        train_examples=len(dataset),
        train_source=str(train_path),
        trainable_params=int(trainable),
        train_loss=curve,
        eval=results,
        acc=head["acc"] if head else None,
        acc_norm=head["acc_norm"] if head else None,
        wall_time_s=time.perf_counter() - started,
        train_time_s=train_time,
        seed=options.seed,
        resumed_from=str(resume_from) if resume_from else None,
    )
    save_adapter(train_model, moe_config, outdir / ADAPTER_DIR)
    result.save(outdir / RESULT_FILE)
    # the adapter and record are complete: intermediate checkpoints are no longer needed
    shutil.rmtree(checkpoints, ignore_errors=True)
    return result


def _quiet_logs(trainer, progress: bool) -> None:
    """Keep Trainer's per-step log dicts off stdout (the command prints its own table); the
    progress bar (tqdm, stderr) stays when ``progress``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        class _Bar(ProgressCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if self.training_bar is not None and logs and "loss" in logs:
                    self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

        trainer.add_callback(_Bar())


def _training_args(checkpoints: Path, options: FinetuneOptions, steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.lr,
        max_steps=steps,
        lr_scheduler_type="linear",
        warmup_steps=int(round(options.warmup_ratio * steps)),
        weight_decay=options.weight_decay,
        logging_steps=1,
        save_strategy="steps",
        save_steps=options.save_steps or max(1, steps // 5),
        save_total_limit=2,
        report_to="none",
        seed=options.seed,
        data_seed=options.seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=not options.progress,
        dataloader_num_workers=0,
    )


def save_adapter(train_model: nn.Module, moe_config, directory: Path) -> Path:
    """LoRA-MoE: safetensors + config; PEFT: ``save_pretrained`` (both as one atomic directory)."""
    from layercap.apply.lora_moe import save_lora_moe
    from layercap.io import atomic_directory

    if moe_config is not None:
        return save_lora_moe(train_model, moe_config, directory)
    with atomic_directory(directory) as tmp:
        train_model.save_pretrained(tmp)
    return directory
