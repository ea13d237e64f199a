"""Adapters with per-layer capacity and their training (LoRA-MoE experts, PEFT LoRA ranks).

- options:  ``FinetuneOptions`` (the one home of the training defaults, validated on construction)
- adapters: the adapter registry (moe, lora): attach, check an allocation, save
- trainer:  answer-token loss, the Trainer subclass, training arguments, checkpoints
- train:    ``train_adapter``, one training run
"""

from layercap.apply.finetune.adapters import ADAPTERS, Adapter, attach_adapter, check_counts_for, get_adapter, register_adapter, save_adapter
from layercap.apply.finetune.options import EVAL_FORMATS, FinetuneOptions
from layercap.apply.finetune.train import TrainedAdapter, train_adapter, train_steps
from layercap.apply.finetune.trainer import Collator, answer_token_loss, last_complete_checkpoint

__all__ = [
    "ADAPTERS", "Adapter", "attach_adapter", "check_counts_for", "get_adapter", "register_adapter", "save_adapter",
    "EVAL_FORMATS", "FinetuneOptions", "TrainedAdapter", "train_adapter", "train_steps",
    "Collator", "answer_token_loss", "last_complete_checkpoint",
]
