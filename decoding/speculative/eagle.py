"""EAGLE proposals: a one-layer draft head runs ahead of the target on the target's own features
(models/eagle.py) and proposes a tree ranked by its confidence (EAGLE-2).

Per sequence the draft keeps a paged KV cache of its own (one layer, a block table in its own cache,
managed by a KVCacheManager as the draft model's is) over the sequence's generated tokens, and the
target's features of the tokens it has not computed yet: the engine hands over, every step, the final
hidden state before each new token (`observe`). A proposal

1. catches up: the new tokens with their true features, in one draft forward (the rows the last
   proposal drafted were estimates and were rolled back);
2. grows the tree a level at a time (EAGLE-2's expansion): the `width` candidates of highest
   cumulative draft log-probability at a level each get a draft row, which reads the candidate's token
   and its parent row's output as the feature and attends over the context and its own ancestors' rows
   (a `TokenTree` whose earlier levels are already in the draft's cache); the `top_k` tokens of every
   row are the next level's candidates; one batched forward per level for every sequence that drafts;
3. keeps the `nodes` candidates of highest score (a parent always scores at least its children, so
   the kept set is a tree), and expands no candidate whose descendants could no longer be kept.

Greedy requests grow the tree from the draft's argmax ranking. Sampled requests draft one row per
level: under the exact rule the token the request's own pipeline draws from the draft's distribution
with the uniform of that position (coupled with the target's draw), its siblings being the
distribution's next best; under the lossless rule the tree's `drawn` candidates per level, drawn
without replacement (the first with that position's uniform, the others with the request's
generator), the first drafted on, each with the distribution it was drawn from for the rejection rule.
The draft's cache rows of a round are rolled back once it is proposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from decoding.block_manager import BlockManager, NoFreeBlocksError
from decoding.kv_cache_manager import KVCacheManager
from decoding.logits_processing import process_logits
from decoding.runner import ModelRunner
from decoding.sampler import Sampler
from decoding.sampling_metadata import SamplingMetadata
from decoding.sequence import Sequence
from decoding.speculative.draft import DraftState
from decoding.speculative.proposer import AcceptanceRule, Proposal
from decoding.speculative.rejection import inverse_cdf_draw
from decoding.step_plan import ScheduledSeq, TokenTree
from models.attention import PagedKVCache
from models.eagle import EagleDraft, EagleTree
from models.layers import spread_over_vocab

# Features waiting for a sequence that does not speculate now (a batch too large, the governor's choice)
# are kept up to this many; past it the draft's context restarts at the newest token.
MAX_PENDING = 1024


@dataclass
class EagleState(DraftState):
    """The draft's cache for one sequence, as a draft model keeps it, whose row 0 is the sequence's token
    `start`; `features[i]` is the target's feature before token_ids[num_computed + i]."""

    start: int = 0
    features: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Candidate:
    token: int
    score: float              # cumulative draft log-probability
    depth: int
    parent: int               # index of the parent candidate, -1 under the root
    rank: int                 # order among its siblings
    dist: torch.Tensor | None = None    # drawn under the lossless rule: the distribution it was drawn from


@dataclass
class _Growth:
    """One sequence's tree while the draft grows it: every candidate so far; the candidates that got a
    draft row (`expanded`, in the order of their rows in the draft's cache); the level's rows being scored
    (`frontier`, -1 for the root) with their outputs; the chosen candidate of each scored row."""

    frontier: list[int]
    outputs: torch.Tensor
    candidates: list[_Candidate] = field(default_factory=list)
    expanded: list[int] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    _output_of: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self._output_of[-1] = self.outputs

    def parent_outputs(self, expand: list[int]) -> torch.Tensor:
        """The feature each new row reads: its parent's draft output (the root's: the catch-up's)."""
        return torch.cat([self._output_of[self.candidates[c].parent] for c in expand])

    def record_outputs(self, outputs: torch.Tensor) -> None:
        """The draft's outputs at the frontier's rows, in order: the next level's logits and features."""
        for c, row in zip(self.frontier, outputs.split(1)):
            self._output_of[c] = row
        self.outputs = outputs


