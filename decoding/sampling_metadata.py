"""Per-row sampling inputs as tensors, built from the sequences whose logits rows a step processes: what
the logits pipeline (`logits_processing.py`) and the sampler read. A step builds them once
(`SamplingMetadata.for_step`): one pass over its sampled and its verified rows, each part a view of the
same per-row tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.sequence import Sequence


@dataclass
class SamplingRows:
    """Rows for the logits pipeline: a sequence each, the draft tokens taken as following its own, and
    the grammar bits of the constrained ones ((positions, int32 [len(positions), words]) or None)."""

    seqs: list[Sequence]
    drafted: list[list[int]]
    allowed_bits: tuple[list[int], torch.Tensor] | None = None


@dataclass
class SamplingMetadata:
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
                       drafted: list[list[int]] | None = None) -> SamplingMetadata:
        rows = SamplingRows(seqs, drafted or [[]] * len(seqs), allowed_bits)
        return cls._of(rows, _numbers(rows.seqs, vocab_size, device), vocab_size, eos_token_ids, allowed)

    @classmethod
    def for_step(cls, parts: list[SamplingRows | None], vocab_size: int, eos_token_ids: frozenset[int],
                 device: torch.device) -> list[SamplingMetadata | None]:
        """The metadata of each part of a step's rows (None for an empty or absent part), from one
        tensor of per-row numbers."""
        present = [part for part in parts if part is not None and part.seqs]
        numbers = _numbers([seq for part in present for seq in part.seqs], vocab_size, device) if present else None
        out, start = [], 0
        for part in parts:
            if part is None or not part.seqs:
                out.append(None)
                continue
            bits = part.allowed_bits
            part = SamplingRows(part.seqs, part.drafted, bits and (bits[0], bits[1].to(device)))
            out.append(cls._of(part, numbers[:, start : start + len(part.seqs)], vocab_size, eos_token_ids))
            start += len(part.seqs)
        return out

    @classmethod
    def _of(cls, rows: SamplingRows, numbers: torch.Tensor, vocab_size: int, eos_token_ids: frozenset[int],
            allowed: dict[int, torch.Tensor] | None = None) -> SamplingMetadata:
        seqs, drafted = rows.seqs, rows.drafted
        params = [seq.request.params for seq in seqs]
        banned = [(row, seq.request.banned_before_min_tokens(eos_token_ids, vocab_size))
                  for row, (seq, p, extra) in enumerate(zip(seqs, params, drafted))
                  if seq.num_output_tokens + len(extra) < p.min_tokens]
        wants = [p.logprobs for p in params if p.logprobs is not None]
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
            allowed_bits=rows.allowed_bits,
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


def _numbers(seqs: list[Sequence], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[4, rows]: temperature, top-k (the vocabulary where off), top-p, min-p; one tensor for them all (a
    tensor from a Python list costs a few microseconds each)."""
    params = [seq.request.params for seq in seqs]
    return torch.tensor([[p.temperature for p in params], [p.top_k if p.top_k > 0 else vocab_size for p in params],
                         [p.top_p for p in params], [p.min_p for p in params]], dtype=torch.float32, device=device)
