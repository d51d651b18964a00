"""Engine-side beam search: feed each beam request's logits to its `BeamSearch` and say, per request,
which beam each new beam continues (`BeamStep`). The update phase then re-points the beams' block
tables at their parents' (fork + copy-on-write), so beams share every common block and a step never
copies a whole sequence's cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from decoding.beam import BeamSearch, Hypothesis
from decoding.logits_processing import beam_log_probs
from decoding.detokenizer import find_stop_string
from decoding.sequence import Request, Sequence
from decoding.structured.grammar import GrammarCursor
from decoding.structured.step_masks import StepMasks

if TYPE_CHECKING:
    from decoding.update import EngineCounters


@dataclass
class BeamStep:
    """One beam request's step: new beam i continues `parents[i]` (a sequence of the step before) with
    grammar cursor `cursors[i]`; `results` once the search is done. Or, where only some beams were
    computed (after a preemption), no step: those forget their last token's KV (`recompute`) and
    compute it again with the others."""

    request: Request
    parents: list[Sequence]
    cursors: list[GrammarCursor | None]
    results: list[Hypothesis] | None
    recompute: list[Sequence] = field(default_factory=list)


class BeamRequests:
    def __init__(self, tokenizer, eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def start(self, request: Request, max_len: int) -> None:
        params = request.params
        stops = params.stop
        request.beam = BeamSearch(
            num_beams=params.num_beams, prompt_len=request.prompt_len, max_len=max_len,
            stop_token_ids=params.stop_token_set(self.eos_token_ids), length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            hits_stop_string=(lambda tokens, token: self._completes_stop(tokens, token, stops)) if stops else None)

    def take_rows(self, seqs: list[Sequence], rows: torch.Tensor, logits: torch.Tensor, masks: StepMasks,
                  counters: EngineCounters) -> tuple[list[Sequence], torch.Tensor, list[BeamStep]]:
        """Advance every beam-search request whose beams sample this step (their rows of `logits`);
        return the other sequences and their rows, for the sampler, and the beam steps to apply."""
        if not any(seq.request.beam is not None for seq in seqs):
            return seqs, rows, []
        ready: dict[str, tuple[Request, dict[int, int]]] = {}
        keep = []
        for i, (seq, row) in enumerate(zip(seqs, rows.tolist())):
            if seq.request.beam is not None:
                ready.setdefault(seq.request.req_id, (seq.request, {}))[1][seq.seq_id] = row
            else:
                keep.append(i)
        steps = []
        for request, beam_rows in ready.values():
            steps.append(self.advance(request, beam_rows, logits, masks))
            counters.num_generated_tokens += len(beam_rows)
        return [seqs[i] for i in keep], rows[keep], steps

    def advance(self, request: Request, ready: dict[int, int], logits: torch.Tensor,
                masks: StepMasks) -> BeamStep:
        """`ready` maps the seq_id of each beam whose logits this step computed to its row in `logits`."""
        running = [seq for seq in request.seqs if not seq.is_finished]
        if any(seq.seq_id not in ready for seq in running):
            # Beams advance together. After a preemption they are recomputed separately; one that got
            # there first forgets its last token's KV and computes it again with the others.
            return BeamStep(request, [], [], None, [seq for seq in running if seq.seq_id in ready])
        params, beam = request.params, request.beam
        generated = len(running[0].token_ids) - request.prompt_len
        banned = sorted(beam.stop_token_ids) if generated < params.min_tokens else []
        rows = torch.tensor([ready[seq.seq_id] for seq in running], device=logits.device)
        # Each beam has its own grammar cursor (forked from its parent's): its row of the step's bits.
        constrained = masks.rows_of(running) if running[0].grammar is not None else None
        log_probs = beam_log_probs(logits[rows].cpu(), [s.token_ids for s in running], params.repetition_penalty,
                                   banned, None if constrained is None else constrained[1])
        if len(running) < beam.num_beams:     # the first step: every beam is the prompt
            log_probs = log_probs[:1].expand(beam.num_beams, -1)
        result = beam.step(log_probs)
        parents = [running[min(p, len(running) - 1)] for p in result.parents]
        results = ([self._with_text(h, params) for h in beam.best(params.num_return_sequences)]
                   if result.done else None)
        return BeamStep(request, parents, self._child_cursors(parents, beam), results)

    @staticmethod
    def _child_cursors(parent_seqs: list[Sequence], beam: BeamSearch) -> list[GrammarCursor | None]:
        """Each new beam's grammar cursor: its parent's, advanced by the beam's new token. The first child
        of a parent takes the parent's cursor, a second one a fork of it (before either advances)."""
        if parent_seqs[0].grammar is None:
            return [None] * len(parent_seqs)
        taken, cursors = set(), []
        for parent in parent_seqs:
            cursor = parent.grammar
            cursors.append(cursor.fork() if id(cursor) in taken else cursor)
            taken.add(id(cursor))
        for slot, cursor in enumerate(cursors):
            cursor.advance(beam.running_tokens[slot][-1])
        return cursors

    def _with_text(self, hypothesis: Hypothesis, params) -> Hypothesis:
        text = self.tokenizer.decode(hypothesis.token_ids, skip_special_tokens=params.skip_special_tokens)
        found = find_stop_string(text, len(text), params.stop) if params.stop else None
        if found:
            index, stop = found
            text = text[: index + (len(stop) if params.include_stop_str_in_output else 0)]
        hypothesis.text = text
        return hypothesis

    def _completes_stop(self, tokens: list[int], token: int, stops: tuple[str, ...]) -> bool:
        before = self.tokenizer.decode(tokens)
        after = self.tokenizer.decode(tokens + [token])
        return find_stop_string(after, max(1, len(after) - len(before)), stops) is not None
