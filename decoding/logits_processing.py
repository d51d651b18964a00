"""The logits pipeline: every place that turns a step's logits into scores goes through here.

- Sampling and speculative verification (`process_logits`): penalties -> the min_tokens ban -> the
  grammar's allowed tokens -> temperature -> top-k -> top-p -> min-p, as in HF's `generate` (a grammar
  that allows only what min_tokens bans wins). A verified row is processed exactly as a plainly sampled
  one: its sequence with the draft tokens before it (`SamplingMetadata.drafted`).
- Beam search (`beam_log_probs`): HF's order for beams, log_softmax first, then the repetition penalty
  and min_tokens' ban on log-probs, then the grammar.
- Prompt logprobs and scoring (`prompt_log_probs`): log_softmax of the model's logits, or of the
  temperature-scaled ones in `processed` mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.params import SamplingParams
from decoding.sampling_metadata import SamplingMetadata
from decoding.structured.grammar import unpack_bits
from models import kernels

NEG_INF = float("-inf")


@dataclass
class ProcessedLogits:
    """Logits after each stage of the pipeline, one row per sequence."""

    raw: torch.Tensor                    # [N, vocab] as the model produced them
    penalised: torch.Tensor              # after penalties and bans; greedy rows take its argmax
    logprobs: torch.Tensor | None        # log of the sampling distribution (temperature, truncation)


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


def row_index(rows: list[int]) -> torch.Tensor:
    """rows as an int64 tensor; 0..n-1 (every row constrained, the common case) from a cache, since
    building a tensor from a list costs as much as masking a row."""
    n = len(rows)
    if rows == list(range(n)):
        while len(_FIRST_ROWS) <= n:
            _FIRST_ROWS.append(torch.arange(len(_FIRST_ROWS)))
        return _FIRST_ROWS[n]
    return torch.tensor(rows)


def process_logits(logits: torch.Tensor, batch: SamplingMetadata, distribution: bool = True,
                   apply_bits: bool = True) -> ProcessedLogits:
    """Penalties and bans, then (when `distribution`) temperature and truncation to the log of the
    distribution a sampled row draws from. Speculative verification runs the same pipeline, so a
    verified position is processed exactly as a plainly sampled one. `apply_bits` False leaves
    `batch.allowed_bits` to the caller."""
    raw_logits = logits
    logits = _penalise(logits, batch) if batch.any_penalty else logits
    bits = batch.allowed_bits if apply_bits else None
    if batch.banned or batch.allowed or bits:
        logits = logits.clone() if logits is raw_logits else logits
        if batch.banned:
            rows = [row for row, ids in batch.banned for _ in ids]
            logits[rows, [i for _, ids in batch.banned for i in ids]] = NEG_INF
        # Mask width is the logits width, not the tokenizer's.
        if bits:
            _apply_bits(logits, raw_logits, *bits)
        if batch.allowed:
            _apply_allowed(logits, raw_logits, batch.allowed)
    if not distribution:
        return ProcessedLogits(raw_logits, logits, None)
    temperature = torch.where(batch.greedy, 1.0, batch.temperature)
    # The native draw's arithmetic where a row is not truncated (the rows the sampler draws natively):
    # a position verified by speculation, or scored for top-N alternatives, reports the bits plain
    # sampling reports for it.
    log_probs = kernels.log_softmax_at(logits, temperature)
    if log_probs is None or batch.any_truncation:
        scaled = logits / temperature.unsqueeze(1)
        truncated = torch.log_softmax(_truncate(scaled, batch) if batch.any_truncation else scaled, dim=-1)
        if log_probs is None:
            log_probs = truncated
        else:
            rows = [row for row, seq in enumerate(batch.seqs) if seq.request.params.has_truncation]
            log_probs[rows] = truncated[rows]
    return ProcessedLogits(raw_logits, logits, log_probs)


def _apply_allowed(logits: torch.Tensor, raw_logits: torch.Tensor, allowed: dict[int, torch.Tensor]) -> None:
    """In place: each constrained row keeps only its allowed tokens. A mask is bool [vocab], or the
    grammar's packed int32 bits, which the native kernel applies without unpacking."""
    packed = {row: bits for row, bits in allowed.items() if bits.dtype == torch.int32}
    masks = {row: mask for row, mask in allowed.items() if mask.dtype == torch.bool}
    if packed:
        _apply_bits(logits, raw_logits, list(packed), torch.stack(list(packed.values())))
    if masks:
        index = torch.tensor(list(masks), device=logits.device)
        logits[index] = apply_grammar_masks(logits[index], raw_logits[index], torch.stack(list(masks.values())))


def _apply_bits(logits: torch.Tensor, raw_logits: torch.Tensor, rows: list[int], bits: torch.Tensor) -> None:
    """In place: row rows[i] keeps only the tokens set in the packed int32 bits[i]; the native kernel
    applies them without unpacking."""
    vocab = logits.shape[1]
    if kernels.native_ops_available(logits.device, logits.dtype) and logits.is_contiguous():
        dead = kernels.mask_rows_by_bits(logits, row_index(rows), bits)
        for i, is_dead in enumerate(dead.tolist()):
            if is_dead:    # the grammar wins over min_tokens, as in apply_grammar_masks
                logits[rows[i]] = raw_logits[rows[i]].masked_fill(~unpack_bits(bits[i : i + 1], vocab)[0], NEG_INF)
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = apply_grammar_masks(logits[index], raw_logits[index], unpack_bits(bits, vocab))


def _penalise(logits: torch.Tensor, batch: SamplingMetadata) -> torch.Tensor:
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


def _truncate(scaled: torch.Tensor, batch: SamplingMetadata) -> torch.Tensor:
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


def beam_log_probs(logits: torch.Tensor, histories: list[list[int]], repetition_penalty: float,
                   banned_ids: list[int], bits: torch.Tensor | None) -> torch.Tensor:
    """Beams' rows [B, vocab] in HF's order: log_softmax of float32 logits, then the repetition penalty
    and the ban on log-probs; then, as HF's prefix-constrained processor, the tokens each beam's grammar
    refuses (packed `bits`, one row per beam) at -inf, the grammar winning over the ban."""
    def processed(banned: list[int]) -> torch.Tensor:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if repetition_penalty != 1.0:
            for row, history in enumerate(histories):
                apply_repetition_penalty(log_probs[row], history, repetition_penalty)
        if banned:
            log_probs[:, banned] = NEG_INF
        return log_probs
    log_probs = processed(banned_ids)
    if bits is None:
        return log_probs
    unbanned = processed([]) if banned_ids else log_probs
    return apply_grammar_masks(log_probs, unbanned, unpack_bits(bits, log_probs.shape[1]))


def prompt_log_probs(chunk: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probs of a prompt chunk's rows, in the request's logprobs_mode."""
    if params.logprobs_mode == "processed" and params.temperature > 0:
        return torch.log_softmax(chunk / params.temperature, dim=-1)
    return kernels.raw_log_softmax(chunk)
