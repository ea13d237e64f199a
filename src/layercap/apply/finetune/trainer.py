"""The training loop's parts: answer-token loss, the Trainer subclass, arguments, checkpoints.

The loss is the mean NLL of the answer tokens only (labels are -100 on prompt tokens and
padding); LoRA-MoE adds ``aux_coef`` x the mean Switch load-balancing loss. Output logits are
computed for the answer positions only (:func:`answer_token_loss`), which gives the same loss and
gradients as full logits at a fraction of the vocabulary-projection cost.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from layercap.apply.finetune.options import FinetuneOptions


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


def make_trainer_class():
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
    """Newest ``checkpoint-N`` that is complete: its trainer_state.json (written last by Trainer)
    parses and every safetensors file in it opens (a truncated write is skipped, and the run
    resumes from the checkpoint before it)."""
    from safetensors import safe_open

    if not directory.is_dir():
        return None
    found = []
    for p in directory.glob("checkpoint-*"):
        try:
            step = int(p.name.split("-")[1])
            json.loads((p / "trainer_state.json").read_text())
            for weights in p.glob("*.safetensors"):
                with safe_open(str(weights), framework="pt") as fh:
                    for key in fh.keys():
                        fh.get_slice(key)
        except Exception:  # unparsable, truncated or unreadable: not a checkpoint to resume from
            continue
        found.append((step, p))
    return max(found)[1] if found else None


def quiet_logs(trainer, progress: bool) -> None:
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


def training_args(checkpoints: Path, options: FinetuneOptions, steps: int):
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
        data_seed=options.order_seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=not options.progress,
        dataloader_num_workers=0,
    )
