"""The update phase of a step: what the model's output does to the requests. Scheduled tokens become
computed, groups fork at the end of their shared prompt, sampled and verified tokens are appended (a
verified chain's rejected tokens rolled back, a tree's kept path compacted), beams are re-pointed at the
beams they continue, stop conditions end sequences, finished sequences free their blocks and finished
requests retire. With the scheduler, the only code that changes block tables, all through the
KV-cache manager.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from decoding.detokenizer import find_stop_string
from decoding.outputs import RequestOutput
from decoding.beam_requests import BeamStep
from decoding.kv_cache_manager import KVCacheManager
from models.kernels import ChainedRounds
from decoding.multi_step import ChainedSteps
from decoding.runner import StepLogits
from decoding.sampler import SamplerOutput
from decoding.scheduler import Scheduler
from decoding.step_plan import SchedulerOutput
from decoding.sequence import FinishReason, Request, RequestStatus, Sequence, TokenLogprob
from decoding.speculative.decoder import SpeculativeDecoding
from decoding.speculative.rejection import Verdict


@dataclass
class EngineCounters:
    """Monotonic counters, read by benchmarks, tests and the metrics endpoint."""

    num_steps: int = 0
    num_prompt_tokens_computed: int = 0    # prefill work actually done (shared prompts count once)
    num_generated_tokens: int = 0
    num_preemptions: int = 0


def extend(seq: Sequence, token: int, eos_token_ids: frozenset[int],
           max_model_len: int) -> tuple[FinishReason, str | int | None] | None:
    """Append `token` to `seq` (its tokens, grammar cursor and text) and say whether it ends the sequence:
    (finish reason, stop reason), a stop string cut from the text as the request asked; None if it goes
    on. A function of the sequence's tokens alone, so a resumed sequence (decoding/resume.py) replays
    its tokens through it and ends up with the same text."""
    params = seq.request.params
    seq.token_ids.append(token)
    if seq.grammar is not None:
        seq.grammar.advance(token)
    new_text = seq.detokenizer.append(token)
    if not params.ignore_eos and token in eos_token_ids:
        return FinishReason.STOP, None
    if token in params.stop_token_ids:
        return FinishReason.STOP, token
    if params.stop and new_text and seq.num_output_tokens >= params.min_tokens and \
            (found := find_stop_string(seq.detokenizer.text, len(new_text), params.stop)):
        index, stop = found
        seq.detokenizer.text = seq.detokenizer.text[: index + (len(stop) if params.include_stop_str_in_output else 0)]
        return FinishReason.STOP, stop
    if seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= max_model_len:
        return FinishReason.LENGTH, None
    return None


class StepUpdate:
    def __init__(self, kv: KVCacheManager, scheduler: Scheduler, speculation: SpeculativeDecoding | None,
                 requests: dict[str, Request], eos_token_ids: frozenset[int], max_model_len: int,
                 device: torch.device, new_sequence: Callable[[Request, int], Sequence]):
        self.kv = kv
        self.scheduler = scheduler
        self.speculation = speculation
        self.requests = requests              # the engine's live requests, by id (retired ones leave it)
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.device = device
        self.new_sequence = new_sequence          # a beam request's further beams
        self.counters = EngineCounters()

    def apply_verdict(self, seq: Sequence, verdict: Verdict) -> None:
        """Keep the accepted prefix of a verified chain in the cache and append the emitted tokens."""
        base = len(seq.token_ids)
        kept_rows = list(range(1, verdict.num_accepted + 1))
        if verdict.rows != kept_rows:
            # A tree's kept path sits at scattered slots: move it to the positions it now occupies.
            start = base - 1
            self.kv.compact(seq, [start + r for r in verdict.rows], [start + r for r in kept_rows])
        self.kv.roll_back(seq, base + verdict.num_accepted)  # the last emitted token is not computed yet
        for token, logprob in zip(verdict.token_ids, verdict.logprobs):
            self.append_token(seq, token, logprob)
            if seq.is_finished:
                return
        self.speculation.proposer.on_verified(seq, verdict.num_accepted)

    def computed(self, sched: SchedulerOutput, logits: StepLogits) -> tuple[list[Sequence], torch.Tensor]:
        """Mark the scheduled tokens computed, fork groups at the end of their prompt, and list which
        sequences sample from which logits row."""
        row_of = {seq_id: row for row, seq_id in enumerate(logits.last_seq_ids)}
        sampling_seqs, rows = [], []
        for item in sched.scheduled:
            seq, request = item.seq, item.seq.request
            if seq.num_computed < seq.prompt_len:
                self.counters.num_prompt_tokens_computed += min(item.num_new_tokens, seq.prompt_len - seq.num_computed)
            seq.num_computed += item.num_new_tokens
            forked_now = request.needs_fork and seq.num_computed == request.prompt_len
            if forked_now:
                self._fork(request)
            if item.reaches_end:
                # Right after a group's shared prefill, every sample draws its first token from this row.
                targets = [s for s in request.seqs if not s.is_finished] if forked_now else [seq]
                for target in targets:
                    if request.params.max_tokens == 0:       # scoring only: the prompt's logprobs are all
                        self._finish(target, FinishReason.LENGTH)
                    elif target.num_computed == len(target.token_ids):
                        sampling_seqs.append(target)
                        rows.append(row_of[seq.seq_id])
        return sampling_seqs, torch.tensor(rows, dtype=torch.long, device=self.device)

    def _fork(self, request: Request) -> None:
        leader = request.leader
        for seq in request.seqs[1:]:
            if not seq.is_finished:
                self.kv.share(seq, leader, request.prompt_len)
        if leader.is_finished:   # recomputed only to rebuild the shared prompt
            self.kv.free(leader)
        request.is_forked = True

    def apply_chained(self, sched: SchedulerOutput, chained: ChainedSteps) -> tuple[int, list[RequestOutput]]:
        """The tokens of several decode steps run in one call (decoding/multi_step.py), applied one step at a
        time as the per-step path would: the step's input token becomes computed and its drawn token is
        appended, until the sequence ends (what the call computed past that is dropped with its blocks).
        A streamed request is reported after each step but the last (end_step reports that one), so its
        stream gets the chunks single steps would give it. -> the tokens appended, and those reports."""
        seqs = [item.seq for item in sched.scheduled]
        appended, reports = 0, []
        for step, (step_tokens, step_logprobs) in enumerate(zip(chained.tokens, chained.logprobs)):
            grown: dict[str, Request] = {}
            for seq, token, logprob in zip(seqs, step_tokens, step_logprobs):
                if not seq.is_finished:
                    seq.num_computed += 1
                    self.append_token(seq, token, logprob)
                    appended += 1
                    grown[seq.request.req_id] = seq.request
            if step < len(chained.tokens) - 1:
                reports += [RequestOutput.of(r) for r in grown.values() if r.stream and not r.is_finished]
        return appended, reports

    def apply_speculated_chain(self, seq: Sequence, chained: ChainedRounds,
                               logprobs: list[TokenLogprob | None]) -> tuple[int, list[RequestOutput]]:
        """The tokens of several speculating rounds run in one call (decoding/speculative/chain.py):
        the cache already holds every emitted token but the last, as after a verified step; they are
        appended one by one (with their logprobs, None where not asked for) as the rounds' verdicts would
        append them, until the sequence ends. A streamed
        request is reported after each round but the last (end_step reports that one). -> the tokens
        appended, and those reports."""
        self.kv.roll_back(seq, seq.num_computed + len(chained.tokens))
        appended, reports, first = 0, [], 0
        for round_index, accepted in enumerate(chained.accepted):
            for token, logprob in zip(chained.tokens[first : first + accepted + 1], logprobs[first : first + accepted + 1]):
                self.append_token(seq, token, logprob)
                appended += 1
                if seq.is_finished:
                    return appended, reports
            first += accepted + 1
            if round_index < len(chained.accepted) - 1 and seq.request.stream:
                reports.append(RequestOutput.of(seq.request))
        return appended, reports

    def append_drawn(self, seqs: list[Sequence], drawn: SamplerOutput) -> None:
        for seq, token, logprob in zip(seqs, drawn.token_ids, drawn.logprobs):
            self.append_token(seq, token, logprob)

    def append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        request = seq.request
        if logprob is not None:
            seq.logprobs.append(logprob)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        self.counters.num_generated_tokens += 1
        ending = extend(seq, token, self.eos_token_ids, self.max_model_len)
        if ending is not None:
            self._finish(seq, *ending)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        seq.end(reason, stop_reason)
        self._remember(seq)
        self.kv.free(seq)
        if self.speculation:
            self.speculation.release(seq)

    def apply_beam_steps(self, steps: list[BeamStep]) -> None:
        """Re-point each beam request's beams at the beams they continue (sharing every common block),
        with their new tokens and grammar cursors; end the search where it is done."""
        for step in steps:
            request = step.request
            for seq in step.recompute:
                self.kv.roll_back(seq, seq.num_computed - 1)
            if not step.parents:
                continue
            while len(request.seqs) < request.beam.num_beams:     # the first step: one beam becomes many
                request.seqs.append(self.new_sequence(request, len(request.seqs)))
            request.is_forked = True
            self.kv.reassign(request.seqs, step.parents, [parent.num_computed for parent in step.parents])
            for slot, seq in enumerate(request.seqs):
                seq.token_ids = request.prompt_token_ids + request.beam.running_tokens[slot]
                seq.grammar = step.cursors[slot]
            if step.results is not None:
                request.beam_results = step.results
                for seq in request.seqs:
                    self.kv.free(seq)
                    seq.finish_reason = FinishReason.STOP

    def end_step(self, sched: SchedulerOutput) -> list[RequestOutput]:
        """Key the full blocks the step computed (prefix caching), then retire or report each request it
        touched."""
        for item in sched.scheduled:
            if not item.seq.is_finished:
                self._remember(item.seq)
        touched = {item.seq.request.req_id: item.seq.request for item in sched.scheduled}
        outputs = (self.retire(request) for request in touched.values())
        return [output for output in outputs if output is not None]

    def _remember(self, seq: Sequence) -> None:
        if seq.request.kv_stale:       # attends to keys and values of older weights: not for others
            return
        # Beams are re-pointed at other beams' blocks every step: only their shared prompt is offered.
        self.kv.prefixes.remember(seq, None if seq.request.beam is None else seq.request.prompt_len)

    def retire(self, request: Request) -> RequestOutput | None:
        """Retire a finished request; its snapshot, unless it is unfinished and not streamed."""
        if request.is_finished and request.status is not RequestStatus.FINISHED:
            self.scheduler.remove(request)
            request.status = RequestStatus.FINISHED
            request.finish_time = time.monotonic()
            self.requests.pop(request.req_id, None)
        if request.stream or request.status is RequestStatus.FINISHED:
            return RequestOutput.of(request)
        return None
