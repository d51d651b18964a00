"""ctypes bindings of decoder.c: every layer of a Llama-family stack over decode rows in one native call
(`decoder_forward`), and a chain of greedy or drawn tokens in one call (`decoder_greedy_chain`: a draft
model's greedy drafts, the engine's chained decode steps). The speculating chains built on the stack bind
in speculating_chains.py."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from models.kernels import _library


class DecoderShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim", "block_size")]
    _fields_ += [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


# The projections of a layer, each a LinearWeights (models/kernels/linear.h) that the table points to.
PROJECTIONS = ("qkv", "o_proj", "gate_up", "down")


class DecoderLayer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("input_norm", "post_norm", "q_norm", "k_norm", *PROJECTIONS, "qkv_bias", "o_bias", "gate_up_bias",
                 "down_bias", "key_cache", "value_cache")]
    _fields_ += [("window", ctypes.c_int64)]


class DecodeRows(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("slots", "block_tables", "context_lens", "extra_positions", "extra_counts")]
    _fields_ += [("max_blocks", ctypes.c_int64), ("max_extra", ctypes.c_int64)]


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def decoder_layers(layers: list[dict[str, torch.Tensor | int | None]]) -> ctypes.Array:
    """The layer table decoder_forward reads: per layer its norms, projections (LinearWeights), biases
    (None for none), cache tensors and window (0 for none). The tensors and weights must outlive the table."""
    table = (DecoderLayer * len(layers))()
    for entry, layer in zip(table, layers):
        for name, _ in DecoderLayer._fields_[:-1]:
            value = layer[name]
            if name in PROJECTIONS:
                setattr(entry, name, ctypes.addressof(value))
                continue
            assert value is None or (value.dtype == torch.float32 and value.is_contiguous()), name
            setattr(entry, name, _address(value))
        entry.window = layer["window"] or 0
    return table


def decoder_forward(shape: DecoderShape, layers: ctypes.Array, x: torch.Tensor, cos: torch.Tensor,
                    signed_sin: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, extra_positions: torch.Tensor | None,
                    extra_counts: torch.Tensor | None, final_norm: torch.Tensor,
                    keep: torch.Tensor | None) -> torch.Tensor:
    """Every layer and the final norm over x [T, hidden] (overwritten), each token a decode row of the
    paged kernel (its slot, block table, context length and extra positions as paged_decode_attention
    reads them). -> [len(keep) or T, hidden]."""
    tokens = x.shape[0]
    assert x.is_contiguous() and cos.is_contiguous() and signed_sin.is_contiguous()
    rows = DecodeRows(slots.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
                      _address(extra_positions), _address(extra_counts), block_tables.shape[1],
                      0 if extra_positions is None else extra_positions.shape[1])
    library = _library()
    scratch = torch.empty(library.decoder_scratch_floats(ctypes.byref(shape), tokens), dtype=torch.float32)
    if keep is not None:
        keep = keep.contiguous()
    out = torch.empty(tokens if keep is None else keep.numel(), shape.hidden, dtype=torch.float32)
    library.decoder_forward(ctypes.byref(shape), layers, len(layers), ctypes.byref(rows), cos.data_ptr(),
                            signed_sin.data_ptr(), x.data_ptr(), tokens, _address(keep),
                            -1 if keep is None else keep.numel(), final_norm.data_ptr(), scratch.data_ptr(),
                            out.data_ptr())
    return out


class ChainFeed(ctypes.Structure):
    _fields_ = [("tokens", ctypes.c_void_p), ("last", ctypes.c_void_p), ("rows", DecodeRows),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("count", ctypes.c_int64)]


@dataclass
class GreedyChain:
    """What decoder_greedy_chain reads (int64 tensors, contiguous). Step 0 runs the stack over
    feed_tokens [F], what each of the R rows' caches lacks (feed_last [R]: each row's final one), as
    decode rows with feed_slots [F], feed_tables [F, max_blocks], feed_context [F]; each later step over
    one token per row, the row's newest draft, with slots [steps - 1, R], tables [R, max_blocks] and
    context [R] of step 1. cos/signed_sin [F + (steps - 1) * R, head_dim]: the feed's rows, then the later
    steps'. Row r's stop tokens banned [R, max_banned] (-1 padded) are -inf in its first banned_steps[r]
    steps."""

    feed_tokens: torch.Tensor
    feed_last: torch.Tensor
    feed_slots: torch.Tensor
    feed_tables: torch.Tensor
    feed_context: torch.Tensor
    slots: torch.Tensor
    tables: torch.Tensor
    context: torch.Tensor
    cos: torch.Tensor
    signed_sin: torch.Tensor
    banned: torch.Tensor
    banned_steps: torch.Tensor


class _ChainSampling(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("temperature", "greedy", "want_raw", "uniforms", "logprobs", "raw_logprobs")]


@dataclass
class ChainDraws:
    """How decoder_greedy_chain draws each step's tokens instead of taking the argmax: sample_rows' rule, per
    row its temperature [R] float32, greedy and want_raw [R] uint8, and per step and row the uniform of the
    position drawn for, uniforms [steps, R] float32. The call fills logprobs and raw_logprobs [steps, R]: the
    chosen tokens' logprobs under the sampled distribution and under temperature 1 (where want_raw)."""

    temperature: torch.Tensor
    greedy: torch.Tensor
    want_raw: torch.Tensor
    uniforms: torch.Tensor
    logprobs: torch.Tensor
    raw_logprobs: torch.Tensor


