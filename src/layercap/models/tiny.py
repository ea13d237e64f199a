"""Tiny random-init causal LMs of every supported family, built locally (no download).

Used by the tests, the examples and ``layercap run`` with ``model: tiny-llama`` etc. A model
spec ``tiny-<family>`` is accepted wherever a MODEL argument is (see :func:`build_tiny`).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from layercap.errors import LayercapError
from layercap.models.source import set_model_source

FAMILIES = ("llama", "mistral", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "phi", "gpt2", "opt")

_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Layer capacity allocation decides where a "
    "language model's parameters should go. Pruning removes weights; experts add capacity. "
    "0123456789 ,.;:!?'\"()[]{}-_/\\ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
)


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 320) trained in milliseconds on a fixed string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.pad_token = fast.eos_token
    return fast


def tiny_config(family: str, num_layers: int = 4, hidden: int = 32, vocab: int = 320):
    """A small config of ``family``: ``num_layers`` blocks, width ``hidden``, GQA where the family has it."""
    import transformers as tf

    common = dict(vocab_size=vocab, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    llama_like = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, **common,
    )
    if family == "llama":
        return tf.LlamaConfig(tie_word_embeddings=True, **llama_like)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if family == "gemma":
        return tf.GemmaConfig(head_dim=hidden // 4, **llama_like)
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=hidden // 4, sliding_window=64, **llama_like)
    if family == "gemma3":
        return tf.Gemma3TextConfig(head_dim=hidden // 4, sliding_window=64, **llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=hidden // 4, **llama_like)
    if family == "phi":
        return tf.PhiConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
            num_attention_heads=4, **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=num_layers, n_head=4, n_positions=256, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=num_layers, num_attention_heads=4,
            word_embed_proj_dim=hidden, **common,
        )
    raise LayercapError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}.")


def build_tiny(family: str = "llama", num_layers: int = 4, hidden: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)``: a random-init ``family`` model in eval mode, deterministic in ``seed``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, num_layers=num_layers, hidden=hidden)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    set_model_source(model, f"tiny-{family}")
    return model, tiny_tokenizer()
