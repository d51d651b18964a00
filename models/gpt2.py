"""Native GPT-2 decoder over the paged KV cache.

HF's GPT-2 stores its projections as Conv1D ([in, out]), which is already the layout we want.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from models.attention import AttentionMetadata, PagedKVCache, paged_attention
from models.layers import FusedLinear, ParamSlot, embedding_slots, layer_slots


def _conv1d_slots(linear: FusedLinear, prefix: str) -> dict[str, ParamSlot]:
    return {
        f"{prefix}.weight": ParamSlot(linear.weight_t, tuple(linear.weight_t.shape), on_write=linear.weights_changed),
        f"{prefix}.bias": ParamSlot(linear.bias, tuple(linear.bias.shape)),
    }


class LayerNorm(torch.nn.Module):
    def __init__(self, size: int, eps: float, dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def slots(self, prefix: str) -> dict[str, ParamSlot]:
        return {f"{prefix}.weight": ParamSlot(self.weight, tuple(self.weight.shape)),
                f"{prefix}.bias": ParamSlot(self.bias, tuple(self.bias.shape))}


class GPT2Layer(torch.nn.Module):
    def __init__(self, config, layer_idx: int, dtype, device):
        super().__init__()
        hidden = config.hidden_size
        inner = config.n_inner or 4 * hidden
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.ln_1 = LayerNorm(hidden, config.layer_norm_epsilon, dtype, device)
        self.ln_2 = LayerNorm(hidden, config.layer_norm_epsilon, dtype, device)
        self.c_attn = FusedLinear(hidden, [3 * hidden], [True], dtype, device)
        self.attn_proj = FusedLinear(hidden, [hidden], [True], dtype, device)
        self.c_fc = FusedLinear(hidden, [inner], [True], dtype, device)
        self.mlp_proj = FusedLinear(inner, [hidden], [True], dtype, device)
        self.act = ACT2FN[config.activation_function]
        self.scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)

    def forward(self, x, cache: PagedKVCache, meta: AttentionMetadata, keep_rows: torch.Tensor | None = None):
        num_tokens = x.shape[0]
        qkv = self.c_attn(self.ln_1(x)).view(num_tokens, 3, self.num_heads, self.head_dim)
        attn = paged_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], self.layer_idx, cache, meta, self.scale)
        if keep_rows is not None:   # the rest only wrote their keys and values (see DecoderLayer.forward)
            x, attn = x[keep_rows], attn[keep_rows]
        x = x + self.attn_proj(attn)
        return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))

    def param_slots(self, prefix: str) -> dict[str, ParamSlot]:
        return (self.ln_1.slots(f"{prefix}.ln_1") | self.ln_2.slots(f"{prefix}.ln_2")
                | _conv1d_slots(self.c_attn, f"{prefix}.attn.c_attn")
                | _conv1d_slots(self.attn_proj, f"{prefix}.attn.c_proj")
                | _conv1d_slots(self.c_fc, f"{prefix}.mlp.c_fc")
                | _conv1d_slots(self.mlp_proj, f"{prefix}.mlp.c_proj"))


class GPT2LMHeadModel(torch.nn.Module):
    attention_windows = frozenset({None})

    def __init__(self, config, dtype: torch.dtype, device):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.layers = torch.nn.ModuleList(GPT2Layer(config, i, dtype, device) for i in range(self.num_layers))
        self.num_kv_heads = self.layers[0].num_heads
        self.head_dim = self.layers[0].head_dim
        self.wte = torch.nn.Parameter(torch.empty(config.vocab_size, config.hidden_size, dtype=dtype, device=device),
                                      requires_grad=False)
        self.wpe = torch.nn.Parameter(torch.empty(config.n_positions, config.hidden_size, dtype=dtype, device=device),
                                      requires_grad=False)
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon, dtype, device)
        self.lm_head = FusedLinear(config.hidden_size, [config.vocab_size], [False], dtype, device)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.optional_param_names = frozenset({"lm_head.weight"}) if self.tied else frozenset()

    def forward(self, input_ids, positions, cache, meta, output_rows=None):
        x = self.wte[input_ids] + self.wpe[positions]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, meta, output_rows if i == last else None)
        return self.ln_f(x)

    def compute_logits(self, hidden):
        return self.lm_head(hidden)

    def param_slots(self) -> dict[str, list[ParamSlot]]:
        slots = layer_slots(self.layers, "transformer.h")
        slots |= {name: [slot] for name, slot in self.ln_f.slots("transformer.ln_f").items()}
        slots["transformer.wpe.weight"] = [ParamSlot(self.wpe, tuple(self.wpe.shape))]
        return slots | embedding_slots("transformer.wte.weight", self.wte, self.lm_head, self.tied)
