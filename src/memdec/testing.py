"""Tiny models and tokenizers built locally, for tests and benchmarks that must run offline.

``tiny_tokenizer()`` trains a byte-level BPE on a slice of the built-in corpus (under a second);
``tiny_model(arch, tokenizer)`` builds a randomly initialised 2-layer Llama or GPT-2 (or a 3-layer
Gemma 3 with two sliding-window layers and one global layer) from a config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from .data import read_corpus

TINY_EOS = "<|endoftext|>"
TINY_PAD = "<|pad|>"


def tiny_tokenizer(vocab_size: int = 384, n_chars: int = 60_000):
    """A fast byte-level BPE tokenizer trained on the start of ``austen:valid``."""
    text = read_corpus("austen:valid")[0].text[:n_chars]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TINY_EOS, TINY_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunk = 2000
    tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_EOS, pad_token=TINY_PAD, bos_token=TINY_EOS)


def tiny_config(arch: str, vocab_size: int, n_layers: int = 2, hidden: int = 64, context: int = 256, **overrides):
    """A small Llama (``llama``), GPT-2 (``gpt2``) or Gemma 3 (``gemma3``) config.

    ``gemma3``: a Gemma3TextConfig (Gemma3ForCausalLM) of at least 3 blocks, sliding-window
    attention (window 16 tokens, so short prompts already cross it) in all but every third block,
    which attends globally, as Gemma 3's 5:1 pattern does at full size.
    """
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=context,
            bos_token_id=0, eos_token_id=0, pad_token_id=1,
        )
    elif arch == "gemma3":
        n_layers = max(n_layers, 3)
        cfg = Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4,
            max_position_embeddings=context, sliding_window=16,
            layer_types=["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(n_layers)],
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str, tokenizer, seed: int = 0, **config_kwargs):
    """A randomly initialised causal LM in eval mode, fp32."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), **config_kwargs))
    return model.float().eval()


def save_tiny_model(folder: str | Path, arch: str, tokenizer, seed: int = 0, **config_kwargs) -> Path:
    """Build a tiny model and save it with its tokenizer as a Hugging Face folder."""
    folder = Path(folder)
    model = tiny_model(arch, tokenizer, seed, **config_kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
