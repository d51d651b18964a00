"""Model families as data: what one generic decoder (models/decoder.py) needs to know of an HF config.

A family is a function from an HF config to a `DecoderSpec`; nothing else about it lives in code. The
decoder reads the spec once when it is built, and a family whose spec is the plain pre-norm Llama shape
(with or without per-head q/k norms) runs the whole one-call native stack; any other shape runs the same
layer code per layer, with the native kernels wherever they apply (products, attention, norms).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace


class UnsupportedModelError(ValueError):
    """A model whose architecture or options this decoder does not implement, with what is missing."""


@dataclass(frozen=True)
class LayerNames:
    """HF names of one decoder layer's tensors, relative to `{layer_prefix}.{i}`. A norm named None is
    absent; a projection tuple of one name is already fused in the checkpoint ([q; k; v] or [gate; up])."""

    attn_in_norm: str | None = "input_layernorm"         # before attention (pre-norm)
    attn_out_norm: str | None = None                     # on attention's output, before the residual add
    mlp_in_norm: str | None = "post_attention_layernorm"
    mlp_out_norm: str | None = None
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o_proj: str = "self_attn.o_proj"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")    # ("mlp.up_proj",) when not gated
    down: str = "mlp.down_proj"
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"


@dataclass(frozen=True)
class MoeSpec:
    """A mixture-of-experts MLP (models/moe.py): a router picks top-k experts, each a gated MLP."""

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool                     # softmax first: the top-k weights rescaled to sum to 1
    sparse_layers: tuple[bool, ...]       # per layer: experts (True) or the dense MLP
    # "softmax_topk": softmax over all experts, then the top k (Qwen3-MoE, Mixtral); "topk_softmax": the top
    # k logits, then a softmax over them (gpt-oss)
    routing: str = "softmax_topk"
    router_name: str = "gate"             # under the layer's "mlp."
    biases: bool = False                  # router and expert biases (gpt-oss)
    # gpt-oss's experts: [in, out] matrices, gate and up columns interleaved, and a clamped SwiGLU
    gpt_oss_experts: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0


@dataclass(frozen=True)
class DecoderSpec:
    """One decoder-only family's shape and options, read from an HF config."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eps: float
    activation: str                                     # a transformers ACT2FN name
    layer_windows: tuple[int | None, ...]               # per layer: sliding window or None (full)
    rope_layers: tuple[bool, ...]                       # per layer: False where the layer has no RoPE
    attention_scale: float
    tied_embeddings: bool
    names: LayerNames = field(default_factory=LayerNames)
    # Per layer, which RoPE table it reads (the model's rotary tables are keyed alike): one "default"
    # table, or one per layer type where a family rotates sliding and full layers differently (Gemma 3).
    rope_kinds: tuple[str, ...] = ()
    norm_kind: str = "rms"                              # "rms" or "layer" (LayerNorm)
    norm_bias: bool = False                             # LayerNorm with a bias
    norm_weight_offset: float = 0.0                     # Gemma's RMSNorm scales by (1 + weight)
    parallel_block: bool = False                        # x + attn(norm(x)) + mlp(norm'(x)) (Phi, StableLM)
    rotary_dim: int | None = None                       # RoPE on the first rotary_dim of each head (None: all)
    lm_head_bias: bool = False
    rotary_interleaved: bool = False                    # RoPE on channel pairs (2i, 2i + 1) (Cohere, GLM-4)
    qkv_per_head: bool = False                          # a fused checkpoint qkv laid out [heads, 3, head_dim]
    logits_multiplier: float = 1.0                      # Cohere's logit_scale
    # Learned absolute positions added to the embeddings (GPT-2), by their checkpoint name; None for none.
    position_embedding_name: str | None = None
    checkpoint_in_out: bool = False                     # projections stored [in, out] (GPT-2's Conv1D)
    inverse_layer_scale: bool = False                   # layer i's attention scale divided by i + 1
    qk_norm: str | None = None                          # None, "head" (per head) or "full" (over all heads)
    qk_norm_after_rope: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    gated_mlp: bool = True
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    attn_softcap: float | None = None                   # attention scores soft-capped (Gemma 2)
    final_softcap: float | None = None                  # output logits soft-capped (Gemma 2)
    moe: MoeSpec | None = None                          # experts in place of the MLP (on its sparse layers)
    attention_sinks: bool = False                       # a learned sink logit per head (gpt-oss)
    embed_name: str = "model.embed_tokens.weight"
    layer_prefix: str = "model.layers"
    final_norm_name: str = "model.norm.weight"

    @property
    def is_plain_stack(self) -> bool:
        """The shape the one-call native stack computes: pre-norm RMSNorm, (per-head q/k norms before
        RoPE,) RoPE on every layer, SiLU-gated MLP, no multipliers."""
        names = self.names
        return (names.attn_out_norm is None and names.mlp_out_norm is None and names.attn_in_norm is not None
                and names.mlp_in_norm is not None and self.norm_weight_offset == 0.0 and self.norm_kind == "rms"
                and not self.parallel_block and self.rotary_dim in (None, self.head_dim) and not self.lm_head_bias
                and self.position_embedding_name is None and not self.rotary_interleaved
                and self.qk_norm in (None, "head") and not self.qk_norm_after_rope and all(self.rope_layers)
                and self.gated_mlp and self.activation == "silu" and self.embedding_multiplier == 1.0
                and self.residual_multiplier == 1.0 and self.attn_softcap is None and len(set(self.rope_kinds)) == 1
                and self.moe is None and not self.attention_sinks)


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _head_dim(config) -> int:
    return _get(config, "head_dim", default=config.hidden_size // config.num_attention_heads)


def _layer_windows(config) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise UnsupportedModelError(f"layer types {sorted(unknown)} are not supported (only attention layers)")
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    return (window,) * config.num_hidden_layers


def _base(config, **options) -> DecoderSpec:
    """The Llama shape from a config's standard fields; a family overrides what differs."""
    head_dim = _head_dim(config)
    spec = DecoderSpec(
        model_type=config.model_type, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_heads=config.num_attention_heads,
        num_kv_heads=_get(config, "num_key_value_heads", default=config.num_attention_heads), head_dim=head_dim,
        vocab_size=config.vocab_size, eps=_get(config, "rms_norm_eps", "layer_norm_eps", "norm_epsilon"),
        activation=_get(config, "hidden_act", "hidden_activation", default="silu"),
        layer_windows=_layer_windows(config), rope_layers=(True,) * config.num_hidden_layers,
        rope_kinds=("default",) * config.num_hidden_layers,
        attention_scale=head_dim ** -0.5, tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(config, "attention_bias", False)), o_bias=bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)))
    return replace(spec, **options)


