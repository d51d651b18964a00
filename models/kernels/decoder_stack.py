"""ctypes bindings of decoder.c: every layer of a Llama-family stack over decode rows in one native call
(`decoder_forward`), and a chain of greedy or drawn tokens in one call (`decoder_greedy_chain`: a draft
model's greedy drafts, the engine's chained decode steps); and of medusa_chain.c, Medusa's speculating
rounds for one sequence in one call (`decoder_medusa_chain`)."""

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


class _MedusaNativeHeads(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("first", "first_bias", "later", "later_bias", "projections", "vocab_map")]
    _fields_ += [(name, ctypes.c_int64) for name in ("used", "layers", "num_projections", "draft_vocab")]


class _MedusaTree(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("parents", "ranks")]
    _fields_ += [(name, ctypes.c_int64) for name in ("nodes", "top_k", "max_depth")]


class _MedusaRun(ctypes.Structure):
    _fields_ = [("token", ctypes.c_int64), ("position", ctypes.c_int64), ("block_table", ctypes.c_void_p),
                ("max_blocks", ctypes.c_int64), ("hidden", ctypes.c_void_p), ("cos", ctypes.c_void_p),
                ("sin", ctypes.c_void_p), ("banned", ctypes.c_void_p)]
    _fields_ += [(name, ctypes.c_int64) for name in
                 ("num_banned", "banned_tokens", "max_tokens", "max_rounds", "depth_room")]
    _fields_ += [("uniforms", ctypes.c_void_p), ("temperature", ctypes.c_float), ("greedy", ctypes.c_uint8),
                 ("want_raw", ctypes.c_uint8)]


class _MedusaOutcome(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("tokens", "verified", "accepted", "logprobs", "raw_logprobs", "hidden")]
    _fields_ += [("emitted", ctypes.c_int64), ("rounds", ctypes.c_int64)]


class MedusaChainHeads:
    """Medusa's heads and candidate tree as decoder_medusa_chain reads them (medusa_chain.c), built once:
    `first` the first ResBlock layer of every used head as one product (bias [used * hidden]), `later`
    [layer - 1][head] the others (LinearWeights, bias or None), `projections` one shared or one per head,
    `vocab_map` the projection rows' token ids (None: the rows are token ids); the tree as `parents` (-1:
    the newest token) and ranks per node, and its depth. The weights' tensors must outlive it."""

    def __init__(self, first: ctypes.Structure, first_bias: torch.Tensor, later: list[list[tuple]],
                 projections: list[ctypes.Structure], vocab_map: torch.Tensor | None, draft_vocab: int,
                 parents: list[int], ranks: list[int], max_depth: int):
        self._first = first
        self._first_bias = first_bias.contiguous()
        flat = [entry for layer in later for entry in layer]
        self._later = (type(first) * max(len(flat), 1))(*(weights for weights, _ in flat))
        self._later_bias = (ctypes.c_void_p * max(len(flat), 1))(*(_address(bias) for _, bias in flat))
        self._projections = (type(first) * len(projections))(*projections)
        self._vocab_map = None if vocab_map is None else vocab_map.to(torch.int64).contiguous()
        self.top_k = max(ranks) + 1
        if self.top_k > 64:
            raise ValueError(f"the native Medusa chain takes ranks below 64, the tree asks for {self.top_k}")
        self._tree = torch.tensor([parents, ranks], dtype=torch.int64)
        self.max_depth = max_depth
        used = self.max_depth       # the heads the tree reaches, as many as the first product's parts
        self.heads = _MedusaNativeHeads(ctypes.addressof(self._first), self._first_bias.data_ptr(),
                                        ctypes.addressof(self._later), ctypes.addressof(self._later_bias),
                                        ctypes.addressof(self._projections), _address(self._vocab_map),
                                        used, len(later) + 1, len(projections), draft_vocab)
        self.tree = _MedusaTree(self._tree[0].data_ptr(), self._tree[1].data_ptr(), len(parents), self.top_k,
                                self.max_depth)


