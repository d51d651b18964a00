"""ctypes bindings of the speculating chains: several speculating rounds for one sequence in one native call,
each round proposing a tree and verifying it on the target (tree_verify.c). Medusa's heads propose in
medusa_chain.c (`decoder_medusa_chain`), an EAGLE draft in eagle_chain.c (`decoder_eagle_chain`)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from models.kernels import _library
from models.kernels.decoder_stack import ChainDraws, DecoderShape, _address


class _SpeculatingRun(ctypes.Structure):
    _fields_ = [("token", ctypes.c_int64), ("position", ctypes.c_int64), ("block_table", ctypes.c_void_p),
                ("max_blocks", ctypes.c_int64), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("banned", ctypes.c_void_p)]
    _fields_ += [(name, ctypes.c_int64) for name in
                 ("num_banned", "banned_tokens", "max_tokens", "max_rounds", "depth_room")]
    _fields_ += [("uniforms", ctypes.c_void_p), ("temperature", ctypes.c_float), ("greedy", ctypes.c_uint8),
                 ("want_raw", ctypes.c_uint8)]


class _SpeculatingOutcome(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("tokens", "verified", "accepted", "logprobs", "raw_logprobs")]
    _fields_ += [("emitted", ctypes.c_int64), ("rounds", ctypes.c_int64)]


@dataclass
class SpeculatingSequence:
    """One sequence whose speculating rounds run in one call: its newest token (not in the cache yet) at
    `position`, its block table (int64, slots reserved for max_tokens + the tree's nodes past position), the
    rotary tables cos / signed_sin [positions, head_dim] (past position + max_tokens + the tree's depth), its
    stop tokens (int64) at -inf while fewer than banned_tokens have been emitted, rounds started while fewer
    than max_tokens are emitted (max_rounds at most), and depth_room: after e tokens a round verifies no node
    deeper than depth_room - e (none: the call ends), as Proposal.trimmed cuts a tree near the request's end.
    With `draws`, each row draws as sample_rows does (ChainDraws' rule for one row: temperature [1], greedy
    and want_raw [1], uniforms [max_tokens + the tree's depth] the uniform of each token from here on)
    instead of taking the argmax."""

    token: int
    position: int
    block_table: torch.Tensor
    cos: torch.Tensor
    signed_sin: torch.Tensor
    banned: torch.Tensor
    banned_tokens: int
    max_tokens: int
    max_rounds: int
    depth_room: int
    draws: ChainDraws | None = None


@dataclass
class ChainedRounds:
    """What a speculating chain did: the tokens emitted, per round the nodes verified and the draft tokens
    kept; with draws, each token's logprobs under the sampled distribution and under temperature 1."""

    tokens: list[int]
    verified: list[int]
    accepted: list[int]
    logprobs: list[float] | None = None
    raw_logprobs: list[float] | None = None


class _Rounds:
    """The C side of one call's sequence and outcome, with the buffers the outcome points to."""

    def __init__(self, shape: DecoderShape, sequence: SpeculatingSequence, max_depth: int):
        for table in (sequence.cos, sequence.signed_sin):
            assert table.is_contiguous() and table.dtype == torch.float32 and table.shape[1] == shape.head_dim
        self.sequence = sequence
        self._table = sequence.block_table.to(torch.int64).contiguous()
        self._banned = sequence.banned.to(torch.int64).contiguous()
        length = sequence.max_tokens + max_depth
        self._tokens = torch.empty(length, dtype=torch.int64)
        self._rounds = torch.empty(2, sequence.max_rounds, dtype=torch.int64)      # verified, accepted
        self._logprobs = torch.empty(2, length, dtype=torch.float32)
        draws = sequence.draws
        if draws is not None:
            assert draws.uniforms.dtype == torch.float32 and draws.uniforms.is_contiguous()
            assert draws.uniforms.numel() >= length
        self.run = _SpeculatingRun(
            sequence.token, sequence.position, self._table.data_ptr(), self._table.numel(), sequence.cos.data_ptr(),
            sequence.signed_sin.data_ptr(), self._banned.data_ptr(), self._banned.numel(), sequence.banned_tokens,
            sequence.max_tokens, sequence.max_rounds, sequence.depth_room,
            None if draws is None else draws.uniforms.data_ptr(), 1.0 if draws is None else float(draws.temperature[0]),
            0 if draws is None else int(draws.greedy[0]), 0 if draws is None else int(draws.want_raw[0]))
        self.outcome = _SpeculatingOutcome(self._tokens.data_ptr(), self._rounds[0].data_ptr(),
                                           self._rounds[1].data_ptr(), self._logprobs[0].data_ptr(),
                                           self._logprobs[1].data_ptr(), 0, 0)

    def result(self) -> ChainedRounds:
        emitted, (verified, accepted) = self.outcome.emitted, self._rounds[:, : self.outcome.rounds].tolist()
        if self.sequence.draws is None:
            return ChainedRounds(self._tokens[:emitted].tolist(), verified, accepted)
        return ChainedRounds(self._tokens[:emitted].tolist(), verified, accepted, self._logprobs[0, :emitted].tolist(),
                             self._logprobs[1, :emitted].tolist())


# ---- Medusa (medusa_chain.c) -------------------------------------------------------------------------

class _MedusaNativeHeads(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("first", "first_bias", "later", "later_bias", "projections", "vocab_map")]
    _fields_ += [(name, ctypes.c_int64) for name in ("used", "layers", "num_projections", "draft_vocab")]


class _MedusaTree(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("parents", "ranks")]
    _fields_ += [(name, ctypes.c_int64) for name in ("nodes", "top_k", "max_depth")]


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


class _MedusaRun(ctypes.Structure):
    _fields_ = [("run", _SpeculatingRun), ("hidden", ctypes.c_void_p)]


class _MedusaOutcome(ctypes.Structure):
    _fields_ = [("rounds", _SpeculatingOutcome), ("hidden", ctypes.c_void_p)]


@dataclass
class MedusaChained(ChainedRounds):
    """What decoder_medusa_chain did, and the final hidden state of the newest computed token (the next
    proposal's input)."""

    hidden: torch.Tensor | None = None


def decoder_medusa_chain(shape: DecoderShape, layers: ctypes.Array, embed: torch.Tensor, final_norm: torch.Tensor,
                         lm_head: ctypes.Structure, vocab: int, heads: MedusaChainHeads, sequence: SpeculatingSequence,
                         hidden: torch.Tensor) -> MedusaChained:
    """Up to sequence.max_rounds of Medusa's speculating steps for one sequence in one call, the heads reading
    `hidden` [hidden], the final hidden state its newest token came from; stops once max_tokens are emitted
    (medusa_chain.c)."""
    rounds = _Rounds(shape, sequence, heads.max_depth)
    hidden = hidden.float().contiguous()
    final_hidden = torch.empty(shape.hidden, dtype=torch.float32)
    run = _MedusaRun(rounds.run, hidden.data_ptr())
    outcome = _MedusaOutcome(rounds.outcome, final_hidden.data_ptr())
    library = _library()
    scratch = torch.empty(library.decoder_medusa_chain_scratch_floats(
        ctypes.byref(shape), ctypes.byref(heads.heads), ctypes.byref(heads.tree), vocab, ctypes.byref(run)),
        dtype=torch.float32)
    library.decoder_medusa_chain(ctypes.byref(shape), layers, len(layers), embed.data_ptr(), final_norm.data_ptr(),
                                 ctypes.byref(lm_head), vocab, ctypes.byref(heads.heads), ctypes.byref(heads.tree),
                                 ctypes.byref(run), scratch.data_ptr(), ctypes.byref(outcome))
    rounds.outcome = outcome.rounds
    return MedusaChained(**vars(rounds.result()), hidden=final_hidden)


# ---- EAGLE (eagle_chain.c) ---------------------------------------------------------------------------

class _EagleNativeDraft(ctypes.Structure):
    _fields_ = [("shape", DecoderShape)]
    _fields_ += [(name, ctypes.c_void_p) for name in ("layer", "fc", "fc_bias", "projection", "token_ids")]
    _fields_ += [(name, ctypes.c_int64) for name in ("vocab", "nodes", "depth", "top_k", "width")]


class _EagleRun(ctypes.Structure):
    _fields_ = [("run", _SpeculatingRun), ("draft_table", ctypes.c_void_p), ("draft_max_blocks", ctypes.c_int64),
                ("draft_computed", ctypes.c_int64), ("draft_cos", ctypes.c_void_p), ("draft_sin", ctypes.c_void_p),
                ("pending_tokens", ctypes.c_void_p), ("pending_features", ctypes.c_void_p),
                ("num_pending", ctypes.c_int64)]


class _EagleOutcome(ctypes.Structure):
    _fields_ = [("rounds", _SpeculatingOutcome), ("features", ctypes.c_void_p), ("num_pending", ctypes.c_int64),
                ("draft_computed", ctypes.c_int64)]


class EagleChainDraft:
    """An EAGLE draft and its greedy tree as decoder_eagle_chain reads them (eagle_chain.c), built once per
    draft cache: `shape` the draft layer's (its cache's block size), `layer` its one-entry layer table over
    that cache (decoder_layers), fc and projection (LinearWeights, fc's bias), the projection rows' token ids,
    and the tree: the `nodes` best candidates kept, `depth` levels, `top_k` candidates per scored row, `width`
    rows per level. The tensors must outlive it (`keep`: what else the layer table points into)."""

    def __init__(self, shape: DecoderShape, layer: ctypes.Array, fc: ctypes.Structure, fc_bias: torch.Tensor,
                 projection: ctypes.Structure, token_ids: torch.Tensor, nodes: int, depth: int, top_k: int, width: int,
                 keep: object = None):
        if top_k > 64:
            raise ValueError(f"the native EAGLE chain takes top_k up to 64, the tree asks for {top_k}")
        self._layer, self._fc, self._projection, self._keep = layer, fc, projection, keep
        self._fc_bias = fc_bias.contiguous()
        self._token_ids = token_ids.to(torch.int64).contiguous()
        self.nodes, self.depth = nodes, depth
        self.draft = _EagleNativeDraft(shape, ctypes.addressof(layer), ctypes.addressof(fc), self._fc_bias.data_ptr(),
                                       ctypes.addressof(projection), self._token_ids.data_ptr(), self._token_ids.numel(),
                                       nodes, depth, top_k, width)


@dataclass
class EagleDraftCache:
    """One sequence's rows in the draft's cache: its block table (int64, slots reserved for the pending rows,
    max_tokens + the tree's depth more and the tree's rows), the rows it holds, the draft's rotary tables
    [positions, head_dim], and the tokens it lacks (int64, the sequence's newest last) with the target's
    feature before each [pending, hidden]."""

    block_table: torch.Tensor
    computed: int
    cos: torch.Tensor
    signed_sin: torch.Tensor
    pending_tokens: torch.Tensor
    pending_features: torch.Tensor


@dataclass
class EagleChained(ChainedRounds):
    """What decoder_eagle_chain did, and the draft's cache after it: the rows it holds and the features
    [pending, hidden] before the newest `pending` emitted tokens, which it lacks."""

    draft_computed: int = 0
    pending_features: torch.Tensor | None = None


def decoder_eagle_chain(shape: DecoderShape, layers: ctypes.Array, embed: torch.Tensor, final_norm: torch.Tensor,
                        lm_head: ctypes.Structure, vocab: int, draft: EagleChainDraft, sequence: SpeculatingSequence,
                        cache: EagleDraftCache) -> EagleChained:
    """Up to sequence.max_rounds of EAGLE's greedy speculating steps for one sequence in one call, stopping
    once max_tokens are emitted (eagle_chain.c); at least one round must fit (depth_room >= 1)."""
    assert sequence.depth_room >= 1 and sequence.max_tokens >= 1 and sequence.max_rounds >= 1
    rounds = _Rounds(shape, sequence, draft.depth)
    table = cache.block_table.to(torch.int64).contiguous()
    tokens = cache.pending_tokens.to(torch.int64).contiguous()
    features = cache.pending_features.float().contiguous()
    assert features.shape == (tokens.numel(), shape.hidden) and tokens.numel() >= 1
    assert int(tokens[-1]) == sequence.token
    for rotary in (cache.cos, cache.signed_sin):
        assert rotary.is_contiguous() and rotary.dtype == torch.float32
    pending = torch.empty(draft.depth + 1, shape.hidden, dtype=torch.float32)
    run = _EagleRun(rounds.run, table.data_ptr(), table.numel(), cache.computed, cache.cos.data_ptr(),
                    cache.signed_sin.data_ptr(), tokens.data_ptr(), features.data_ptr(), tokens.numel())
    outcome = _EagleOutcome(rounds.outcome, pending.data_ptr(), 0, 0)
    library = _library()
    scratch = torch.empty(library.decoder_eagle_chain_scratch_floats(
        ctypes.byref(shape), ctypes.byref(draft.draft), vocab, ctypes.byref(run)), dtype=torch.float32)
    library.decoder_eagle_chain(ctypes.byref(shape), layers, len(layers), embed.data_ptr(), final_norm.data_ptr(),
                                ctypes.byref(lm_head), vocab, ctypes.byref(draft.draft), ctypes.byref(run),
                                scratch.data_ptr(), ctypes.byref(outcome))
    rounds.outcome = outcome.rounds
    assert outcome.num_pending >= 1
    return EagleChained(**vars(rounds.result()), draft_computed=outcome.draft_computed,
                        pending_features=pending[: outcome.num_pending])
