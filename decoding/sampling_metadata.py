"""Per-row sampling inputs as tensors, built from the sequences whose logits rows a step processes: what
the logits pipeline (`logits_processing.py`) and the sampler read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.sequence import Sequence


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
