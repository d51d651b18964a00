"""The transformers fallback: any other decoder-only causal LM of transformers, served with Gorgon's paged
KV cache. HF's own modules run unchanged; only attention is routed, through transformers' attention
interface, to Gorgon's paged attention (the kernels the native decoder uses), so continuous batching,
prefix caching, groups, beams, speculation, constraints and weight pushes work on it as on a native
family, only slower. The step's cache and metadata reach the attention function through a thread-local
binding set around each forward: the engine steps one model at a time on its own thread.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from models import kernels
from models.attention import AttentionMetadata, PagedKVCache, ScoreOptions, Segment, paged_attention
from models.families import UnsupportedModelError
from models.layers import FusedLinear, ParamSlot, scale_logits

ATTENTION_IMPLEMENTATION = "gorgon_paged"
_bound = threading.local()


def paged_attention_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers' attention-interface contract: query [1, heads, T, d], key/value [1, kv_heads, T, d]
    of the step's packed tokens -> ([1, T, heads, d_v], None). The HF mask is never built (a custom
    implementation has none); each token's visibility comes from the step's metadata."""
    cache, meta = _bound.step
    _bound.calls += 1
    _bound.bidirectional |= getattr(module, "is_causal", True) is False
    cache_dim = cache.keys[module.layer_idx].shape[-1]
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))          # [T, heads, d]
    value_dim = v.shape[-1]
    if value_dim < cache_dim:       # MLA: values narrower than keys share the keys' cache width
        v = F.pad(v, (0, cache_dim - value_dim))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    sinks = None if s_aux is None else s_aux.detach().float().contiguous()
    out = paged_attention(q.contiguous(), k.contiguous(), v.contiguous(), module.layer_idx, cache, meta, scale,
                          sliding_window, scores=ScoreOptions(softcap, sinks))
    out = out.view(q.shape[0], q.shape[1], cache_dim)[..., :value_dim]
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_IMPLEMENTATION, paged_attention_interface)


def short_conv_forward(module, hidden_states, past_key_values=None, attention_mask=None, **kwargs):
    """LFM2's short convolution over the paged cache, in place of its own forward: each token's B * x is
    written at its cache slot, and the depthwise convolution reads the previous kernel - 1 of them back
    through the step's history slots (AttentionMetadata.history_slots), so prefix caching, forks and
    rollbacks hold for it as for keys and values."""
    cache, meta = _bound.step
    _bound.calls += 1
    gate_in, gate_out, x = module.in_proj(hidden_states[0]).chunk(3, dim=-1)    # [T, hidden] each
    inputs = gate_in * x
    stored = cache.keys[module.layer_idx].view(-1, inputs.shape[-1])
    stored.index_copy_(0, meta.slot_mapping, inputs)
    history = meta.history_slots                                                # [T, kernel - 1], nearest first
    past = stored.index_select(0, history.clamp(min=0).view(-1)).view(*history.shape, -1)
    past = past * (history >= 0).unsqueeze(-1).to(past.dtype)
    window = torch.cat((past.flip(1), inputs.unsqueeze(1)), dim=1)             # [T, kernel, hidden], oldest first
    out = (window * module.conv.weight.squeeze(1).t()).sum(dim=1)
    if module.conv.bias is not None:
        out = out + module.conv.bias
    return module.out_proj(gate_out * out).unsqueeze(0)


