"""Tiny random checkpoints of the natively served families, each with the options its spec must read
(models/families.py): sliding windows shorter than the test prompts, layers without RoPE, multipliers
other than 1, fused checkpoint projections, per-head and full-width q/k norms."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import build_tokenizer

# The shape every family shares: 2-4 layers, 64 wide, grouped-query attention.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

# model_type -> the config options that exercise its spec (on top of COMMON).
FAMILY_OPTIONS: dict[str, dict] = {
    "qwen3": dict(head_dim=16),
    "qwen3-sliding": dict(model_type="qwen3", head_dim=16, use_sliding_window=True, sliding_window=6,
                          layer_types=["sliding_attention", "full_attention"], max_window_layers=1),
    "seed_oss": dict(head_dim=16, attention_bias=True, attention_out_bias=True),
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=2),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                    logits_scaling=2.5),
    "olmo2": dict(),
    "olmo3": dict(num_hidden_layers=4, sliding_window=6,
                  layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
    "exaone4": dict(num_hidden_layers=4, sliding_window=6, sliding_window_pattern=4,
                    layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
    "phi3": dict(),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                   final_logit_softcapping=5.0),
    "gemma3_text": dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24, final_logit_softcapping=5.0,
                        layer_types=["sliding_attention", "full_attention"]),
    "arcee": dict(head_dim=16),
    "hunyuan_v1_dense": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      num_hidden_layers=3, mlp_only_layers=[1]),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
    "starcoder2": dict(sliding_window=6),
    "phi": dict(num_key_value_heads=4, partial_rotary_factor=0.5),
    "stablelm": dict(num_key_value_heads=4, use_qkv_bias=True),
    "stablelm-parallel": dict(model_type="stablelm", num_key_value_heads=4, use_parallel_residual=True),
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6, swiglu_limit=2.0,
                    layer_types=["sliding_attention", "full_attention"]),
    "apertus": dict(head_dim=16),
    "cohere": dict(logit_scale=0.5),
    "glm4": dict(head_dim=16, attention_bias=True),
    "gpt_neox": dict(num_key_value_heads=4, rotary_pct=0.5),
    "gpt_neox-sequential": dict(model_type="gpt_neox", num_key_value_heads=4, use_parallel_residual=False),
    "gpt2-layer-scaled": dict(model_type="gpt2", num_key_value_heads=4, n_inner=96,
                              scale_attn_by_inverse_layer_idx=True),
    "ministral": dict(head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
}


# Served through the transformers fallback (models/fallback.py): MLA, and native families with an option
# their spec does not read yet.
FALLBACK_OPTIONS: dict[str, dict] = {
    # short-convolution layers between attention layers, prompts longer than the convolution
    "lfm2": dict(num_hidden_layers=4, full_attn_idxs=[1, 3], conv_L_cache=3),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, q_lora_rank=32,
                        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4),
    "cohere-qk-norm": dict(model_type="cohere", use_qk_norm=True),
    "phi-qk-layernorm": dict(model_type="phi", num_key_value_heads=4, qk_layernorm=True),

}
FAMILY_OPTIONS |= FALLBACK_OPTIONS


def save_tiny_family(name: str, folder: Path, seed: int = 0) -> Path:
    """A random checkpoint of family `name` (a key of FAMILY_OPTIONS) with the tests' tokenizer."""
    options = dict(FAMILY_OPTIONS[name])
    model_type = options.pop("model_type", name)
    tokenizer = build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **(COMMON | ids | options))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() == 2:
                param.mul_(4.0)     # sharper logits, so greedy paths are not decided by noise
            elif "norm" in param_name or "layernorm" in param_name:
                # Norm weights away from their init (ones, or zeros for Gemma's 1 + w) so a norm applied
                # in the wrong place, or with the wrong offset, shows.
                param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
