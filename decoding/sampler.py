"""Turn logits into tokens and logprobs, one row per sequence, each with its own parameters.

The logits go through the one pipeline (`logits_processing.process_logits`); temperature 0 rows take
the argmax of the penalised logits, the others draw from the processed distribution. Every row draws its
randomness from its seed and the position it draws for, so a seeded request reproduces regardless of its
neighbours, and a request resumed from its partial completion continues as if never stopped.

On the CPU, rows that need no truncation and no top-N alternatives (the usual sampled request and every
RL rollout) are drawn by a native kernel (models/kernels/sampling.c) from the penalised logits: the
same inverse-CDF rule without materialising the [rows, vocab] distribution. Which path a row takes
depends only on its own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.logits_processing import NEG_INF, ProcessedLogits, process_logits, row_index
from decoding.sampling_metadata import SamplingMetadata
from decoding.sequence import TokenLogprob
from decoding.structured.grammar import unpack_bits
from models import kernels


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]   # None for rows that did not ask for logprobs


class Sampler:
    def draw(self, rows: torch.Tensor, logits: torch.Tensor, batch: SamplingMetadata) -> SamplerOutput:
        """The sampling phase of a step: one token for each of the batch's sequences from its row of
        `logits` [R, vocab] (`rows`)."""
        # Each row sampling once, in order, is the common case: the logits then need no gather.
        in_order = rows.numel() == logits.shape[0] and torch.equal(rows, torch.arange(rows.numel(), device=rows.device))
        return self(logits if in_order else logits[rows], batch)

    def __call__(self, logits: torch.Tensor, batch: SamplingMetadata) -> SamplerOutput:
        """logits [N, vocab] float32 -> one token per row."""
        native_rows = self._native_rows(logits, batch)
        uniforms = None if batch.all_greedy else self.uniforms(batch)
        if len(native_rows) == len(batch.seqs):
            if batch.allowed_bits and not batch.allowed and not any(
                    s.request.params.logprobs_mode == "raw" for s in batch.seqs):
                return self._sample_native_masked(logits, batch, uniforms)
            return self._sample_native(process_logits(logits, batch, distribution=False).penalised, batch, uniforms)
        needs_processed = batch.num_top_logprobs >= 0 or not batch.all_greedy
        processed = process_logits(logits, batch, needs_processed)
        greedy_tokens = processed.penalised.argmax(dim=-1)
        if processed.logprobs is None:
            output = SamplerOutput(greedy_tokens.tolist(), [None] * len(batch.seqs))
        else:
            if batch.all_greedy:
                tokens = greedy_tokens
            else:
                sampled = self.sample(processed.logprobs.exp(), batch, uniforms)
                tokens = torch.where(batch.greedy, greedy_tokens, sampled)
            output = SamplerOutput(tokens.tolist(), self.logprobs(processed, tokens, batch))
        if native_rows:   # overwrite so that those rows come out exactly as they would in a batch of their own
            native = self._sample_native(processed.penalised, batch, uniforms)
            for row in native_rows:
                output.token_ids[row], output.logprobs[row] = native.token_ids[row], native.logprobs[row]
        return output

    @staticmethod
    def _native_rows(logits: torch.Tensor, batch: SamplingMetadata) -> list[int]:
        """Rows the native kernel draws: no truncation, no top-N alternatives, and in raw mode nothing
        that makes the penalised logits differ from the model's."""
        if not kernels.native_ops_available(logits.device, logits.dtype):
            return []
        limited = {row for row, _ in batch.banned} | batch.constrained_rows
        return [row for row, seq in enumerate(batch.seqs) if draws_natively(seq.request.params, row in limited)]

    @staticmethod
    def _sample_native(penalised: torch.Tensor, batch: SamplingMetadata, uniforms: torch.Tensor | None) -> SamplerOutput:
        num_rows = len(batch.seqs)
        want_raw = torch.tensor([s.request.params.logprobs_mode == "raw" for s in batch.seqs])
        tokens, logprobs, raw_logprobs = kernels.sample_rows(
            penalised, batch.temperature, uniforms if uniforms is not None else torch.zeros(num_rows), batch.greedy, want_raw)
        chosen = torch.where(want_raw, raw_logprobs, logprobs).tolist()
        results = [None if s.request.params.logprobs is None else whole_vocabulary_logprob(lp, s.request.params)
                   for s, lp in zip(batch.seqs, chosen)]
        return SamplerOutput(tokens.tolist(), results)

    def _sample_native_masked(self, logits: torch.Tensor, batch: SamplingMetadata,
                              uniforms: torch.Tensor | None) -> SamplerOutput:
        """The native draw for a batch with grammar rows: their allowed-token bits are read while
        sampling (no masked copy of the logits). Same tokens and logprobs as masking, then drawing."""
        num_rows = len(batch.seqs)
        penalised = process_logits(logits, batch, distribution=False, apply_bits=False).penalised
        rows, bits = batch.allowed_bits
        if len(rows) != num_rows:                 # unconstrained rows allow every token
            every = torch.full((num_rows, bits.shape[1]), -1, dtype=torch.int32)
            every[row_index(rows)] = bits
            bits = every
        uniforms = uniforms if uniforms is not None else torch.zeros(num_rows)
        tokens, logprobs, dead = kernels.sample_rows_masked(penalised, batch.temperature, uniforms, batch.greedy, bits)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        for row in (row for row, is_dead in enumerate(dead.tolist()) if is_dead):
            # The grammar allows only what min_tokens bans: the grammar wins (as in apply_grammar_masks).
            kept = logits[row].masked_fill(~unpack_bits(bits[row : row + 1], logits.shape[1])[0], NEG_INF)
            token, logprob, _ = kernels.sample_rows(kept.unsqueeze(0), batch.temperature[row : row + 1],
                                                    uniforms[row : row + 1], batch.greedy[row : row + 1],
                                                    torch.zeros(1, dtype=torch.bool))
            tokens[row], logprobs[row] = int(token[0]), float(logprob[0])
        results = [None if s.request.params.logprobs is None else whole_vocabulary_logprob(lp, s.request.params)
                   for s, lp in zip(batch.seqs, logprobs)]
        return SamplerOutput(tokens, results)

    @staticmethod
    def uniforms(batch: SamplingMetadata) -> torch.Tensor:
        """One uniform per row, keyed by that row's seed and the position it draws for (past the row's
        draft tokens: a verification or drafting row draws for a later position), on the CPU."""
        return torch.tensor([seq.uniform(len(drafted)) for seq, drafted in zip(batch.seqs, batch.drafted)],
                            dtype=torch.float32)

    @classmethod
    def sample(cls, probs: torch.Tensor, batch: SamplingMetadata, uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse-CDF sampling with the rows' uniforms (drawn here when not given)."""
        uniforms = (cls.uniforms(batch) if uniforms is None else uniforms).to(probs.device)
        cdf = probs.cumsum(dim=-1)                                           # [N, vocab]
        targets = (uniforms * cdf[:, -1]).unsqueeze(1)
        # right=True never lands on a zero-probability token: its cdf equals its predecessor's.
        tokens = torch.searchsorted(cdf, targets, right=True).squeeze(1)
        return tokens.clamp_(max=probs.shape[-1] - 1)

    @staticmethod
    def logprobs(processed: ProcessedLogits, tokens: torch.Tensor, batch: SamplingMetadata) -> list[TokenLogprob | None]:
        """The chosen token's logprob and the top-N, in each row's logprobs_mode."""
        if batch.num_top_logprobs < 0:
            return [None] * len(batch.seqs)
        raw_logits, processed_logprobs = processed.raw, processed.logprobs
        raw_rows = [i for i, s in enumerate(batch.seqs) if s.request.params.logprobs_mode == "raw"]
        chosen = processed_logprobs
        if raw_rows:
            raw = kernels.raw_log_softmax(raw_logits)
            use_raw = torch.zeros(len(batch.seqs), 1, dtype=torch.bool, device=raw.device)
            use_raw[raw_rows] = True
            chosen = torch.where(use_raw, raw, processed_logprobs)
        token_logprobs = chosen.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        top_values, top_ids = (None, None)
        if batch.num_top_logprobs > 0:
            top = chosen.topk(batch.num_top_logprobs, dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        kept = _kept_supports(processed, batch)
        results: list[TokenLogprob | None] = []
        for row, seq in enumerate(batch.seqs):
            wanted = seq.request.params.logprobs
            if wanted is None:
                results.append(None)
                continue
            alternatives = None
            if wanted > 0:
                alternatives = dict(zip(top_ids[row][:wanted], top_values[row][:wanted]))
            kept_logprob, kept_ids = kept.get(row, (None, None))
            results.append(TokenLogprob(token_logprobs[row], alternatives, kept_logprob=kept_logprob,
                                        kept_token_ids=kept_ids))
        return results


def draws_natively(params, limited: bool) -> bool:
    """Whether the native kernel draws a row with these parameters, from its penalised logits (`limited`:
    min_tokens' bans or a grammar leave it short of the vocabulary): no truncation, no top-N alternatives,
    and no raw logprob or kept support that would have to come from other logits than those drawn from."""
    if params.has_truncation or (params.logprobs or 0) > 0:
        return False
    if params.logprobs is not None and params.logprobs_mode == "raw" and (params.has_penalties or limited):
        return False
    return not (_wants_kept(params) and limited)     # a support short of the vocabulary


def _wants_kept(params) -> bool:
    return params.kept_mass or params.kept_token_ids


def whole_vocabulary_logprob(logprob: float, params) -> TokenLogprob:
    """A token the native kernels drew from the whole vocabulary: its support keeps all the mass."""
    return TokenLogprob(logprob, kept_logprob=0.0 if _wants_kept(params) else None)


def _kept_supports(processed: ProcessedLogits, batch: SamplingMetadata) -> dict[int, tuple[float, tuple | None]]:
    """Per row that asked: (log of the raw-distribution mass of the tokens its processing kept, those ids
    or None when it kept every token). The kept tokens are those with a finite processed logprob."""
    rows = [row for row, seq in enumerate(batch.seqs) if _wants_kept(seq.request.params)]
    if not rows or processed.logprobs is None:
        return {}
    index = torch.tensor(rows, device=processed.raw.device)
    kept = torch.isfinite(processed.logprobs[index])
    raw = kernels.raw_log_softmax(processed.raw[index])
    masses = torch.logsumexp(raw.masked_fill(~kept, NEG_INF), dim=-1).tolist()
    whole = kept.all(dim=-1).tolist()
    result = {}
    for i, row in enumerate(rows):
        params = batch.seqs[row].request.params
        ids = None if whole[i] or not params.kept_token_ids else tuple(kept[i].nonzero().squeeze(1).tolist())
        result[row] = (0.0 if whole[i] else masses[i], ids)
    return result
