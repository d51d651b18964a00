"""Turn logits into tokens and logprobs, one row per sequence, each with its own parameters.

Order of processing, as in HF's `generate`: penalties -> (min_tokens ban) -> temperature -> top-k ->
top-p -> min-p. Temperature 0 rows take the argmax of the penalised logits. Every row draws its
randomness from its own seeded generator, so a seeded request reproduces regardless of its neighbours.

On the CPU, rows that need no truncation and no top-N alternatives (the usual sampled request and every
RL rollout) are drawn by a native kernel (models/kernels/sampling.c) from the penalised logits: the
same inverse-CDF rule without materialising the [rows, vocab] distribution. Which path a row takes
depends only on its own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.sequence import Sequence, TokenLogprob
from decoding.structured.grammar import unpack_bits
from models import kernels

NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Per-row sampling inputs, built from the sequences that sample this step. A row may also stand
    for a sequence with draft tokens appended (verification, a draft model's own sampling): penalties
    then see them and min_tokens counts them, as if they had been sampled."""

    seqs: list[Sequence]
    drafted: list[list[int]]             # per row, draft tokens taken as following the sequence's own
    temperature: torch.Tensor            # [N]
    top_k: torch.Tensor                  # [N], vocab size where disabled
    top_p: torch.Tensor                  # [N]
    min_p: torch.Tensor                  # [N]
    greedy: torch.Tensor                 # [N] bool
    banned: list[tuple[int, list[int]]]  # (row, token ids) banned before min_tokens is reached
    allowed: dict[int, torch.Tensor]     # row -> the only tokens a constraint permits: bool [vocab], or
                                         # int32 bits [ceil(vocab / 32)] (GrammarCursor.allowed_bits)
    allowed_bits: tuple[list[int], torch.Tensor] | None   # the same for many rows at once: (rows, int32
                                         # bits [len(rows), words]), as a decode step computes them
    any_penalty: bool
    any_truncation: bool
    all_greedy: bool
    num_top_logprobs: int                # max top-N over rows; -1 when no row wants logprobs

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], vocab_size: int, eos_token_ids: frozenset[int],
                       device: torch.device, allowed: dict[int, torch.Tensor] | None = None,
                       allowed_bits: tuple[list[int], torch.Tensor] | None = None,
                       drafted: list[list[int]] | None = None) -> SamplingBatch:
        params = [seq.request.params for seq in seqs]
        drafted = drafted or [[]] * len(seqs)
        banned = [(row, seq.request.banned_before_min_tokens(eos_token_ids, vocab_size))
                  for row, (seq, p, extra) in enumerate(zip(seqs, params, drafted))
                  if seq.num_output_tokens + len(extra) < p.min_tokens]
        wants = [p.logprobs for p in params if p.logprobs is not None]
        # One tensor for the per-row numbers (a tensor from a Python list costs a few microseconds each).
        numbers = torch.tensor([[p.temperature for p in params], [p.top_k if p.top_k > 0 else vocab_size for p in params],
                                [p.top_p for p in params], [p.min_p for p in params]], dtype=torch.float32, device=device)
        return cls(
            seqs=seqs,
            drafted=drafted,
            temperature=numbers[0],
            top_k=numbers[1].long(),
            top_p=numbers[2],
            min_p=numbers[3],
            greedy=numbers[0] == 0,
            banned=banned,
            allowed=allowed or {},
            allowed_bits=allowed_bits,
            any_penalty=any(p.has_penalties for p in params),
            any_truncation=any(p.has_truncation for p in params),
            all_greedy=all(p.is_greedy for p in params),
            num_top_logprobs=max(wants) if wants else -1,
        )

    def history(self, row: int) -> list[int]:
        """The tokens row `row` continues: its sequence's, then its draft tokens."""
        extra = self.drafted[row]
        return self.seqs[row].token_ids + extra if extra else self.seqs[row].token_ids

    def output_tokens(self, row: int) -> list[int]:
        return self.history(row)[self.seqs[row].prompt_len :]

    @property
    def constrained_rows(self) -> set[int]:
        return set(self.allowed) | set(self.allowed_bits[0] if self.allowed_bits else ())