@dataclass
class MedusaChainRun:
    """One greedy sequence for decoder_medusa_chain: its newest token (not in the cache yet) at `position`,
    its block table (int64, slots reserved for max_tokens + the tree's nodes past position), the final hidden
    state [hidden] its newest token came from, the rotary tables cos / signed_sin [positions, head_dim]
    (past position + max_tokens + the tree's depth), its stop tokens (int64) at -inf while fewer than
    banned_tokens have been emitted, rounds started while fewer than max_tokens are emitted (max_rounds at
    most), and depth_room: after e tokens a round verifies no node deeper than depth_room - e (none: the call
    ends), as Proposal.trimmed cuts a tree near the request's end. With `draws`, each row draws as
    sample_rows does (ChainDraws' rule for one row: temperature [1], greedy and want_raw [1], uniforms
    [max_tokens + the tree's depth] the uniform of each token from here on) instead of taking the argmax."""

    token: int
    position: int
    block_table: torch.Tensor
    hidden: torch.Tensor
    cos: torch.Tensor
    signed_sin: torch.Tensor
    banned: torch.Tensor
    banned_tokens: int
    max_tokens: int
    max_rounds: int
    depth_room: int
    draws: ChainDraws | None = None


@dataclass
class MedusaChained:
    """What decoder_medusa_chain did: the tokens emitted, per round the nodes verified and the draft tokens
    kept, and the final hidden state of the newest computed token (the next proposal's input); with draws,
    each token's logprobs under the sampled distribution and under temperature 1."""

    tokens: list[int]
    verified: list[int]
    accepted: list[int]
    hidden: torch.Tensor
    logprobs: list[float] | None = None
    raw_logprobs: list[float] | None = None


def decoder_medusa_chain(shape: DecoderShape, layers: ctypes.Array, embed: torch.Tensor, final_norm: torch.Tensor,
                         lm_head: ctypes.Structure, vocab: int, heads: MedusaChainHeads,
                         run: MedusaChainRun) -> MedusaChained:
    """Up to run.max_rounds of Medusa's speculating steps for one greedy sequence in one call, stopping once
    max_tokens are emitted (medusa_chain.c)."""
    for table in (run.cos, run.signed_sin):
        assert table.is_contiguous() and table.dtype == torch.float32 and table.shape[1] == shape.head_dim
    hidden = run.hidden.contiguous()
    table = run.block_table.to(torch.int64).contiguous()
    banned = run.banned.to(torch.int64).contiguous()
    library = _library()
    scratch = torch.empty(library.decoder_medusa_chain_scratch_floats(
        ctypes.byref(shape), ctypes.byref(heads.heads), ctypes.byref(heads.tree), vocab, table.numel()),
        dtype=torch.float32)
    length = run.max_tokens + heads.max_depth
    tokens = torch.empty(length, dtype=torch.int64)
    rounds = torch.empty(2, run.max_rounds, dtype=torch.int64)      # verified, accepted
    final_hidden = torch.empty(shape.hidden, dtype=torch.float32)
    logprobs = torch.empty(2, length, dtype=torch.float32)
    draws = run.draws
    if draws is not None:
        uniforms = draws.uniforms
        assert uniforms.dtype == torch.float32 and uniforms.is_contiguous() and uniforms.numel() >= length
    spec = _MedusaRun(run.token, run.position, table.data_ptr(), table.numel(), hidden.data_ptr(), run.cos.data_ptr(),
                      run.signed_sin.data_ptr(), banned.data_ptr(), banned.numel(), run.banned_tokens, run.max_tokens,
                      run.max_rounds, run.depth_room, None if draws is None else draws.uniforms.data_ptr(),
                      1.0 if draws is None else float(draws.temperature[0]),
                      0 if draws is None else int(draws.greedy[0]), 0 if draws is None else int(draws.want_raw[0]))
    outcome = _MedusaOutcome(tokens.data_ptr(), rounds[0].data_ptr(), rounds[1].data_ptr(), logprobs[0].data_ptr(),
                             logprobs[1].data_ptr(), final_hidden.data_ptr(), 0, 0)
    library.decoder_medusa_chain(ctypes.byref(shape), layers, len(layers), embed.data_ptr(), final_norm.data_ptr(),
                                 ctypes.byref(lm_head), vocab, ctypes.byref(heads.heads), ctypes.byref(heads.tree),
                                 ctypes.byref(spec), scratch.data_ptr(), ctypes.byref(outcome))
    emitted, (verified, accepted) = outcome.emitted, rounds[:, : outcome.rounds].tolist()
    if draws is None:
        return MedusaChained(tokens[:emitted].tolist(), verified, accepted, final_hidden)
    return MedusaChained(tokens[:emitted].tolist(), verified, accepted, final_hidden, logprobs[0, :emitted].tolist(),
                         logprobs[1, :emitted].tolist())
