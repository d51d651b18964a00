"""The offline engine: add requests, step, collect outputs.

One step is its phases: schedule -> propose -> execute -> sample / verify -> update (see `step`).
"""

from __future__ import annotations

import time

from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from decoding.assembly import build_cache, build_speculation
from decoding.beam_requests import BeamRequests
from decoding.block_manager import CacheUsage
from decoding.config import EngineConfig
from decoding.intake import Prompt, RequestIntake
from decoding.multi_step import MultiStepDecode
from decoding.speculative.chain import speculating_chain
from decoding.outputs import RequestOutput
from decoding.params import SamplingParams
from decoding.prompt_logprobs import record_prompt_logprobs
from decoding.resume import Resumption, check_weights
from decoding.runner import ModelRunner
from decoding.sampler import Sampler
from decoding.sampling_metadata import SamplingMetadata, SamplingRows
from decoding.scheduler import Scheduler
from decoding.step_plan import SchedulerOutput
from decoding.sequence import FinishReason, Request, RequestStatus
from decoding.structured.step_masks import StepMasks
from decoding.update import StepUpdate
from decoding.weights import ServedWeights
from models import kernels, load_model



@dataclass(frozen=True)
class EngineStats:
    num_running: int                 # requests being decoded
    num_waiting: int                 # requests waiting for admission
    prefix_cache_queries: int        # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int           # of those, tokens found