def _llama(config) -> DecoderSpec:
    return _base(config)


def _qwen2(config) -> DecoderSpec:
    return _base(config, qkv_bias=True, o_bias=False)


def _qwen3(config) -> DecoderSpec:
    return _base(config, qk_norm="head")


def _qwen3_moe(config) -> DecoderSpec:
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    sparse = tuple(i not in dense and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
                   for i in range(config.num_hidden_layers))
    return _base(config, qk_norm="head", moe=MoeSpec(config.num_experts, config.num_experts_per_tok,
                                                     config.moe_intermediate_size, bool(config.norm_topk_prob), sparse))


def _mixtral(config) -> DecoderSpec:
    return _base(config, moe=MoeSpec(config.num_local_experts, config.num_experts_per_tok, config.intermediate_size,
                                     True, (True,) * config.num_hidden_layers))


def _gpt_oss(config) -> DecoderSpec:
    moe = MoeSpec(config.num_local_experts, config.num_experts_per_tok, config.intermediate_size, False,
                  (True,) * config.num_hidden_layers, routing="topk_softmax", router_name="router", biases=True,
                  gpt_oss_experts=True, swiglu_alpha=float(config.swiglu_alpha), swiglu_limit=float(config.swiglu_limit))
    return _base(config, moe=moe, attention_sinks=True)


def _seed_oss(config) -> DecoderSpec:
    return _base(config, o_bias=bool(getattr(config, "attention_out_bias", False)))


def _smollm3(config) -> DecoderSpec:
    return _base(config, rope_layers=tuple(bool(flag) for flag in config.no_rope_layers))


def _granite(config) -> DecoderSpec:
    return _base(config, attention_scale=float(config.attention_multiplier),
                 embedding_multiplier=float(config.embedding_multiplier),
                 residual_multiplier=float(config.residual_multiplier), logits_divisor=float(config.logits_scaling))


_POST_NORMS = LayerNames(attn_in_norm=None, attn_out_norm="post_attention_layernorm", mlp_in_norm=None,
                         mlp_out_norm="post_feedforward_layernorm")


