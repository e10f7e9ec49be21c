"""Tiny randomly initialised transformers models of each family kvlink is tested on (no downloads).

``initializer_range=0.2`` (not the default 0.02) so that a lost or zeroed state changes the
logits visibly: tests compare logits bit for bit and need their negative controls to fail.
"""

from __future__ import annotations

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=256, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, initializer_range=0.2)

FAMILIES = {
    # Kimi Linear: KDA linear attention + MLA (latent in keys, rotary key in values)
    "kimi_linear": dict(num_hidden_layers=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, linear_head_dim=16, linear_num_heads=4, num_experts=4,
                        num_experts_per_token=2, moe_intermediate_size=32,
                        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                        mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    # Qwen3-Next: Gated DeltaNet + gated attention, one attention layer in two here
    "qwen3_next": dict(num_hidden_layers=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                       full_attention_interval=2),
    # dense Llama (GQA)
    "llama": dict(num_hidden_layers=4, num_key_value_heads=2),
    # Gemma 3: sliding-window and full attention layers
    "gemma3_text": dict(num_hidden_layers=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
}


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """``(model, config)`` of a tiny ``family`` model in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return model, config
