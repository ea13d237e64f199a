"""One adapter training run: inject the adapter, train on encoded examples, return it.

Training runs in ``transformers.Trainer`` (linear LR decay, AdamW, seeded data order) with
checkpoints under ``checkpoints``; ``resume_from`` (a complete ``checkpoint-N``) restores the
optimizer, scheduler, RNG and data position, so the result equals an uninterrupted run.
Evaluation and the run's record are the orchestration layer's job
(:mod:`layercap.experiments.finetune_job`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercap.apply.finetune.adapters import attach_adapter, check_counts_for
from layercap.apply.finetune.options import FinetuneOptions
from layercap.apply.finetune.trainer import Collator, make_trainer_class, quiet_logs, training_args
from layercap.models.source import model_source


@dataclass
class TrainedAdapter:
    """A finished training run: the model with its adapter (in eval mode), the LoRA-MoE config
    (None for PEFT), the loss curve (per logged step ``{"step", "loss", "lm_loss", "aux_loss"}``,
    nats) and counts; times in seconds."""

    model: nn.Module
    moe_config: Any
    curve: list[dict[str, float]]
    steps: int
    train_examples: int
    trainable_params: int
    train_time_s: float
    resumed_from: str | None


def train_steps(n_examples: int, options: FinetuneOptions) -> int:
    if options.max_steps > 0:
        return options.max_steps
    return max(1, math.ceil(math.ceil(n_examples / options.batch_size) * options.epochs))


def train_adapter(model: nn.Module, tokenizer, counts: dict[str, int], dataset: list[dict[str, list[int]]],
                  checkpoints: Path, options: FinetuneOptions, resume_from: Path | None = None,
                  callbacks: list | None = None) -> TrainedAdapter:
    """Inject ``options.adapter`` with per-block ``counts`` into ``model`` (in place) and train it.

    ``dataset``: encoded examples ``{"input_ids", "labels"}`` (labels -100 where nothing is
    predicted): :func:`layercap.data.instruction.encode_example` for (prompt, answer) pairs,
    :meth:`layercap.data.domain.DomainSplit.examples` for text windows.
    ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g. to stop early in tests).
    """
    counts = check_counts_for(model, counts, options)
    torch.manual_seed(options.seed)  # adapter init is seeded
    train_model, moe_config = attach_adapter(model, counts, options)
    if moe_config is not None:
        moe_config.model_source = model_source(model)
    trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
    steps = train_steps(len(dataset), options)
    trainer = make_trainer_class()(
        model=train_model, args=training_args(checkpoints, options, steps), train_dataset=dataset,
        data_collator=Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        moe_config=moe_config, callbacks=list(callbacks or []),
    )
    quiet_logs(trainer, options.progress)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_time = time.perf_counter() - start
    curve = [
        {"step": int(h["step"]), "loss": float(h["loss"]), "lm_loss": float(h.get("lm_loss", h["loss"])),
         "aux_loss": float(h.get("aux_loss", 0.0))}
        for h in trainer.state.log_history if "loss" in h
    ]
    train_model.eval()
    return TrainedAdapter(train_model, moe_config, curve, int(trainer.state.global_step), len(dataset), int(trainable),
                          train_time, str(resume_from) if resume_from else None)
