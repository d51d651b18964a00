"""The offline engine: add requests, step, collect outputs.

One step is: schedule -> run the model -> sample -> update. Everything else hangs off it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from decoding.beam_requests import BeamRequests
from decoding.block_manager import BlockManager, CacheUsage
from decoding.config import EngineConfig
from decoding.detokenizer import find_stop_string
from decoding.intake import Prompt, RequestIntake
from decoding.outputs import RequestOutput
from decoding.params import SamplingParams
from decoding.runner import ModelRunner, StepLogits
from decoding.sampler import Sampler, SamplingBatch
from decoding.scheduler import Scheduler, SchedulerOutput
from decoding.sequence import FinishReason, Request, RequestStatus, Sequence, TokenLogprob
from decoding.speculative.decoder import SpeculativeDecoding
from decoding.speculative.draft import DraftModelProposer
from decoding.speculative.medusa import MedusaProposer
from decoding.speculative.ngram import NgramProposer
from decoding.speculative.rejection import Verdict
from decoding.structured.grammar import GrammarCursor
from decoding.weights import WeightUpdateError, apply_update, validate_update
from models import kernels, load_model
from models.attention import PagedKVCache
from models.loader import DEFAULT_DRAFT_DIR, DEFAULT_MEDUSA_DIR
from models.medusa import MedusaHeads



@dataclass
class EngineCounters:
    """Monotonic counters, read by benchmarks, tests and the metrics endpoint."""

    num_steps: int = 0
    num_prompt_tokens_computed: int = 0    # prefill work actually done (shared prompts count once)
    num_generated_tokens: int = 0
    num_preemptions: int = 0


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
                                 show_progress=self.config.show_progress)
        self.tokenizer = self.loaded.tokenizer
        self.eos_token_ids = self.loaded.eos_token_ids
        self.max_model_len = min(self.config.max_model_len or self.loaded.max_model_len, self.loaded.max_model_len)
        self._init_cache()
        self.runner = ModelRunner(self.loaded.model, self.cache, self.loaded.device)
        self.sampler = Sampler()
        self.speculation = self._init_speculation()
        self.scheduler = Scheduler(self.blocks, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   lookahead=self.speculation.lookahead if self.speculation else None)
        self.intake = RequestIntake(self.config, self.tokenizer, self.eos_token_ids, self.loaded.model.vocab_size,
                                    self.max_model_len, self.blocks)
        self.beams = BeamRequests(self.blocks, self.tokenizer, self.eos_token_ids, self.intake.new_sequence)
        self.counters = EngineCounters()
        self._requests: dict[str, Request] = {}
        self.weight_version = 0

    def use_threads(self) -> None:
        """Apply the `threads` option to the calling thread (whoever steps the engine calls this once)."""
        if self.config.threads is not None:
            kernels.set_num_threads(self.config.threads)

    def _init_cache(self) -> None:
        model, cfg = self.loaded.model, self.config
        num_blocks = cfg.num_kv_blocks
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_block(model.num_layers, cfg.block_size, model.num_kv_heads,
                                                     model.head_dim, model.dtype)
            num_blocks = max(2, int(cfg.kv_cache_memory_gb * 2**30) // per_block)
        self.cache = PagedKVCache(model.num_layers, num_blocks, cfg.block_size, model.num_kv_heads,
                                  model.head_dim, model.dtype, self.loaded.device)
        self.blocks = BlockManager(num_blocks, cfg.block_size)

    def _init_speculation(self) -> SpeculativeDecoding | None:
        cfg = self.config
        if cfg.speculative is None:
            return None
        if cfg.speculative == "ngram":
            proposer = NgramProposer(cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min)
        elif cfg.speculative == "medusa":
            model = self.loaded.model
            heads = MedusaHeads.load(cfg.medusa_heads or DEFAULT_MEDUSA_DIR, model.dtype, self.loaded.device,
                                     hidden_size=model.hidden_size, vocab_size=model.vocab_size)
            heads.use_output_head(model.lm_head)
            proposer = MedusaProposer(heads, self.sampler, self.eos_token_ids, self.loaded.device, cfg.medusa_choices,
                                      cfg.medusa_acceptance, (cfg.typical_epsilon, cfg.typical_delta))
            self.runner.keep_hidden = True
        else:
            draft = load_model(cfg.draft_model or str(DEFAULT_DRAFT_DIR), cfg.dtype, cfg.device,
                               show_progress=cfg.show_progress)
            if draft.model.vocab_size != self.loaded.model.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft.model.vocab_size} tokens) differs from the "
                                 f"target's ({self.loaded.model.vocab_size}); a draft must share the target's tokenizer")
            # As many blocks as the target: the draft never shares a prompt between samples, and a draft
            # that runs out of blocks only stops proposing for the sequences that do not fit.
            proposer = DraftModelProposer(draft, cfg.num_speculative_tokens, self.blocks.num_blocks, cfg.block_size,
                                          self.sampler, self.eos_token_ids)
        return SpeculativeDecoding(proposer, self.max_model_len, self.sampler, self.loaded.model.vocab_size,
                                   self.eos_token_ids, self.loaded.device, cfg.speculative_disable_by_batch_size)

    # ---- requests ----------------------------------------------------------------------------
    def make_request(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        """Validate and tokenize; raises ValueError saying what to fix. Does not touch engine state."""
        params = params or SamplingParams()
        if request_id is not None and request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.intake.make_request(prompt, params, request_id)
        if params.use_beam_search and params.num_beams > 1:
            self.beams.start(request, request.prompt_len + params.max_tokens)
        return request

    def add(self, request: Request) -> str:
        if request.req_id in self._requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
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
                seq.detokenizer.flush()
                seq.finish_reason = FinishReason.ABORT
            if self.speculation:
                self.speculation.release(seq)
        self.scheduler.remove(request)
        request.status = RequestStatus.FINISHED
        return RequestOutput.of(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def cache_usage(self) -> CacheUsage:
        return self.blocks.usage()

    def queue_lengths(self) -> tuple[int, int]:
        """(requests being decoded, requests waiting for admission)."""
        return len(self.scheduler.running), len(self.scheduler.waiting)

    def pause_admission(self, paused: bool) -> None:
        """While paused, requests that have not started wait (a weight update is pending); started ones
        run on."""
        self.scheduler.admission_paused = paused

    # ---- the engine step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.counters.num_preemptions += len(sched.preempted)
        if self.speculation:
            for request in sched.preempted:
                for seq in request.seqs:
                    self.speculation.release(seq)
        if sched.is_empty:
            return []
        chains = self.speculation.attach_drafts(sched) if self.speculation else []
        want_prompt = {s.seq.seq_id for s in sched.scheduled
                       if s.seq.request.params.prompt_logprobs is not None and s.start < s.seq.prompt_len - 1}
        for item in sched.scheduled:
            if item.seq.request.weight_version is None:
                item.seq.request.weight_version = self.weight_version
        logits = self.runner.execute(sched, want_prompt | {chain.seq.seq_id for chain in chains})
        self._record_prompt_logprobs(sched, logits, want_prompt)
        sampling_seqs, rows = self._advance(sched, logits)
        touched = {s.seq.request.req_id: s.seq.request for s in sched.scheduled}
        sampling_seqs, rows = self._advance_beams(sampling_seqs, rows, logits.last)
        if sampling_seqs:
            constrained = [row for row, seq in enumerate(sampling_seqs) if seq.grammar is not None]
            allowed_bits = None
            if constrained:
                bits = GrammarCursor.allowed_bits([sampling_seqs[row].grammar for row in constrained])
                allowed_bits = (constrained, bits.to(self.loaded.device))
            batch = SamplingBatch.from_sequences(sampling_seqs, self.loaded.model.vocab_size, self.eos_token_ids,
                                                 self.loaded.device, allowed_bits=allowed_bits)
            # Each row sampling once, in order, is the common case: the logits then need no gather.
            in_order = rows.numel() == logits.last.shape[0] and torch.equal(rows, torch.arange(rows.numel(), device=rows.device))
            sampled = self.sampler(logits.last if in_order else logits.last[rows], batch)
            for seq, token, logprob in zip(sampling_seqs, sampled.token_ids, sampled.logprobs):
                self._append_token(seq, token, logprob)
            if logits.last_hidden is not None:
                for seq, row in zip(sampling_seqs, rows.tolist()):
                    if not seq.is_finished:
                        self.speculation.observe(seq, logits.last_hidden[row])
        if chains:
            for chain, verdict in zip(chains, self.speculation.verify(chains, logits)):
                self._apply_verdict(chain.seq, verdict)
                if logits.chunk_hidden is not None and not chain.seq.is_finished:
                    self.speculation.observe(chain.seq, logits.chunk_hidden[chain.seq.seq_id][verdict.last_row])
        self.counters.num_steps += 1
        outputs = (self._finish_if_done(request) for request in touched.values())
        return [output for output in outputs if output is not None]

    def _apply_verdict(self, seq: Sequence, verdict: Verdict) -> None:
        """Keep the accepted prefix of a verified chain in the cache and append the emitted tokens."""
        base = len(seq.token_ids)
        kept_rows = list(range(1, verdict.num_accepted + 1))
        if verdict.rows != kept_rows:
            # A tree's kept path sits at scattered slots: move it to the positions it now occupies.
            start = base - 1
            self.cache.move_slots(self._slots(seq, [start + r for r in verdict.rows]),
                                  self._slots(seq, [start + r for r in kept_rows]))
        seq.num_computed = base + verdict.num_accepted      # the last emitted token is not computed yet
        self.blocks.truncate(seq.block_table, seq.num_computed)
        for token, logprob in zip(verdict.token_ids, verdict.logprobs):
            self._append_token(seq, token, logprob)
            if seq.is_finished:
                return
        self.speculation.proposer.on_verified(seq, verdict.num_accepted)

    def _advance(self, sched: SchedulerOutput, logits: StepLogits) -> tuple[list[Sequence], torch.Tensor]:
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
                    if target.num_computed == len(target.token_ids):
                        sampling_seqs.append(target)
                        rows.append(row_of[seq.seq_id])
        return sampling_seqs, torch.tensor(rows, dtype=torch.long, device=self.loaded.device)

    def _advance_beams(self, seqs: list[Sequence], rows: torch.Tensor, logits: torch.Tensor):
        """Hand beam-search rows to their requests; return the rest for the sampler."""
        if not any(seq.request.beam is not None for seq in seqs):
            return seqs, rows
        ready: dict[str, dict[int, int]] = {}
        keep = []
        for i, (seq, row) in enumerate(zip(seqs, rows.tolist())):
            if seq.request.beam is not None:
                ready.setdefault(seq.request.req_id, {})[seq.seq_id] = row
            else:
                keep.append(i)
        for request_id, beam_rows in ready.items():
            request = self._requests[request_id]
            self.beams.advance(request, beam_rows, logits)
            self.counters.num_generated_tokens += len(beam_rows)
        return [seqs[i] for i in keep], rows[keep]

    def _fork(self, request: Request) -> None:
        leader = request.leader
        for seq in request.seqs[1:]:
            if not seq.is_finished:
                seq.block_table = self.blocks.fork(leader.block_table, request.prompt_len)
                seq.num_computed = request.prompt_len
        if leader.is_finished:   # recomputed only to rebuild the shared prompt
            self.blocks.free(leader.block_table)
        request.is_forked = True

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        request, params = seq.request, seq.request.params
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        self.counters.num_generated_tokens += 1
        if seq.grammar is not None:
            seq.grammar.advance(token)
        new_text = seq.detokenizer.append(token)
        if not params.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, FinishReason.STOP)
        elif token in params.stop_token_ids:
            self._finish(seq, FinishReason.STOP, token)
        elif params.stop and new_text and seq.num_output_tokens >= params.min_tokens and \
                (found := find_stop_string(seq.detokenizer.text, len(new_text), params.stop)):
            index, stop = found
            seq.detokenizer.text = seq.detokenizer.text[: index + (len(stop) if params.include_stop_str_in_output else 0)]
            self._finish(seq, FinishReason.STOP, stop)
        elif seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH)

    def _slots(self, seq: Sequence, positions: list[int]) -> torch.Tensor:
        return torch.tensor(self.blocks.slots(seq.block_table, positions), dtype=torch.long, device=self.loaded.device)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        if not isinstance(stop_reason, str):
            seq.detokenizer.flush()      # a stop string cut the text on purpose; otherwise it is every token's
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.blocks.free(seq.block_table)
        if self.speculation:
            self.speculation.release(seq)

    def _finish_if_done(self, request: Request) -> RequestOutput | None:
        """Retire a finished request; its snapshot, unless it is unfinished and not streamed."""
        if request.is_finished and request.status is not RequestStatus.FINISHED:
            self.scheduler.remove(request)
            request.status = RequestStatus.FINISHED
            request.finish_time = time.monotonic()
            self._requests.pop(request.req_id, None)
        if request.stream or request.status is RequestStatus.FINISHED:
            return RequestOutput.of(request)
        return None

    def _record_prompt_logprobs(self, sched: SchedulerOutput, logits: StepLogits, wanted: set[int]) -> None:
        for item in sched.scheduled:
            chunk = logits.chunk.get(item.seq.seq_id) if item.seq.seq_id in wanted else None
            request = item.seq.request
            if chunk is None or len(request.prompt_logprobs) > item.start:
                continue   # recomputation after preemption: already recorded
            if not request.prompt_logprobs:
                request.prompt_logprobs.append(None)   # the first prompt token has no context
            params = request.params
            if params.logprobs_mode == "processed" and params.temperature > 0:
                chunk = chunk / params.temperature
            logprobs = torch.log_softmax(chunk, dim=-1)
            end = min(item.start + item.num_new_tokens, request.prompt_len - 1)
            targets = torch.tensor(request.prompt_token_ids[item.start + 1 : end + 1])
            chosen = logprobs[: len(targets)].gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            top = logprobs[: len(targets)].topk(params.prompt_logprobs, dim=-1) if params.prompt_logprobs else None
            for i, value in enumerate(chosen):
                alternatives = dict(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else None
                request.prompt_logprobs.append(TokenLogprob(value, alternatives))

    # ---- weights -----------------------------------------------------------------------------
    def started_request_ids(self) -> list[str]:
        """Requests admitted under the current weights that have not finished (running or preempted)."""
        return [r.req_id for r in self._requests.values() if r.weight_version is not None]

    def has_started_requests(self) -> bool:
        return any(r.weight_version is not None for r in self._requests.values())

    def update_weights(self, tensors: dict[str, torch.Tensor], version: int | None = None,
                       require_all: bool = False, allow_non_finite: bool = False,
                       allow_version_rollback: bool = False) -> int:
        """Validate every tensor (decoding/weights.py: names, shapes, dtypes, and NaN or infinite values
        unless allow_non_finite), then apply them (apply_validated_weights)."""
        self.check_weight_version(version, allow_version_rollback)
        validate_update(self.loaded.model, tensors, require_all, allow_non_finite)
        return self.apply_validated_weights(tensors, version, allow_version_rollback)

    def apply_validated_weights(self, tensors: dict[str, torch.Tensor], version: int | None = None,
                                allow_version_rollback: bool = False) -> int:
        """Copy in tensors that validate_update passed and set (or bump) the weight version.

        A version below the current one is refused unless allow_version_rollback (a trainer that
        restarted from an older checkpoint says so; anything else is a stale push); it is checked here
        again, as the version may have moved since the tensors were validated. The caller makes sure no
        started request is in flight (AsyncEngine.update_weights waits for them or aborts them), so every
        request is generated wholly under one version. There is no cross-request prefix cache to flush: a
        group's shared prompt blocks live only as long as its request.
        """
        self.check_weight_version(version, allow_version_rollback)
        if self.has_started_requests():
            raise RuntimeError("weights cannot change while requests are being generated")
        apply_update(self.loaded.model, tensors)
        self.weight_version = self.weight_version + 1 if version is None else version
        return self.weight_version

    def check_weight_version(self, version: int | None, allow_version_rollback: bool = False) -> None:
        if version is not None and version < self.weight_version and not allow_version_rollback:
            raise WeightUpdateError(f"weight_version {version} is lower than the served version {self.weight_version}; "
                                    "send a newer version, or allow_version_rollback to go back on purpose",
                                    param="weight_version")

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