def _olmo2(config) -> DecoderSpec:
    return _base(config, names=_POST_NORMS, qk_norm="full")


def _exaone4(config) -> DecoderSpec:
    # With sliding windows, only the sliding layers rotate (the full-attention layers have no RoPE).
    windows = _layer_windows(config)
    rope_layers = tuple(window is not None for window in windows) if any(windows) else (True,) * len(windows)
    return _base(config, names=_POST_NORMS, qk_norm="head", rope_layers=rope_layers)


def _rotary_dim(config) -> int:
    """The rotated channels per head: HF's modeling code reads the factor from rope_parameters first."""
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor")
    if factor is None:
        factor = _get(config, "partial_rotary_factor", "rotary_pct", default=1.0)
    return int(_head_dim(config) * factor)


def _phi3(config) -> DecoderSpec:
    return _base(config, names=LayerNames(qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",)),
                 rotary_dim=_rotary_dim(config))


def _no_qk_layernorm(config) -> None:
    if getattr(config, "qk_layernorm", False):
        raise UnsupportedModelError(f"{config.model_type} with qk_layernorm has no native spec yet")


def _phi(config) -> DecoderSpec:
    _no_qk_layernorm(config)
    names = LayerNames(mlp_in_norm=None, o_proj="self_attn.dense", gate_up=("mlp.fc1",), down="mlp.fc2")
    return _base(config, names=names, norm_kind="layer", norm_bias=True, parallel_block=True, qkv_bias=True,
                 o_bias=True, mlp_bias=True, gated_mlp=False, rotary_dim=_rotary_dim(config), lm_head_bias=True,
                 final_norm_name="model.final_layernorm.weight")


def _stablelm(config) -> DecoderSpec:
    _no_qk_layernorm(config)
    parallel = bool(config.use_parallel_residual)
    names = LayerNames(mlp_in_norm=None) if parallel else LayerNames()
    return _base(config, names=names, norm_kind="layer", norm_bias=True, parallel_block=parallel,
                 qkv_bias=bool(config.use_qkv_bias), o_bias=False, rotary_dim=_rotary_dim(config))


def _starcoder2(config) -> DecoderSpec:
    bias = bool(config.use_bias)
    return _base(config, names=LayerNames(gate_up=("mlp.c_fc",), down="mlp.c_proj"), norm_kind="layer",
                 norm_bias=True, qkv_bias=bias, o_bias=bias, mlp_bias=bias, gated_mlp=False)


def _gemma(config) -> DecoderSpec:
    # Gemma scales the embeddings by sqrt(hidden) rounded to the compute dtype (float32 here).
    import numpy as np
    return _base(config, norm_weight_offset=1.0, embedding_multiplier=float(np.float32(config.hidden_size ** 0.5)),
                 tied_embeddings=True)


_SANDWICH_NORMS = LayerNames(attn_out_norm="post_attention_layernorm", mlp_in_norm="pre_feedforward_layernorm",
                             mlp_out_norm="post_feedforward_layernorm")


def _gemma2(config) -> DecoderSpec:
    return replace(_gemma(config), names=_SANDWICH_NORMS, attention_scale=config.query_pre_attn_scalar ** -0.5,
                   attn_softcap=config.attn_logit_softcapping, final_softcap=config.final_logit_softcapping)


def _gemma3_text(config) -> DecoderSpec:
    # Sliding and full layers rotate with tables of their own (a local and a global RoPE base).
    return replace(_gemma2(config), qk_norm="head", rope_kinds=tuple(config.layer_types))


def _arcee(config) -> DecoderSpec:
    return _base(config, gated_mlp=False, names=LayerNames(gate_up=("mlp.up_proj",)))


def _hunyuan_v1_dense(config) -> DecoderSpec:
    return _base(config, qk_norm="head", qk_norm_after_rope=True,
                 names=LayerNames(q_norm="self_attn.query_layernorm", k_norm="self_attn.key_layernorm"))


def _cohere(config) -> DecoderSpec:
    if getattr(config, "use_qk_norm", False):
        raise UnsupportedModelError("cohere with use_qk_norm has no native spec yet")
    return _base(config, names=LayerNames(mlp_in_norm=None), norm_kind="layer", parallel_block=True,
                 rotary_interleaved=True, logits_multiplier=float(config.logit_scale), tied_embeddings=True)


def _glm4(config) -> DecoderSpec:
    names = LayerNames(attn_out_norm="post_self_attn_layernorm", mlp_out_norm="post_mlp_layernorm",
                       gate_up=("mlp.gate_up_proj",))
    return _base(config, names=names, qkv_bias=bool(config.attention_bias), o_bias=False,
                 rotary_dim=_rotary_dim(config), rotary_interleaved=True)


def _gpt_neox(config) -> DecoderSpec:
    parallel = bool(config.use_parallel_residual)
    names = LayerNames(qkv=("attention.query_key_value",), o_proj="attention.dense", gate_up=("mlp.dense_h_to_4h",),
                       down="mlp.dense_4h_to_h")
    bias = bool(getattr(config, "attention_bias", True))
    return _base(config, names=names, norm_kind="layer", norm_bias=True, parallel_block=parallel, qkv_bias=bias,
                 o_bias=bias, mlp_bias=True, gated_mlp=False, rotary_dim=_rotary_dim(config), qkv_per_head=True,
                 embed_name="gpt_neox.embed_in.weight", layer_prefix="gpt_neox.layers",
                 final_norm_name="gpt_neox.final_layer_norm.weight")


def _apertus(config) -> DecoderSpec:
    names = LayerNames(attn_in_norm="attention_layernorm", mlp_in_norm="feedforward_layernorm",
                       gate_up=("mlp.up_proj",))
    return _base(config, names=names, qk_norm="head", gated_mlp=False)


def _gpt2(config) -> DecoderSpec:
    hidden, heads = config.n_embd, config.n_head
    names = LayerNames(attn_in_norm="ln_1", mlp_in_norm="ln_2", qkv=("attn.c_attn",), o_proj="attn.c_proj",
                       gate_up=("mlp.c_fc",), down="mlp.c_proj")
    layers = config.n_layer
    return DecoderSpec(
        model_type="gpt2", num_layers=layers, hidden_size=hidden, intermediate_size=config.n_inner or 4 * hidden,
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, vocab_size=config.vocab_size,
        eps=config.layer_norm_epsilon, activation=config.activation_function, layer_windows=(None,) * layers,
        rope_layers=(False,) * layers, rope_kinds=("default",) * layers,
        attention_scale=(hidden // heads) ** -0.5 if config.scale_attn_weights else 1.0,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", True)), names=names, norm_kind="layer",
        norm_bias=True, qkv_bias=True, o_bias=True, mlp_bias=True, gated_mlp=False,
        embed_name="transformer.wte.weight", layer_prefix="transformer.h", final_norm_name="transformer.ln_f.weight",
        position_embedding_name="transformer.wpe.weight", checkpoint_in_out=True,
        inverse_layer_scale=bool(config.scale_attn_by_inverse_layer_idx))


FAMILIES: dict[str, Callable[[object], DecoderSpec]] = {
    "llama": _llama, "mistral": _llama, "ministral": _llama, "qwen2": _qwen2, "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "gpt_oss": _gpt_oss,
    "seed_oss": _seed_oss, "smollm3": _smollm3, "granite": _granite, "olmo2": _olmo2, "olmo3": _olmo2,
    "exaone4": _exaone4, "phi3": _phi3, "gemma": _gemma, "gemma2": _gemma2, "gemma3_text": _gemma3_text,
    "arcee": _arcee, "hunyuan_v1_dense": _hunyuan_v1_dense, "phi": _phi, "stablelm": _stablelm,
    "starcoder2": _starcoder2, "gpt2": _gpt2, "cohere": _cohere, "glm4": _glm4, "gpt_neox": _gpt_neox,
    "apertus": _apertus,
}

# RoPE kinds whose frequencies do not depend on the sequence length: the table is computed once.
_STATIC_ROPE = {None, "default", "linear", "llama3", "yarn", "ntk", "dynamic_ntk_alpha"}


def _check_rope(config) -> None:
    parameters = _get(config, "rope_parameters", "rope_scaling", default={}) or {}
    kind = parameters.get("rope_type", parameters.get("type"))
    if kind not in _STATIC_ROPE:
        raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported yet (its frequencies depend on the "
                                    "sequence length); supported: default, linear, llama3, yarn")


def decoder_spec(config) -> DecoderSpec:
    """The spec of an HF config; UnsupportedModelError naming what is missing for any other."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UnsupportedModelError(f"architecture {config.model_type!r} is not supported")
    _check_rope(config)
    return family(config)