def _route_short_convolutions(decoder: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Every short-convolution module (LFM2's), by layer, made to run over the paged cache."""
    convs = {}
    for module in decoder.modules():
        if type(module).__name__.endswith("ShortConv") and isinstance(getattr(module, "conv", None), torch.nn.Conv1d):
            module.forward = short_conv_forward.__get__(module)
            convs[module.layer_idx] = module
    return convs


@contextmanager
def _bind(cache: PagedKVCache, meta: AttentionMetadata):
    _bound.step, _bound.calls, _bound.bidirectional = (cache, meta), 0, False
    try:
        yield
    finally:
        _bound.step = None


def check_fallback_config(config) -> None:
    """Refuse, from the config alone, what the fallback cannot serve, saying why."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{config.model_type} is an encoder-decoder model; Gorgon serves decoder-only LMs")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"{config.model_type} is not a causal LM architecture of transformers")
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise UnsupportedModelError(f"{config.model_type} is an encoder (it attends bidirectionally); Gorgon serves "
                                    "decoder-only causal LMs")
    kinds = set(getattr(config, "layer_types", None) or ())
    other = kinds - {"full_attention", "sliding_attention", "conv"}
    if other:
        raise UnsupportedModelError(f"{config.model_type} has layers with recurrent state ({', '.join(sorted(other))}), "
                                    "which the paged KV cache cannot hold")


def attention_shape(config) -> tuple[int, int]:
    """(cache heads, cache head width): MLA caches one key per query head, as wide as the wider of its
    keys and values."""
    if getattr(config, "qk_nope_head_dim", None) is not None:
        key_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        return config.num_attention_heads, max(key_dim, config.v_head_dim)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attention_windows(config) -> frozenset[int | None]:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return frozenset({None})
    return frozenset({None, window})


class PackedLinear(torch.nn.Module):
    """An HF nn.Linear computed by Gorgon's packed product (models/layers.FusedLinear): the same product in
    the layout that streams fastest on the CPU; HF's [out, in] weight is not kept beside it."""

    def __init__(self, linear: torch.nn.Linear, dtype, device):
        super().__init__()
        self.fused = FusedLinear(linear.in_features, [linear.out_features], [linear.bias is not None], dtype, device)
        for slot, tensor in zip(self.slots("").values(), (linear.weight, linear.bias)):
            slot.copy_(tensor.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:                    # [..., in] -> [..., out]
        return self.fused.forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)

    def slots(self, name: str) -> dict[str, ParamSlot]:
        prefix = f"{name}." if name else ""
        return self.fused.slots([f"{prefix}weight"], [f"{prefix}bias"])


def _pack_linears(decoder: torch.nn.Module, dtype, device) -> dict[str, PackedLinear]:
    """Every nn.Linear of the decoder replaced in place by a PackedLinear, by its qualified name."""
    packed = {}
    for name, module in list(decoder.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent_name, _, child = name.rpartition(".")
            packed[name] = PackedLinear(module, dtype, device)
            setattr(decoder.get_submodule(parent_name), child, packed[name])
    return packed


class TransformersCausalLM(torch.nn.Module):
    """An HF causal LM behind the NativeCausalLM contract (models/base.py)."""

    def __init__(self, hf_model, dtype: torch.dtype, device):
        super().__init__()
        config = hf_model.config
        self.config = config
        self.dtype = dtype
        self.decoder = hf_model.base_model.to(device)
        # Where Gorgon's packed product runs (the CPU in float32) it replaces HF's linear layers.
        convs = _route_short_convolutions(self.decoder)
        self.history_layers = {layer: config.hidden_size for layer in convs}
        self.history_length = max((conv.conv.kernel_size[0] - 1 for conv in convs.values()), default=0)
        native = kernels.native_ops_available(torch.device(device), dtype)
        self._packed = _pack_linears(self.decoder, dtype, device) if native else {}
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads, self.head_dim = attention_shape(config)
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.attention_windows = _attention_windows(config)
        head = hf_model.get_output_embeddings().weight
        self.lm_head = FusedLinear(self.hidden_size, [self.vocab_size], [False], dtype, device)
        self.lm_head.slots(["lm_head.weight"], [None])["lm_head.weight"].copy_(head.detach())
        self.embed_name = next(name for name, param in hf_model.named_parameters()
                               if param is hf_model.get_input_embeddings().weight)
        self.tied = head is hf_model.get_input_embeddings().weight
        self.optional_param_names = frozenset({"lm_head.weight"}) if self.tied else frozenset()
        self._prefix = hf_model.base_model_prefix
        self._check_attention_is_routed(device)

    def _check_attention_is_routed(self, device) -> None:
        """One token through the model: every layer must attend through the attention interface. A model
        whose modules compute attention themselves (older modeling code) would read no cache at all and
        answer wrongly; it is refused instead."""
        cache = PagedKVCache(self.num_layers, 2, 1, self.num_kv_heads, self.head_dim, self.dtype, device,
                             self.history_layers)
        one = torch.tensor([1], device=device)
        meta = AttentionMetadata(slot_mapping=one, num_decode_tokens=0, decode_groups=[], segments=[
            Segment(0, 1, one, 1, 1, True, {window: None for window in self.attention_windows})],
            history_slots=torch.full((1, self.history_length), -1, device=device) if self.history_length else None)
        with torch.inference_mode(), _bind(cache, meta):
            self.decoder(input_ids=torch.tensor([[0]], device=device), position_ids=torch.tensor([[0]], device=device),
                         use_cache=False)
            calls, bidirectional = _bound.calls, _bound.bidirectional
        if bidirectional:
            raise UnsupportedModelError(f"{self.config.model_type} attends bidirectionally (an encoder); Gorgon "
                                        "serves decoder-only causal LMs")
        if calls != self.num_layers:
            raise UnsupportedModelError(
                f"{self.config.model_type} computes attention in its own modules, or has layers with state Gorgon "
                f"does not know ({calls} of {self.num_layers} layers go through transformers' attention interface "
                "or a known short convolution), so Gorgon's paged cache cannot serve it")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
                meta: AttentionMetadata, output_rows: torch.Tensor | None = None) -> torch.Tensor:
        with _bind(cache, meta):
            hidden = self.decoder(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        hidden = hidden.last_hidden_state[0]                                                   # [T, hidden]
        return hidden if output_rows is None else hidden[output_rows]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head, then the logit transforms the families' CausalLM heads apply."""
        config = self.config
        return scale_logits(self.lm_head(hidden), getattr(config, "logit_scale", None),
                            getattr(config, "logits_scaling", None), getattr(config, "final_logit_softcapping", None))

    def param_slots(self) -> dict[str, list[ParamSlot]]:
        """HF's own tensors in place (the modules compute with them), and the head's packed copy."""
        # Every tensor of the state dict (persistent buffers too, DeepSeek's router bias), except the
        # packed products' own, which the checkpoint names map onto below.
        slots = {f"{self._prefix}.{name}": [ParamSlot(tensor.data, tuple(tensor.shape))]
                 for name, tensor in self.decoder.state_dict(keep_vars=True).items()
                 if not name.endswith((".fused.weight_t", ".fused.bias"))}
        for name, linear in self._packed.items():
            slots |= {key: [slot] for key, slot in linear.slots(f"{self._prefix}.{name}").items()}
        head = self.lm_head.slots(["lm_head.weight"], [None])["lm_head.weight"]
        if self.tied:
            slots[self.embed_name].append(head)
        slots["lm_head.weight"] = [head]
        return slots