class Engine:
    """Continuous-batching decoding over a paged KV cache.

    >>> engine = Engine(model="path/to/hf-model")
    >>> [out] = engine.generate("def fibonacci(n):", SamplingParams(max_tokens=32, temperature=0))
    >>> out.outputs[0].text
    """

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig()
        self.config = replace(config, model=model or config.model, **overrides)
        self.use_threads()
        self.loaded = load_model(self.config.model, self.config.dtype, self.config.device,
                                 show_progress=self.config.show_progress, impl=self.config.model_impl,
                                 quantization=self.config.quantization)
        self.tokenizer = self.loaded.tokenizer
        self.eos_token_ids = self.loaded.eos_token_ids
        self.max_model_len = min(self.config.max_model_len or self.loaded.max_model_len, self.loaded.max_model_len)
        self.kv = build_cache(self.loaded, self.config)
        self.runner = ModelRunner(self.loaded.model, self.kv.cache, self.loaded.device)
        self.sampler = Sampler()
        self.speculation = build_speculation(self.config, self.loaded, self.sampler, self.kv.num_blocks, self.max_model_len)
        self.scheduler = Scheduler(self.kv, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   lookahead=self.speculation.lookahead if self.speculation else None)
        self.intake = RequestIntake(self.config, self.tokenizer, self.eos_token_ids, self.loaded.model.vocab_size,
                                    self.max_model_len, self.kv)
        self.beams = BeamRequests(self.tokenizer, self.eos_token_ids)
        self._requests: dict[str, Request] = {}
        self.update = StepUpdate(self.kv, self.scheduler, self.speculation, self._requests, self.eos_token_ids,
                                 self.max_model_len, self.loaded.device, self.intake.new_sequence)
        self.counters = self.update.counters
        # Plain decode steps chain, in a speculating engine too (in the steps its governor keeps plain).
        self.multi_step = MultiStepDecode(self.loaded.model, self.kv, self.config.decode_steps, self.eos_token_ids,
                                          self.max_model_len)
        # A lone decode's speculating rounds chain too, for proposers that have a native chain.
        self.speculating_chain = speculating_chain(self.loaded.model, self.kv, self.speculation, self.config.decode_steps,
                                                   self.eos_token_ids, self.max_model_len)
        # Pushed "draft." weights go to a draft model's proposer (n-gram and Medusa proposers have none).
        proposer = self.speculation.proposer if self.speculation else None
        draft = proposer if hasattr(proposer, "forget_states") else None
        self.weights = ServedWeights(self.loaded.model, self._requests, on_change=self.kv.prefixes.forget, draft=draft)

    def use_threads(self) -> None:
        """Apply the `threads` option to the calling thread (whoever steps the engine calls this once)."""
        if self.config.threads is not None:
            kernels.set_num_threads(self.config.threads)

    # ---- requests ----------------------------------------------------------------------------
    def make_request(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None, resumption: Resumption | None = None) -> Request:
        """Validate and tokenize; raises ValueError saying what to fix. Does not touch engine state.
        resumption: continue where another engine left the request (decoding/resume.py)."""
        params = params or SamplingParams()
        if request_id is not None and request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.intake.make_request(prompt, params, request_id, resumption)
        if params.use_beam_search and params.num_beams > 1:
            self.beams.start(request, request.prompt_len + params.max_tokens)
        return request

    def add(self, request: Request) -> str:
        """Queue a request; raises ValueError (WeightsChanged for a resumed request whose weights are no
        longer served) and queues nothing."""
        if request.req_id in self._requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        if request.resumption is not None:
            check_weights(request, self.weights.version)
        self._requests[request.req_id] = request
        self.scheduler.add(request)
        return request.req_id

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        return self.add(self.make_request(prompt, params, request_id))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its cache blocks; unknown or finished ids are ignored."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.end(FinishReason.ABORT)
            if self.speculation:
                self.speculation.release(seq)
        self.scheduler.remove(request)
        request.status = RequestStatus.FINISHED
        return RequestOutput.of(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def cache_usage(self) -> CacheUsage:
        return self.kv.usage()

    def stats(self) -> EngineStats:
        """Requests running and waiting now, and the prefix cache's lookups since the engine started."""
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.kv.prefixes.queries,
                           self.kv.prefixes.hits)

    def reset_prefix_cache(self) -> None:
        """No block cached so far is reused (call between steps)."""
        self.kv.prefixes.forget()

    def recompute_started(self) -> None:
        """Drop the cache of every running request; each recomputes its prompt and tokens so far under
        the current weights before it goes on (after a weight update that kept them)."""
        for request in reversed(list(self.scheduler.running)):    # they keep their order at the queue's head
            self.scheduler.requeue(request)
            self.counters.num_preemptions += 1
            if self.speculation:
                for seq in request.seqs:
                    self.speculation.release(seq)

    def pause_admission(self, paused: bool) -> None:
        """While paused, requests that have not started wait (a weight update is pending); started ones
        run on."""
        self.scheduler.admission_paused = paused

    # ---- the engine step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step: schedule -> propose -> execute -> sample / verify -> update."""
        started = time.perf_counter()
        sched = self._schedule()
        if sched.is_empty:
            if self.speculation:
                self.speculation.end_step(sched, [], [], 0.0)
            return []
        steps = self.multi_step.steps_for(sched)
        if steps > 1:
            return self._chained_steps(sched, steps, started)
        speculated_tokens = self.speculating_chain.tokens_for(sched)
        if speculated_tokens:
            return self._speculated_rounds(sched, speculated_tokens, started)
        chains = self.speculation.attach_drafts(sched) if self.speculation else []
        want_prompt = sched.wanting_prompt_logprobs()
        sched.chunk_logits_for = want_prompt | {chain.seq.seq_id for chain in chains}
        sched.wants_hidden = bool(self.speculation and self.speculation.wants_hidden)
        logits = self.runner.execute(sched)
        record_prompt_logprobs(sched, logits, want_prompt)
        sampling_seqs, rows = self.update.computed(sched, logits)
        masks = StepMasks.build(sampling_seqs, self.speculation.drafts(chains) if chains else [])
        sampling_seqs, rows, beam_steps = self.beams.take_rows(sampling_seqs, rows, logits.last, masks, self.counters)
        self.update.apply_beam_steps(beam_steps)
        drawing, verifying = SamplingMetadata.for_step(
            [SamplingRows(sampling_seqs, [[]] * len(sampling_seqs), masks.rows_of(sampling_seqs)),
             self.speculation.rows_to_verify(chains, masks) if chains else None],
            self.loaded.model.vocab_size, self.eos_token_ids, self.loaded.device)
        if drawing is not None:
            self.update.append_drawn(sampling_seqs, self.sampler.draw(rows, logits.last, drawing))
        verdicts = self.speculation.verify(chains, logits, verifying) if chains else []
        for chain, verdict in zip(chains, verdicts):
            self.update.apply_verdict(chain.seq, verdict)
        if sched.wants_hidden:
            self.speculation.observe(sampling_seqs, rows.tolist(), chains, verdicts, logits)
        self.counters.num_steps += 1
        outputs = self.update.end_step(sched)
        if self.speculation:
            self.speculation.end_step(sched, chains, verdicts, time.perf_counter() - started)
        return outputs

    def _chained_steps(self, sched: SchedulerOutput, steps: int, started: float) -> list[RequestOutput]:
        """`steps` plain decode steps in one native call (decoding/multi_step.py); a speculating engine's
        proposer is shown every step's hidden states and its governor the step's speed."""
        self.runner.copy_blocks(sched)
        wants_hidden = bool(self.speculation and self.speculation.wants_hidden)
        chained = self.multi_step.run(sched, steps, wants_hidden)
        gained, streamed = self.update.apply_chained(sched, chained)
        if chained.hidden is not None:
            self.speculation.observe_chained([item.seq for item in sched.scheduled], chained.hidden)
        self.counters.num_steps += steps
        outputs = streamed + self.update.end_step(sched)
        if self.speculation:
            self.speculation.end_step(sched, [], [], time.perf_counter() - started, gained, steps)
        return outputs

    def _speculated_rounds(self, sched: SchedulerOutput, tokens: int, started: float) -> list[RequestOutput]:
        """Several speculating rounds for the step's one sequence in one native call
        (decoding/speculative/chain.py); the proposer takes what the call leaves it, the governor the call's
        speed."""
        self.runner.copy_blocks(sched)
        seq = sched.scheduled[0].seq
        chain = self.speculating_chain
        chained = chain.run(sched, tokens)
        chain.after(seq, chained)
        gained, streamed = self.update.apply_speculated_chain(seq, chained, chain.token_logprobs(seq, chained))
        self.counters.num_steps += len(chained.accepted)
        outputs = streamed + self.update.end_step(sched)
        self.speculation.end_step(sched, [], [], time.perf_counter() - started, gained, len(chained.accepted))
        return outputs

    def _schedule(self) -> SchedulerOutput:
        """The scheduler's plan; preempted sequences drop their drafts; newly started requests take the
        weight version they will run under."""
        sched = self.scheduler.schedule()
        self.counters.num_preemptions += len(sched.preempted)
        if self.speculation:
            for request in sched.preempted:
                for seq in request.seqs:
                    self.speculation.release(seq)
        for item in sched.scheduled:
            if item.seq.request.weight_version is None:
                item.seq.request.weight_version = self.weights.version
        return sched

    # ---- batch convenience -------------------------------------------------------------------
    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts to completion; one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        requests = [self.make_request(p, sp) for p, sp in zip(prompts, params_list)]
        for request in requests:
            request.stream = False
        ids = [self.add(r) for r in requests]
        finished: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(ids), disable=not use_tqdm, desc="generating")
        try:
            while len(finished) < len(ids):
                for out in self.step():
                    if out.finished and out.request_id not in finished:
                        finished[out.request_id] = out
                        progress.update()
        finally:
            progress.close()
            for request_id in ids:
                if request_id not in finished:
                    self.abort(request_id)
        return [finished[i] for i in ids]
