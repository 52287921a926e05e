"""Tiny random models and their corpus, built from configs (no download): shared by the fixtures in conftest.py
and by test modules (`from tiny_models import make_tiny_llama`)."""

from __future__ import annotations

import torch

CORPUS = [f"Sam has {a} apples and buys {b} more. How many apples? Sam has {a} + {b} = {a + b}.\n#### {a + b}"
          for a in range(12) for b in range(12)]


def make_tiny_llama(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()
