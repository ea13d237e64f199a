"""Loading Hugging Face causal LMs and finding their layer blocks (shared by every stage)."""

from layercap.models.blocks import Block, find_blocks, find_linears, linear_weight, block_param_count
from layercap.models.load import BUNDLED_MODELS, load_model, load_tokenizer, resolve_model

__all__ = [
    "Block",
    "find_blocks",
    "find_linears",
    "linear_weight",
    "block_param_count",
    "BUNDLED_MODELS",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]