def apply_repetition_penalty(scores: torch.Tensor, history: list[int], penalty: float) -> None:
    """HF's rule, in place on one row [vocab]: scores of seen tokens are divided by the penalty when
    positive and multiplied by it when negative (beam search applies it to log-probs, as HF does)."""
    seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=scores.device)
    seen = seen[seen < scores.shape[-1]]
    values = scores[seen]
    scores[seen] = torch.where(values < 0, values * penalty, values / penalty)


def apply_grammar_masks(scores: torch.Tensor, unbanned: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Rows' scores [R, vocab] with the tokens their grammar refuses (masks [R, vocab], bool) at -inf. When a
    grammar allows only what min_tokens bans (it is complete and may only end), the grammar wins: that
    row's `unbanned` scores (the same row before the ban) are masked instead, so the output stays valid
    and ends."""
    kept = scores.masked_fill(~masks, NEG_INF)
    dead = torch.isinf(kept).all(dim=1)
    if bool(dead.any()):
        kept[dead] = unbanned[dead].masked_fill(~masks[dead], NEG_INF)
    return kept


_FIRST_ROWS: list[torch.Tensor] = [torch.arange(0)]


def _row_index(rows: list[int]) -> torch.Tensor:
    """rows as an int64 tensor; 0..n-1 (every row constrained, the common case) from a cache, since
    building a tensor from a list costs as much as masking a row."""
    n = len(rows)
    if rows == list(range(n)):
        while len(_FIRST_ROWS) <= n:
            _FIRST_ROWS.append(torch.arange(len(_FIRST_ROWS)))
        return _FIRST_ROWS[n]
    return torch.tensor(rows)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]   # None for rows that did not ask for logprobs


@dataclass
class ProcessedLogits:
    """Logits after each stage of the pipeline, one row per sequence."""

    raw: torch.Tensor                    # [N, vocab] as the model produced them
    penalised: torch.Tensor              # after penalties and bans; greedy rows take its argmax
    logprobs: torch.Tensor | None        # log of the sampling distribution (temperature, truncation)


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [N, vocab] float32 -> one token per row."""
        native_rows = self._native_rows(logits, batch)
        uniforms = None if batch.all_greedy else self.uniforms(batch)
        if len(native_rows) == len(batch.seqs):
            if batch.allowed_bits and not batch.allowed and not any(
                    s.request.params.logprobs_mode == "raw" for s in batch.seqs):
                return self._sample_native_masked(logits, batch, uniforms)
            return self._sample_native(self.process(logits, batch, distribution=False).penalised, batch, uniforms)
        needs_processed = batch.num_top_logprobs >= 0 or not batch.all_greedy
        processed = self.process(logits, batch, needs_processed)
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
    def _native_rows(logits: torch.Tensor, batch: SamplingBatch) -> list[int]:
        """Rows the native kernel draws: no truncation, no top-N alternatives, and in raw mode nothing
        that makes the penalised logits differ from the model's."""
        if not kernels.native_ops_available(logits.device, logits.dtype):
            return []
        banned = {row for row, _ in batch.banned}
        constrained = batch.constrained_rows
        rows = []
        for row, seq in enumerate(batch.seqs):
            p = seq.request.params
            if p.has_truncation or (p.logprobs or 0) > 0:
                continue
            if p.logprobs is not None and p.logprobs_mode == "raw" and (p.has_penalties or row in banned or row in constrained):
                continue
            rows.append(row)
        return rows

    @staticmethod
    def _sample_native(penalised: torch.Tensor, batch: SamplingBatch, uniforms: torch.Tensor | None) -> SamplerOutput:
        num_rows = len(batch.seqs)
        want_raw = torch.tensor([s.request.params.logprobs_mode == "raw" for s in batch.seqs])
        tokens, logprobs, raw_logprobs = kernels.sample_rows(
            penalised, batch.temperature, uniforms if uniforms is not None else torch.zeros(num_rows), batch.greedy, want_raw)
        chosen = torch.where(want_raw, raw_logprobs, logprobs).tolist()
        results = [None if s.request.params.logprobs is None else TokenLogprob(lp, None) for s, lp in zip(batch.seqs, chosen)]
        return SamplerOutput(tokens.tolist(), results)

    def _sample_native_masked(self, logits: torch.Tensor, batch: SamplingBatch,
                              uniforms: torch.Tensor | None) -> SamplerOutput:
        """The native draw for a batch with grammar rows: their allowed-token bits are read while
        sampling (no masked copy of the logits). Same tokens and logprobs as masking, then drawing."""
        num_rows = len(batch.seqs)
        penalised = self.process(logits, batch, distribution=False, apply_bits=False).penalised
        rows, bits = batch.allowed_bits
        if len(rows) != num_rows:                 # unconstrained rows allow every token
            every = torch.full((num_rows, bits.shape[1]), -1, dtype=torch.int32)
            every[_row_index(rows)] = bits
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
        results = [None if s.request.params.logprobs is None else TokenLogprob(lp, None)
                   for s, lp in zip(batch.seqs, logprobs)]
        return SamplerOutput(tokens, results)

    def process(self, logits: torch.Tensor, batch: SamplingBatch, distribution: bool = True,
                apply_bits: bool = True) -> ProcessedLogits:
        """Penalties and bans, then (when `distribution`) temperature and truncation to the log of the
        distribution a sampled row draws from. Speculative verification runs the same pipeline, so a
        verified position is processed exactly as a plainly sampled one. `apply_bits` False leaves
        `batch.allowed_bits` to the caller."""
        raw_logits = logits
        logits = self._penalise(logits, batch) if batch.any_penalty else logits
        bits = batch.allowed_bits if apply_bits else None
        if batch.banned or batch.allowed or bits:
            logits = logits.clone() if logits is raw_logits else logits
            if batch.banned:
                rows = [row for row, ids in batch.banned for _ in ids]
                logits[rows, [i for _, ids in batch.banned for i in ids]] = NEG_INF
            # Mask width is the logits width, not the tokenizer's.
            if bits:
                self._apply_bits(logits, raw_logits, *bits)
            if batch.allowed:
                self._apply_allowed(logits, raw_logits, batch.allowed)
        if not distribution:
            return ProcessedLogits(raw_logits, logits, None)
        scaled = logits / torch.where(batch.greedy, 1.0, batch.temperature).unsqueeze(1)
        if batch.any_truncation:
            scaled = self._truncate(scaled, batch)
        return ProcessedLogits(raw_logits, logits, torch.log_softmax(scaled, dim=-1))

    # ---- processing --------------------------------------------------------------------------
    @staticmethod
    def _apply_allowed(logits: torch.Tensor, raw_logits: torch.Tensor, allowed: dict[int, torch.Tensor]) -> None:
        """In place: each constrained row keeps only its allowed tokens. A mask is bool [vocab], or the
        grammar's packed int32 bits, which the native kernel applies without unpacking."""
        packed = {row: bits for row, bits in allowed.items() if bits.dtype == torch.int32}
        masks = {row: mask for row, mask in allowed.items() if mask.dtype == torch.bool}
        if packed:
            Sampler._apply_bits(logits, raw_logits, list(packed), torch.stack(list(packed.values())))
        if masks:
            index = torch.tensor(list(masks), device=logits.device)
            logits[index] = apply_grammar_masks(logits[index], raw_logits[index], torch.stack(list(masks.values())))

    @staticmethod
    def _apply_bits(logits: torch.Tensor, raw_logits: torch.Tensor, rows: list[int], bits: torch.Tensor) -> None:
        """In place: row rows[i] keeps only the tokens set in the packed int32 bits[i]; the native kernel
        applies them without unpacking."""
        vocab = logits.shape[1]
        if kernels.native_ops_available(logits.device, logits.dtype) and logits.is_contiguous():
            dead = kernels.mask_rows_by_bits(logits, _row_index(rows), bits)
            for i, is_dead in enumerate(dead.tolist()):
                if is_dead:    # the grammar wins over min_tokens, as in apply_grammar_masks
                    logits[rows[i]] = raw_logits[rows[i]].masked_fill(~unpack_bits(bits[i : i + 1], vocab)[0], NEG_INF)
        else:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = apply_grammar_masks(logits[index], raw_logits[index], unpack_bits(bits, vocab))

    @staticmethod
    def _penalise(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits.clone()
        num_rows, vocab = logits.shape
        for row, seq in enumerate(batch.seqs):
            p = seq.request.params
            if not p.has_penalties:
                continue
            if p.repetition_penalty != 1:
                apply_repetition_penalty(logits[row], batch.history(row), p.repetition_penalty)
            output_tokens = batch.output_tokens(row)
            if (p.presence_penalty or p.frequency_penalty) and output_tokens:
                out = torch.tensor(output_tokens, dtype=torch.long, device=logits.device)
                counts = torch.zeros(vocab, device=logits.device).scatter_add_(
                    0, out.clamp(max=vocab - 1), torch.ones_like(out, dtype=torch.float32))
                logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        return logits

    @staticmethod
    def _truncate(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Top-k, then top-p over the renormalised survivors, then min-p: masked tokens get -inf."""
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(scaled.shape[-1], device=scaled.device).unsqueeze(0)
        remove = rank >= batch.top_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(remove, NEG_INF)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass strictly before it already reaches top_p (the first always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        top_p = torch.where(batch.top_p >= 1, float("inf"), batch.top_p)  # top_p = 1 keeps even rounding dust
        remove |= mass_before >= top_p.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(remove, NEG_INF)
        probs = sorted_logits.softmax(dim=-1)
        remove |= probs < (batch.min_p.unsqueeze(1) * probs[:, :1])
        sorted_logits = sorted_logits.masked_fill(remove, NEG_INF)
        return torch.empty_like(scaled).scatter_(1, order, sorted_logits)

    @staticmethod
    def uniforms(batch: SamplingBatch) -> torch.Tensor:
        """One uniform draw per row from that row's own generator, on the CPU."""
        return torch.cat([torch.rand(1, generator=seq.generator) for seq in batch.seqs])

    @classmethod
    def sample(cls, probs: torch.Tensor, batch: SamplingBatch, uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse-CDF sampling with the rows' uniforms (drawn here when not given)."""
        uniforms = (cls.uniforms(batch) if uniforms is None else uniforms).to(probs.device)
        cdf = probs.cumsum(dim=-1)                                           # [N, vocab]
        targets = (uniforms * cdf[:, -1]).unsqueeze(1)
        # right=True never lands on a zero-probability token: its cdf equals its predecessor's.
        tokens = torch.searchsorted(cdf, targets, right=True).squeeze(1)
        return tokens.clamp_(max=probs.shape[-1] - 1)

    @staticmethod
    def logprobs(processed: ProcessedLogits, tokens: torch.Tensor, batch: SamplingBatch) -> list[TokenLogprob | None]:
        """The chosen token's logprob and the top-N, in each row's logprobs_mode."""
        if batch.num_top_logprobs < 0:
            return [None] * len(batch.seqs)
        raw_logits, processed_logprobs = processed.raw, processed.logprobs
        raw_rows = [i for i, s in enumerate(batch.seqs) if s.request.params.logprobs_mode == "raw"]
        chosen = processed_logprobs
        if raw_rows:
            raw = torch.log_softmax(raw_logits, dim=-1)
            use_raw = torch.zeros(len(batch.seqs), 1, dtype=torch.bool, device=raw.device)
            use_raw[raw_rows] = True
            chosen = torch.where(use_raw, raw, processed_logprobs)
        token_logprobs = chosen.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        top_values, top_ids = (None, None)
        if batch.num_top_logprobs > 0:
            top = chosen.topk(batch.num_top_logprobs, dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        results: list[TokenLogprob | None] = []
        for row, seq in enumerate(batch.seqs):
            wanted = seq.request.params.logprobs
            if wanted is None:
                results.append(None)
                continue
            alternatives = None
            if wanted > 0:
                alternatives = dict(zip(top_ids[row][:wanted], top_values[row][:wanted]))
            results.append(TokenLogprob(token_logprobs[row], alternatives))
        return results