def decoder_greedy_chain(shape: DecoderShape, layers: ctypes.Array, embed: torch.Tensor, final_norm: torch.Tensor,
                         lm_head: ctypes.Structure, vocab: int, chain: GreedyChain,
                         draws: ChainDraws | None = None, step_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """chain.slots.shape[0] + 1 tokens for each row in one call: every step the stack (see GreedyChain), the
    output head (a LinearWeights) and the argmax, or with `draws` each row's draw as sample_rows makes it;
    step_hidden [steps, R, hidden] (contiguous float32), when given, receives every step's final hidden states.
    -> tokens [steps, R]."""
    later_steps, rows = chain.slots.shape
    num_feed = chain.feed_tokens.numel()
    assert chain.feed_last.numel() == rows and chain.cos.shape[0] == num_feed + later_steps * rows
    assert chain.cos.is_contiguous() and chain.signed_sin.is_contiguous() and embed.is_contiguous()
    feed_cos, feed_sin = chain.cos.data_ptr(), chain.signed_sin.data_ptr()
    offset = num_feed * chain.cos.stride(0) * chain.cos.element_size()
    feed = ChainFeed(chain.feed_tokens.data_ptr(), chain.feed_last.data_ptr(),
                     DecodeRows(chain.feed_slots.data_ptr(), chain.feed_tables.data_ptr(), chain.feed_context.data_ptr(),
                                None, None, chain.feed_tables.shape[1], 0),
                     feed_cos, feed_sin, num_feed)
    later = DecodeRows(chain.slots.data_ptr(), chain.tables.data_ptr(), chain.context.data_ptr(), None, None,
                       chain.tables.shape[1], 0)
    library = _library()
    scratch = torch.empty(library.decoder_greedy_chain_scratch_floats(ctypes.byref(shape), rows, num_feed, vocab),
                          dtype=torch.float32)
    out = torch.empty(later_steps + 1, rows, dtype=torch.int64)
    assert step_hidden is None or (step_hidden.shape == (later_steps + 1, rows, shape.hidden)
                                   and step_hidden.is_contiguous())
    sampling = None
    if draws is not None:
        assert draws.uniforms.shape == draws.logprobs.shape == draws.raw_logprobs.shape == out.shape
        assert draws.temperature.dtype == draws.uniforms.dtype == torch.float32 and draws.greedy.dtype == torch.uint8
        sampling = ctypes.byref(_ChainSampling(*(tensor.data_ptr() for tensor in (
            draws.temperature, draws.greedy, draws.want_raw, draws.uniforms, draws.logprobs, draws.raw_logprobs))))
    library.decoder_greedy_chain(ctypes.byref(shape), layers, len(layers), ctypes.byref(feed), ctypes.byref(later),
                                 feed_cos + offset, feed_sin + offset, embed.data_ptr(), final_norm.data_ptr(),
                                 ctypes.byref(lm_head), vocab, rows, later_steps + 1, chain.banned.data_ptr(),
                                 chain.banned.shape[1], chain.banned_steps.data_ptr(), sampling, _address(step_hidden),
                                 scratch.data_ptr(), out.data_ptr())
    return out
