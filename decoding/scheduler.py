"""Continuous batching: which sequences advance this step, by how many tokens.

Every step runs under a token budget. Decodes go first so a long prompt never starves running
requests; prefill chunks (and the re-prefill of preempted requests) take what is left; waiting requests
are admitted last, first come first served. When blocks run out, the most recently admitted request is
preempted: its blocks are freed and it is recomputed later, so the scheduler can never deadlock as long
as one request alone fits the cache (the engine checks that on arrival).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from decoding.kv_cache_manager import KVCacheManager
from decoding.sequence import Request, RequestStatus, Sequence
from decoding.step_plan import ScheduledSeq, SchedulerOutput


# Prefix-aware admission: how far down the waiting queue a cached prefix is looked for, and how often a
# request may be passed over for one.
PREFERENCE_WINDOW = 8
MAX_BYPASSES = 4


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 lookahead: Callable[[Sequence, int], int] | None = None):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs so every running sequence can decode")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Speculative decoding: how many draft tokens a decoding sequence may add this step, given how
        # many sequences decode in it. Their slots and budget are reserved with the decode, so
        # verification never runs out of blocks.
        self.lookahead = lookahead
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # While a weight update waits for in-flight requests, new requests are not admitted; preempted
        # ones (already started under the current weights) still are.
        self.admission_paused = False
        self._computing: set[bytes] = set()       # keys of the full blocks this step's prompt chunks compute

    # ---- queue management --------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a new request last; one started elsewhere (resumed: decoding/resume.py) goes after the
        started ones at the head, ahead of those that have not started, as a preempted one would."""
        if not request.started:
            self.waiting.append(request)
            return
        position = next((i for i, queued in enumerate(self.waiting) if not queued.started), len(self.waiting))
        self.waiting.insert(position, request)

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out of the queues and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        for seq in request.seqs:
            self.kv.free(seq)

    @property
    def num_running_seqs(self) -> int:
        return sum(r.num_seqs_needed for r in self.running if not r.is_finished)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._computing = set()
        budget = self.max_num_batched_tokens
        budget = self._schedule_decodes(out, budget)
        budget = self._schedule_chunks(out, budget)
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _schedule_decodes(self, out: SchedulerOutput, budget: int) -> int:
        num_decodes = sum(seq.num_uncomputed == 1 for r in self.running for seq in r.active_seqs())
        # Draft tokens share what the decodes leave of the budget.
        spare_per_seq = max(0, budget - num_decodes) // max(num_decodes, 1)
        index = 0
        while index < len(self.running):
            request = self.running[index]
            decodes = [seq for seq in request.active_seqs() if seq.num_uncomputed == 1]
            if not decodes:
                index += 1
                continue
            extra = [min(self.lookahead(seq, num_decodes), spare_per_seq) if self.lookahead else 0 for seq in decodes]
            needed = sum(self._blocks_needed(seq, 1 + e) for seq, e in zip(decodes, extra))
            if needed > self.kv.num_free_blocks and any(extra):
                extra = [0] * len(decodes)            # no room to speculate: never preempt for drafts
                needed = sum(self._blocks_needed(seq, 1) for seq in decodes)
            while needed > self.kv.num_free_blocks and self.running[-1] is not request:
                out.preempted.append(self.requeue(self.running[-1]))
            if needed > self.kv.num_free_blocks:
                out.preempted.append(self.requeue(request))
                break
            for seq, e in zip(decodes, extra):
                self._append(out, seq, 1, e)
            budget -= len(decodes) + sum(extra)
            index += 1
        return budget

    def _schedule_chunks(self, out: SchedulerOutput, budget: int) -> int:
        scheduled_requests = {s.seq.request.req_id for s in out.scheduled}
        for request in list(self.running):
            for seq in request.active_seqs():
                if budget <= 0 or request.status is not RequestStatus.RUNNING:
                    return budget
                wanted = min(self._chunk_limit(request, seq), budget)
                if seq.num_uncomputed <= 1 or wanted <= 0:
                    continue
                # Make room by preempting later requests that have nothing scheduled this step.
                while (self._blocks_needed(seq, wanted) > self.kv.num_free_blocks
                       and self.running[-1] is not request
                       and self.running[-1].req_id not in scheduled_requests):
                    out.preempted.append(self.requeue(self.running[-1]))
                fitting = self._fitting_tokens(seq, wanted)
                if fitting > 0:
                    self._append(out, seq, fitting)
                    scheduled_requests.add(request.req_id)
                    budget -= fitting
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0:
            self._cached_first()
            request = self.waiting[0]
            if self.admission_paused and not request.started:
                return
            if self.num_running_seqs + request.num_seqs_needed > self._seq_limit(request):
                return
            leader = request.leader
            if request.params.prompt_logprobs is None:      # scoring a prompt computes all of it
                # A group not forked yet (a preempted or resumed one too, whose leader holds more than
                # the prompt) stops at the prompt's end to fork: it matches the prompt only.
                self.kv.prefixes.match(leader, request.prompt_len if request.needs_fork else None)
            wanted = min(self._chunk_limit(request, leader), budget)
            first_block = leader.num_computed // self.kv.block_size
            if (self._blocks_needed(leader, wanted) > self.kv.num_free_blocks
                    or (self._computing
                        and set(self.kv.prefixes.keys(leader, first_block, first_block + 1)) & self._computing)):
                self.kv.free(leader)                        # lets go of the cached blocks it took
                leader.reset_cache_state()
                return
            self.waiting.popleft()
            request.num_cached_tokens = request.num_cached_tokens or leader.num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._append(out, leader, wanted)
            budget -= wanted

    def _cached_first(self) -> None:
        """Put first, among the next PREFERENCE_WINDOW waiting requests, the one whose prompt starts with
        the most cached tokens: it costs the least to admit, and its blocks may be evicted by the time it
        would come. A request already started (preempted) stays first, and one passed over MAX_BYPASSES
        times is not passed over again, so none waits unboundedly."""
        head = self.waiting[0]
        if not self.kv.prefixes.enabled or head.started or head.num_bypassed >= MAX_BYPASSES:
            return
        window = []
        for request in itertools.islice(self.waiting, PREFERENCE_WINDOW):
            window.append(request)
            if request.num_bypassed >= MAX_BYPASSES or request.started:
                break                                   # nothing behind it goes ahead of it
        cached = [0 if r.params.prompt_logprobs is not None else self.kv.prefixes.cached_tokens(r.leader)
                  for r in window]
        best = max(range(len(window)), key=lambda i: (cached[i], -i))
        if cached[best] == cached[0]:
            return
        for passed in window[:best]:
            passed.num_bypassed += 1
        self.waiting.remove(window[best])
        self.waiting.appendleft(window[best])

    # ---- helpers -----------------------------------------------------------------------------
    def _seq_limit(self, request: Request) -> int:
        """The running sequences `request` may join: max_num_seqs, or up to twice that for a request
        resumed from a failed replica (decoding/resume.py). It was running already: a replica that dies
        moves its streams to the others rather than adding any, and they go on at once, sharing the
        survivors' steps, instead of waiting for the survivors' own requests to finish. Within the step's
        token budget, so every running sequence still decodes each step."""
        if request.resumption is None:
            return self.max_num_seqs
        return min(2 * self.max_num_seqs, self.max_num_batched_tokens)

    def _chunk_limit(self, request: Request, seq: Sequence) -> int:
        if request.needs_fork:
            # The leader stops at the end of the prompt so the group can fork the shared blocks.
            return request.prompt_len - seq.num_computed
        return seq.num_uncomputed

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return self.kv.blocks_needed(seq, num_new_tokens)

    def _fitting_tokens(self, seq: Sequence, wanted: int) -> int:
        """The longest prefix of a chunk that fits in the free blocks."""
        low, high = 0, wanted
        while low < high:
            mid = (low + high + 1) // 2
            if self._blocks_needed(seq, mid) <= self.kv.num_free_blocks:
                low = mid
            else:
                high = mid - 1
        return low

    def _append(self, out: SchedulerOutput, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0) -> None:
        if num_new_tokens > 1:
            # The full blocks a prompt chunk computes this step: a request whose next block is one of
            # them waits a step and then finds it cached, so prompts that arrive together with a common
            # prefix compute it once (the wait lasts as long as that prefix's prefill).
            size = self.kv.block_size
            self._computing.update(self.kv.prefixes.keys(seq, seq.num_computed // size,
                                                      (seq.num_computed + num_new_tokens) // size))
        out.block_copies += self.kv.reserve(seq, num_new_tokens + num_lookahead)
        out.scheduled.append(ScheduledSeq.of(seq, num_new_tokens, num_lookahead))

    def requeue(self, request: Request) -> Request:
        """Preempt a running request: free its cache and queue it for recomputation ahead of new arrivals."""
        self.running.remove(request)
        for seq in request.seqs:
            self.kv.free(seq)
            seq.reset_cache_state()
        request.is_forked = False
        request.kv_stale = False
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        return request