class EagleProposer:
    wants_hidden_states = True

    def __init__(self, draft: EagleDraft, num_blocks: int, block_size: int, sampler: Sampler,
                 eos_token_ids: frozenset[int], vocab_size: int, device: torch.device, tree: EagleTree | None = None,
                 acceptance: AcceptanceRule = AcceptanceRule()):
        self.draft = draft
        self.tree = tree or draft.tree
        self.max_tokens_per_step = self.tree.max_nodes
        cache = PagedKVCache(1, num_blocks, block_size, draft.num_kv_heads, draft.head_dim, draft.dtype, device)
        self.kv = KVCacheManager(BlockManager(num_blocks, block_size), cache, device)
        self.runner = ModelRunner(draft, cache, device)
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.device = device
        self.acceptance = acceptance
        self._states: dict[int, EagleState] = {}

    # ---- features from the target ------------------------------------------------------------
    def observe(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """hidden [n, hidden]: the target's features before seq's n newest tokens."""
        if not seq.request.params.speculative or seq.request.beam is not None:
            return
        state = self._states.get(seq.seq_id)
        known = len(seq.token_ids) - hidden.shape[0]
        if state is None or state.start + state.num_computed + len(state.features) != known \
                or len(state.features) + hidden.shape[0] > MAX_PENDING:
            # A new sequence, or one whose features were missed (recomputed after preemption, too long
            # without speculating): the draft's context starts at these tokens.
            if state is not None:
                self.kv.free(state)
            state = self._states[seq.seq_id] = EagleState(seq.seq_id, start=known)
        state.features.extend(hidden.clone().unbind(0))     # (not views that keep the step's tensor)

    def state_of(self, seq: Sequence) -> EagleState | None:
        """The draft's cache of `seq`, where it is in step with the sequence: its rows and pending features
        cover every token."""
        state = self._states.get(seq.seq_id)
        if state is None or state.start + state.num_computed + len(state.features) != len(seq.token_ids):
            return None
        return state

    # ---- proposing ---------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Proposal]:
        proposals = [Proposal([]) for _ in seqs]
        rows, items, depths, hidden = self._catch_up(seqs, max_tokens)
        if not items:
            return proposals
        computed = [item.seq.num_computed for item in items]
        growths = [_Growth(frontier=[-1], outputs=hidden[r : r + 1]) for r in range(len(rows))]
        drafting = list(range(len(rows)))
        for depth in range(1, max(depths) + 1):
            # Score the frontier's rows: each one's top_k tokens become the level's candidates.
            owners = [r for r in drafting for _ in growths[r].frontier]
            parents = [parent for r in drafting for parent in growths[r].frontier]
            row_seqs = [seqs[rows[r]] for r in owners]
            drafted = [[] if seq.request.params.is_greedy else self._drafted(growths[r].candidates, parent)
                       for seq, r, parent in zip(row_seqs, owners, parents)]
            logits = self.draft.logits(torch.cat([growths[r].outputs for r in drafting]))
            chosen, ranked = self._choose(row_seqs, drafted, logits)
            for n, (r, parent) in enumerate(zip(owners, parents)):
                growth = growths[r]
                score = growth.candidates[parent].score if parent >= 0 else 0.0
                growth.chosen.append(self._add_candidates(growth.candidates, parent, score, depth, chosen[n],
                                                          ranked[n]))
            # The next level's rows: the best candidates of this level that could still be kept.
            next_items, features, going = [], [], []
            for r in drafting:
                growth = growths[r]
                seq = seqs[rows[r]]
                expand = [] if depth >= depths[r] else self._expansions(growth, depth, seq, max_tokens[rows[r]])
                growth.chosen = []
                if not expand:
                    continue
                state = items[r].seq
                state.token_ids += [growth.candidates[c].token for c in expand]
                earlier = len(growth.expanded)
                growth.expanded += expand
                row_of = {c: i for i, c in enumerate(growth.expanded)}
                tree = TokenTree(tuple(row_of.get(growth.candidates[c].parent, -1) for c in growth.expanded), earlier)
                next_items.append(ScheduledSeq(state, state.num_computed, len(expand), reaches_end=True, tree=tree))
                features.append(growth.parent_outputs(expand))
                growth.frontier = expand
                going.append(r)
            if not going:
                break
            outputs = self._forward(next_items, features, every_row=True)
            for r, item, out in zip(going, next_items, outputs):
                item.seq.num_computed += item.num_new_tokens
                growths[r].record_outputs(out)
            drafting = going
        for r, (i, item) in enumerate(zip(rows, items)):
            self.kv.roll_back(item.seq, computed[r])
            del item.seq.token_ids[computed[r]:]
            proposals[i] = self._proposal(seqs[i], growths[r].candidates, max_tokens[i])
        return proposals

    def _expansions(self, growth: _Growth, depth: int, seq: Sequence, max_tokens: int) -> list[int]:
        """The candidates of level `depth` that get a draft row: a sampled request's drawn token (its path
        follows its own draws); for greedy ones the tree's `width` best of the level (EAGLE-2's expansion).
        A candidate none of whose descendants could be kept (the `nodes` best already score at least as
        high) is not expanded; a drawn tree keeps its path first."""
        if seq.request.params.is_greedy:
            level = sorted((c for c in range(len(growth.candidates)) if growth.candidates[c].depth == depth),
                           key=lambda c: -growth.candidates[c].score)[: self.tree.width]
        else:
            level = [c for c in growth.chosen if c >= 0][:1]
            if not self._takes_tree(seq):
                return level
        budget = min(self.tree.nodes, max_tokens)
        return [c for c in level if sum(other.score >= growth.candidates[c].score for other in growth.candidates) < budget]

    def _catch_up(self, seqs: list[Sequence], max_tokens: list[int]):
        """Compute the rows of the tokens each sequence gained since its last proposal, with their true
        features, in one forward; reserve its draft rows too. -> (index in seqs, the catch-up item, the
        depth it may draft, and the output at each item's last row) for the sequences that draft."""
        rows, items, depths = [], [], []
        for i, seq in enumerate(seqs):
            state = self._states.get(seq.seq_id)
            depth = min(self.tree.depth if self._takes_tree(seq) else len(self.tree.drawn_levels), max_tokens[i])
            if state is None or not state.features or depth <= 0:
                continue
            state.token_ids = seq.token_ids[state.start:]
            width = self.tree.width if seq.request.params.is_greedy else 1
            try:
                self.kv.reserve(state, len(state.features) + (depth - 1) * width)
            except NoFreeBlocksError:
                continue                # the draft's cache is full: this sequence waits
            items.append(ScheduledSeq(state, state.num_computed, len(state.features), reaches_end=True))
            rows.append(i)
            depths.append(depth)
        if not items:
            return rows, items, depths, None
        hidden = self._forward(items, [torch.stack(item.seq.features) for item in items])
        for item in items:
            item.seq.num_computed += len(item.seq.features)
            item.seq.features = []
        return rows, items, depths, hidden

    def _forward(self, items: list[ScheduledSeq], features: list[torch.Tensor], every_row: bool = False):
        """One draft forward over the items' new tokens with their features (item by item) -> the output
        at each item's last row, in item order ([items, hidden]); with `every_row`, a list of each item's
        outputs at all its rows."""
        batch = self.runner.pack(items)
        packed = torch.empty(batch.input_ids.numel(), self.draft.hidden_size, dtype=self.draft.dtype, device=self.device)
        for item, rows in zip(items, features):
            first = batch.first_row[item.seq.seq_id]
            packed[first : first + rows.shape[0]] = rows
        if every_row:
            out = self.draft.forward(batch.input_ids, packed, batch.positions, self.runner.cache, batch.meta)
            return [out[batch.first_row[item.seq.seq_id] : batch.first_row[item.seq.seq_id] + item.num_new_tokens]
                    for item in items]
        out = self.draft.forward(batch.input_ids, packed, batch.positions, self.runner.cache, batch.meta, batch.last_rows)
        order = {seq_id: n for n, seq_id in enumerate(batch.last_seq_ids)}
        return out[[order[item.seq.seq_id] for item in items]]

    def _takes_tree(self, seq: Sequence) -> bool:
        """Greedy requests and the exact and typical rules verify the tree of the draft's best candidates;
        the lossless rule verifies a tree drawn from the draft's distributions (`EagleTree.drawn`) with
        them: on SmolLM2 at T = 0.7 the draft's distribution is close enough to the target's that the
        rejection rule keeps more of a 5-deep drawn chain (1.88 tokens per verification) than EAGLE's
        rule keeps of the 5-node tree of the best candidates (1.59)."""
        return seq.request.params.is_greedy or not self.acceptance.lossless

    @staticmethod
    def _drafted(candidates: list[_Candidate], parent: int) -> list[int]:
        """The draft tokens on the path down to `parent`."""
        path = []
        while parent >= 0:
            path.append(candidates[parent].token)
            parent = candidates[parent].parent
        return path[::-1]

    def _choose(self, seqs: list[Sequence], drafted: list[list[int]], logits: torch.Tensor):
        """Per row: the path's next token and the candidates as (token, log-prob, the distribution it was
        drawn from or None), best first or, for a drawn tree, in drawing order."""
        top_k = self.tree.top_k
        greedy = [seq.request.params.is_greedy for seq in seqs]
        chosen: list[int] = [0] * len(seqs)
        ranked: list[list[tuple[int, float, torch.Tensor | None]]] = [[] for _ in seqs]
        if any(greedy):
            rows = [n for n, g in enumerate(greedy) if g]
            logprobs = torch.log_softmax(logits[rows], dim=-1)
            values, indices = logprobs.topk(top_k, dim=-1)
            tokens = self.draft.token_ids(indices).tolist()
            for n, row_tokens, row_values in zip(rows, tokens, values.tolist()):
                ranked[n] = [(token, value, None) for token, value in zip(row_tokens, row_values)]
                chosen[n] = row_tokens[0]
        sampled = [n for n, g in enumerate(greedy) if not g]
        if sampled:
            batch = SamplingMetadata.from_sequences([seqs[n] for n in sampled], self.vocab_size, self.eos_token_ids,
                                                    self.device, drafted=[drafted[n] for n in sampled])
            q, columns = self._sampling_distribution(logits[sampled], batch)
            drawn = self.sampler.sample(q, batch)
            drawn_logprobs = q.gather(1, drawn[:, None]).log().squeeze(1).tolist()
            draws = (drawn if columns is None else columns[drawn]).tolist()
            if any(self._takes_tree(seqs[n]) for n in sampled):          # (a drawn tree reads no top-k)
                values, indices = q.topk(min(top_k, q.shape[-1]), dim=-1)
                tops, top_logprobs = (indices if columns is None else columns[indices]).tolist(), values.log().tolist()
            for m, n in enumerate(sampled):
                chosen[n] = draws[m]
                if self._takes_tree(seqs[n]):
                    others = [(t, v, None) for t, v in zip(tops[m], top_logprobs[m]) if t != draws[m]]
                    ranked[n] = [(draws[m], drawn_logprobs[m], None)] + others[: top_k - 1]
                    continue
                count = self.tree.drawn_levels[len(drafted[n])]
                ranked[n] = [(token if columns is None else int(columns[token]), logprob,
                              dist if columns is None else dist.new_zeros(self.vocab_size).index_copy_(0, columns, dist))
                             for token, logprob, dist in _drawn_without_replacement(q[m], int(drawn[m]), count,
                                                                                    seqs[n].generator)]
        return chosen, ranked

    def _sampling_distribution(self, logits: torch.Tensor, batch: SamplingMetadata):
        """The sampled rows' draft distributions, through the requests' own logits pipeline -> (probs, the
        token id of each column, or None where the columns are the whole vocabulary). Where that pipeline
        only scales, truncates and bans, it runs over the draft vocabulary itself, 6x narrower on SmolLM2:
        the same distribution as over the whole vocabulary with the other tokens at -inf (truncation ranks
        and compares values; bans are moved to their columns), and, the draft vocabulary being sorted by
        id, the same inverse-CDF draw from the same uniform. Penalties and grammars index the whole
        vocabulary: those rows are spread over it first."""
        if batch.any_penalty or batch.allowed or batch.allowed_bits:
            spread = spread_over_vocab(logits, self.draft.draft_vocab, self.vocab_size)
            return process_logits(spread, batch).logprobs.exp(), None
        banned = [(row, columns) for row, ids in batch.banned if (columns := self.draft.columns_of(ids))]
        return process_logits(logits, replace(batch, banned=banned)).logprobs.exp(), self.draft.draft_vocab

    @staticmethod
    def _add_candidates(candidates: list[_Candidate], parent: int, score: float, depth: int, chosen: int,
                        ranked: list[tuple[int, float, torch.Tensor | None]]) -> int:
        """Add a row's candidates under `parent`; the index of the chosen one (a sampled path goes on from it)."""
        best = -1
        for rank, (token, logprob, dist) in enumerate(ranked):
            candidates.append(_Candidate(token, score + logprob, depth, parent, rank, dist))
            if token == chosen and best < 0:
                best = len(candidates) - 1
        return best

    def _proposal(self, seq: Sequence, candidates: list[_Candidate], max_tokens: int) -> Proposal:
        if not self._takes_tree(seq):
            return self._drawn_proposal(candidates, max_tokens)
        budget = min(self.tree.nodes, max_tokens)
        kept: set[int] = set()
        for index in sorted(range(len(candidates)), key=lambda i: (-candidates[i].score, candidates[i].depth)):
            if len(kept) == budget:
                break
            if candidates[index].parent < 0 or candidates[index].parent in kept:
                kept.add(index)
        order = sorted(kept, key=lambda i: (candidates[i].depth, i))
        new_index = {old: new for new, old in enumerate(order)}
        return Proposal([candidates[i].token for i in order],
                        parents=tuple(-1 if candidates[i].parent < 0 else new_index[candidates[i].parent] for i in order))

    @staticmethod
    def _drawn_proposal(candidates: list[_Candidate], max_tokens: int) -> Proposal:
        """A drawn tree with its distributions: the path first, then the siblings of the shallowest levels
        (each node's first draws) while max_tokens allows; a chain where no sibling is kept."""
        kept = sorted(range(len(candidates)), key=lambda i: (candidates[i].rank > 0, candidates[i].depth, i))
        order = sorted(kept[:max_tokens], key=lambda i: (candidates[i].depth, i))
        if not order:
            return Proposal([])
        probs = torch.stack([candidates[i].dist for i in order])
        if all(candidates[i].rank == 0 for i in order):
            return Proposal([candidates[i].token for i in order], probs)
        new_index = {old: new for new, old in enumerate(order)}
        return Proposal([candidates[i].token for i in order], probs,
                        tuple(-1 if candidates[i].parent < 0 else new_index[candidates[i].parent] for i in order))

    # ---- the engine's bookkeeping ------------------------------------------------------------
    def on_verified(self, seq: Sequence, num_accepted: int) -> None:
        pass            # the kept tokens' true features come through observe(); the draft's rows were rolled back

    def release(self, seq: Sequence) -> None:
        state = self._states.pop(seq.seq_id, None)
        if state is not None:
            self.kv.free(state)


def _drawn_without_replacement(q: torch.Tensor, first: int, count: int,
                               generator: torch.Generator) -> list[tuple[int, float, torch.Tensor]]:
    """`first` (drawn from q) and up to count - 1 more columns of q drawn without replacement, each from q
    without the earlier ones, renormalised (inverse CDF with the generator's uniforms) -> (column, its
    log-probability there, that distribution) in drawing order; fewer where q's support runs out."""
    columns, dists = [first], [q.cpu()]
    remaining = q.double()
    while len(columns) < count:
        remaining = remaining.clone()
        remaining[columns[-1]] = 0.0
        total = float(remaining.sum())
        if total <= 0.0:
            break
        dists.append((remaining / total).to(q.dtype).cpu())
        columns.append(inverse_cdf_draw(remaining, float(torch.rand(1, generator=generator, dtype=torch.float64))))
    return [(column, math.log(p) if (p := float(dist[column])) > 0 else float("-inf"), dist)
            for column, dist in zip(columns, dists)]
