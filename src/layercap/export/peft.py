"""``--format peft``: an ``adapter_config.json`` giving each module its allocated LoRA rank.

The config is the one :func:`layercap.apply.peft_lora.lora_config_from_allocation` builds for
``layercap finetune --adapter lora`` (rank r_k = rank_unit * n_k for every targeted Linear of
block k, ``lora_alpha`` = alpha_ratio * r_k, anchored full-name ``rank_pattern`` /
``alpha_pattern`` keys, blocks with n_k = 0 not adapted), serialised by PEFT's own
``LoraConfig.save_pretrained``, so ``LoraConfig.from_pretrained(OUTDIR)`` + ``get_peft_model``
rebuild exactly those ranks. Writing is atomic: the file is made in a temporary directory and
renamed into OUTDIR (other files there are left alone).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from layercap.errors import LayercapError
from layercap.io import atomic_write_bytes, mark_written

CONFIG_NAME = "adapter_config.json"


def build_lora_config(model, counts: dict[str, int], rank_unit: int = 8, targets=None, alpha_ratio: float = 2.0,
                      dropout: float = 0.0, base_model: str | None = None):
    """The ``peft.LoraConfig`` for ``counts`` (block name -> units) on ``model``."""
    from layercap.apply.peft_lora import lora_config_from_allocation

    config = lora_config_from_allocation(model, counts, rank_unit=rank_unit, targets=targets,
                                         alpha_ratio=alpha_ratio, dropout=dropout)
    if base_model is not None:
        config.base_model_name_or_path = str(base_model)
    return config


def write_adapter_config(config, outdir: str | os.PathLike) -> Path:
    """``OUTDIR/adapter_config.json`` as PEFT writes it (atomic)."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise LayercapError(f"-o {outdir} is a file; --format peft writes a directory holding {CONFIG_NAME}.")
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        data = (Path(tmp) / CONFIG_NAME).read_bytes()
    written = atomic_write_bytes(outdir / CONFIG_NAME, data)
    mark_written(written, "export")
    return written
