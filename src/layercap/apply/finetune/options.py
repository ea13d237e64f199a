"""Fine-tuning options: one home for the defaults, validated on construction.

Every field carries its help text (``metadata["help"]``); ``layercap finetune`` and
``layercap compare-allocation`` build their flags from these fields (flag = ``--`` + the field
name with ``-`` for ``_``), so a default lives here and nowhere else. Errors name fields; the
CLI maps them to flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from layercap.errors import LayercapError

EVAL_FORMATS = ("instruction", "zero-shot", "both")


def _opt(default: Any, help: str, choices: tuple | None = None, cli: bool = True):
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


@dataclass
class FinetuneOptions:
    """Training and evaluation settings. ``max_steps`` > 0 overrides ``epochs``. ``alpha`` None = 2 x rank."""

    adapter: str = _opt("moe", "moe: n_k LoRA experts per adapted Linear of block k; lora: PEFT LoRA of rank rank*n_k")
    rank: int = _opt(8, "rank of each expert (moe) or the rank unit (lora)")
    alpha: float | None = _opt(None, "LoRA alpha (default 2 x rank)")
    top_k: int = _opt(2, "experts per token (moe; all when a block has fewer)")
    aux_coef: float = _opt(0.01, "load-balancing loss coefficient (moe)")
    targets: list[str] | None = _opt(None, "Linear names to adapt (default: q,k,v,o and MLP projections of the architecture)")
    kernel: str = _opt("dense", "LoRA-MoE expert kernel", cli=False)
    epochs: float = _opt(1.0, "training epochs (ignored when max_steps > 0)")
    max_steps: int = _opt(-1, "optimizer steps (overrides epochs)")
    lr: float = _opt(2e-4, "peak learning rate, linear decay")
    batch_size: int = _opt(8, "training batch size")
    max_length: int = _opt(256, "max tokens per training example")
    seed: int = _opt(0, "seed of adapter init and data order", cli=False)
    data_seed: int | None = _opt(None, "seed of the training data order and the --limit-train subset (default: the run's "
                                 "seed); fixed, the seeds of a comparison vary only the adapter init")
    limit_train: int | None = _opt(None, "train on a seeded random subset of N examples (text: N windows)")
    limit_eval: int | None = _opt(None, "evaluate on a fixed random subset of N items (seed 0); text: the first N held-out windows")
    heldout_fraction: float = _opt(0.1, "text training files (.txt/.raw): the last share of the text's tokens held out for NLL")
    eval_batch_size: int = _opt(8, "evaluation batch size")
    eval_format: str = _opt("instruction", "score the trained instruction format, the harness zero-shot prompts, or both",
                            choices=EVAL_FORMATS)
    save_steps: int | None = _opt(None, "checkpoint every S steps (default: about 5 per run)")
    bos: str = _opt("auto", "BOS token first in every example and request: auto (as lm-evaluation-harness: Gemma, or a "
                    "tokenizer that adds BOS by default), always, never", choices=("auto", "always", "never"))
    warmup_ratio: float = _opt(0.0, "share of the steps with linear warm-up", cli=False)
    weight_decay: float = _opt(0.0, "AdamW weight decay", cli=False)
    progress: bool = _opt(True, "progress bars", cli=False)

    @property
    def order_seed(self) -> int:
        """The seed of the data order: ``data_seed``, or ``seed`` when it is not fixed."""
        return self.seed if self.data_seed is None else self.data_seed

    def __post_init__(self) -> None:
        from layercap.apply.finetune.adapters import ADAPTERS

        if self.adapter not in ADAPTERS:
            raise LayercapError(f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}.")
        if self.bos not in ("auto", "always", "never"):
            raise LayercapError(f"bos must be one of auto, always, never, got {self.bos!r}.")
        if self.eval_format not in EVAL_FORMATS:
            raise LayercapError(f"eval_format must be one of {', '.join(EVAL_FORMATS)}, got {self.eval_format!r}.")
        import math

        for name in ("epochs", "lr", "aux_coef", "alpha", "warmup_ratio", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise LayercapError(f"{name} must be a finite number, got {value!r}.")
        if self.targets is not None and not [t for t in self.targets if str(t).strip()]:
            raise LayercapError("targets names no Linear; pass module names such as q_proj,v_proj (or leave it out).")
        checks = [
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.max_steps >= -1, f"max_steps must be >= 1 (or -1: use epochs), got {self.max_steps}"),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.aux_coef >= 0, f"aux_coef must be >= 0, got {self.aux_coef}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
            (self.max_steps > 0 or self.epochs > 0, "give epochs > 0 or max_steps > 0"),
            (self.alpha is None or self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (self.data_seed is None or self.data_seed >= 0, f"data_seed must be >= 0, got {self.data_seed}"),
            (self.limit_train is None or self.limit_train >= 1, f"limit_train must be >= 1, got {self.limit_train}"),
            (self.limit_eval is None or self.limit_eval >= 1, f"limit_eval must be >= 1, got {self.limit_eval}"),
            (self.save_steps is None or self.save_steps >= 1, f"save_steps must be >= 1, got {self.save_steps}"),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}"),
            (0.0 < self.heldout_fraction < 1.0, f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LayercapError(msg + ".")

    def validate(self) -> None:
        """Kept for callers that mutate an instance after construction: re-runs the checks."""
        self.__post_init__()

    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneOptions":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def cli_fields(cls):
        """The fields exposed as command-line flags, with their defaults and help."""
        return [f for f in fields(cls) if f.metadata.get("cli", True)]
