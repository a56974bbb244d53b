"""Tiny random transformers Llama models for parity tests (torch is a test-only dependency)."""

from __future__ import annotations

import torch
import transformers

# Each variant exercises one architecture feature of the Llama family.
VARIANTS = {
    # Llama-2 style: multi-head attention, separate LM head.
    "llama2_mha": dict(num_attention_heads=4, num_key_value_heads=4),
    # Llama-3.1 style: grouped-query attention 4:1 with llama3 rope scaling.
    "llama31_gqa": dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Llama-3.2 style: tied input/output embeddings.
    "llama32_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # head_dim that is not hidden_size / num_attention_heads.
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
}


def make_hf_llama(variant: str, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, attn_implementation="eager")
    kwargs.update(VARIANTS[variant])
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # HF inits norms to ones; random norms make the parity test stronger
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens, position_ids=None):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    position_ids=None if position_ids is None else torch.as_tensor(position_ids, dtype=torch.long))
    return out.logits.float().numpy()
