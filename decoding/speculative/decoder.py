"""Speculative decoding inside the engine step.

The engine calls three hooks per step (and `end_step` with the step's time, for the governor):

1. `lookahead(seq, num_decoding)` while scheduling: how many draft slots a decoding sequence reserves
   (blocks and token budget), so verification can never run out of cache; none in a step with more
   decoding sequences than `disable_by_batch_size`, nor in a step where the governor (governor.py)
   measured speculation not to pay at this batch size.
2. `attach_drafts(sched)` after scheduling: the proposer drafts tokens for the sequences that reserved
   slots, and their decode entries become chains of 1 + k tokens for the target to score in the same
   forward pass as every other request of the step.
3. `verify(items, logits)` after the forward: the verifier decides what each chain keeps; the engine
   appends the emitted tokens (stop strings, EOS and max_tokens apply token by token) and rolls the
   target's cache back to the accepted prefix; the proposer rolls back its own.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from decoding.runner import StepLogits
from decoding.sampler import Sampler
from decoding.step_plan import ScheduledSeq, SchedulerOutput, TokenTree
from decoding.sequence import Sequence
from decoding.speculative.governor import SpeculationGovernor
from decoding.speculative.proposer import AcceptanceRule, Proposal, Proposer, SpecCounters
from decoding.sampling_metadata import SamplingMetadata, SamplingRows
from decoding.speculative.rejection import Verdict, rows_to_verify, verify
from decoding.structured.step_masks import StepMasks


class SpeculativeDecoding:
    def __init__(self, proposer: Proposer, max_model_len: int, sampler: Sampler,
                 vocab_size: int, eos_token_ids: frozenset[int], device: torch.device,
                 disable_by_batch_size: int | None = None, acceptance: AcceptanceRule = AcceptanceRule(),
                 governor: SpeculationGovernor | None = None):
        self.proposer = proposer
        self.governor = governor                 # None: speculate whenever a sequence can
        self.acceptance = acceptance
        self.disable_by_batch_size = disable_by_batch_size
        self.max_model_len = max_model_len
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.counters = SpecCounters()
        self._proposals: dict[int, Proposal] = {}
        self._step_mode: tuple[int, bool] | None = None     # (num_decoding, speculate) of the step being planned

    def lookahead(self, seq: Sequence, num_decoding: int) -> int:
        """Draft slots for `seq` in a step where `num_decoding` sequences decode."""
        request, params = seq.request, seq.request.params
        if not params.speculative or request.beam is not None:
            return 0
        if self.disable_by_batch_size is not None and num_decoding > self.disable_by_batch_size:
            return 0
        if not self._speculating(num_decoding):
            return 0
        if self.max_depth(seq) <= 0:
            return 0
        return self.proposer.max_tokens_per_step

    def _speculating(self, num_decoding: int) -> bool:
        """The governor's mode for this step, asked once per step."""
        if self.governor is None:
            return True
        if self._step_mode is None:
            self._step_mode = (num_decoding, self.governor.speculate(num_decoding))
        return self._step_mode[1]

    def end_step(self, sched: SchedulerOutput, chains: list[ScheduledSeq], verdicts: list[Verdict],
                 seconds: float, gained: int | None = None, steps: int = 1) -> None:
        """Tell the governor how a pure decode step went: the tokens its decoding sequences gained in
        `seconds` (`gained`, else one each plus the accepted drafts; given for chained steps, which verify
        no chains here; `steps`: the steps or speculating rounds such a call ran). Steps with prompt chunks
        say nothing about decoding speed and are not counted."""
        mode, self._step_mode = self._step_mode, None
        if self.governor is None or mode is None or (mode[1] and not chains and gained is None):
            return                  # (a step that meant to speculate but drafted nothing says nothing)
        if not all(item.draft_token_ids or (item.num_new_tokens == 1 and item.reaches_end) for item in sched.scheduled):
            return
        if gained is None:
            gained = len(sched.scheduled) + sum(verdict.num_accepted for verdict in verdicts)
        self.governor.record(mode[0], mode[1], gained, seconds, steps)

    def max_depth(self, seq: Sequence) -> int:
        """A verified step emits up to depth + 1 tokens: never draft past max_tokens or the context."""
        remaining = seq.request.params.max_tokens - seq.num_output_tokens - 1
        room = self.max_model_len - len(seq.token_ids) - 1
        return min(remaining, room)

    def attach_drafts(self, sched: SchedulerOutput) -> list[ScheduledSeq]:
        """Draft for every entry that reserved slots; return the entries that now carry drafts."""
        positions = [i for i, item in enumerate(sched.scheduled) if item.num_lookahead > 0]
        if not positions:
            return []
        items = [sched.scheduled[i] for i in positions]
        proposals = self.proposer.propose([item.seq for item in items], [item.num_lookahead for item in items])
        chains = []
        for i, item, proposal in zip(positions, items, proposals):
            proposal = proposal.trimmed(item.num_lookahead, self.max_depth(item.seq))
            draft = proposal.token_ids
            if not draft:
                continue
            tree = None if proposal.parents is None else TokenTree((-1, *proposal.parent_rows()))
            chain = replace(item, num_new_tokens=1 + len(draft), reaches_end=False, draft_token_ids=tuple(draft),
                            tree=tree)
            sched.scheduled[i] = chain
            self._proposals[item.seq.seq_id] = proposal
            chains.append(chain)
        return chains

    @property
    def wants_hidden(self) -> bool:
        """Whether the proposer reads the target's final hidden states (Medusa's heads and EAGLE do)."""
        return self.proposer.wants_hidden_states

    def observe(self, sampled: list[Sequence], rows: list[int], chains: list[ScheduledSeq],
                verdicts: list[Verdict], logits: StepLogits) -> None:
        """Hand the proposer, for each unfinished sequence, the hidden states before its new tokens: a
        sampled one's logits row, a verified chain's root row and the rows of its kept draft tokens. Only
        for a proposer that wants_hidden (the step then asked the runner for them)."""
        for seq, row in zip(sampled, rows):
            if not seq.is_finished:
                self.proposer.observe(seq, logits.last_hidden[row : row + 1])
        for chain, verdict in zip(chains, verdicts):
            if not chain.seq.is_finished:
                self.proposer.observe(chain.seq, logits.chunk_hidden[chain.seq.seq_id][[0, *verdict.rows]])

    def observe_chained(self, seqs: list[Sequence], hidden: torch.Tensor) -> None:
        """After several plain steps in one call, hand the proposer each unfinished sequence's hidden states
        [steps, hidden] before its `steps` newest tokens (an unfinished sequence took every step's token)."""
        for row, seq in enumerate(seqs):
            if not seq.is_finished:
                self.proposer.observe(seq, hidden[:, row])

    def drafts(self, chains: list[ScheduledSeq]) -> list[tuple[Sequence, Proposal]]:
        """Each chain's sequence and the proposal it carries (for the step's grammar masks)."""
        return [(chain.seq, self._proposals[chain.seq.seq_id]) for chain in chains]

    def rows_to_verify(self, chains: list[ScheduledSeq], masks: StepMasks) -> SamplingRows | None:
        """The verified rows for the step's logits pipeline (None: every chain plainly greedy)."""
        seqs = [chain.seq for chain in chains]
        return rows_to_verify(seqs, [self._proposals[seq.seq_id] for seq in seqs],
                              [masks.draft_bits(seq) for seq in seqs])

    def verify(self, chains: list[ScheduledSeq], logits: StepLogits, batch: SamplingMetadata | None) -> list[Verdict]:
        """Verdicts for the step's chains; `batch` is the metadata of their `rows_to_verify`."""
        seqs = [chain.seq for chain in chains]
        proposals = [self._proposals.pop(seq.seq_id) for seq in seqs]
        rows = [logits.chunk[seq.seq_id] for seq in seqs]
        verdicts = verify(self.sampler, seqs, proposals, rows, batch, self.vocab_size, self.eos_token_ids,
                          self.device, self.acceptance)
        for proposal, verdict in zip(proposals, verdicts):
            self.counters.record(len(proposal.token_ids), verdict.num_accepted)
        return verdicts

    def release(self, seq: Sequence) -> None:
        self._proposals.pop(seq.seq_id, None)
        self.proposer.release(seq)
