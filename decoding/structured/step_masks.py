"""One allowed-token bitmask per step, for every row that needs one.

After the forward, the step writes, into one int32 tensor [rows, ceil(vocab / 32)] (token i is bit
i % 32 of word i // 32), the mask of each constrained sequence that draws a token (a beam's too), then
the mask of each verified position of each constrained draft: row j of a chain is the grammar after
its first j draft tokens, row i + 1 of a tree after the path to node i. The sampler, beam search and
the verifier each read their rows of it; no grammar state is replayed to get there (each cursor walks
forward along a draft and back). A chain's k + 1 rows are written in one walk along it, a tree node's
row after a walk along its path.

Along a draft, from the first token the grammar refuses the rows allow everything: the verifier rejects
that token (its probability under the masked target is 0), so those rows are never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from decoding.sequence import Sequence
from decoding.structured.cursors import GrammarCursor

if TYPE_CHECKING:
    from decoding.speculative.proposer import Proposal


@dataclass
class StepMasks:
    bits: torch.Tensor | None = None                              # int32 [rows, words]
    sample_row: dict[int, int] = field(default_factory=dict)      # seq_id -> its row
    draft_rows: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> its verified rows' rows

    @classmethod
    def build(cls, sampling: list[Sequence], drafts: list[tuple[Sequence, Proposal]]) -> StepMasks:
        # (cursor, draft path, whether every position along the path gets a row or only its end)
        writes: list[tuple[GrammarCursor, list[int], bool]] = []
        masks, num_rows = cls(), 0
        for seq in sampling:
            if seq.grammar is not None and seq.seq_id not in masks.sample_row:
                masks.sample_row[seq.seq_id] = num_rows
                writes.append((seq.grammar, [], True))
                num_rows += 1
        for seq, proposal in drafts:
            if seq.grammar is None:
                continue
            if proposal.parents is None:
                writes.append((seq.grammar, proposal.token_ids, True))
            else:
                writes += [(seq.grammar, [], True)] + [(seq.grammar, proposal.path(i), False)
                                                      for i in range(len(proposal.token_ids))]
            count = len(proposal.token_ids) + 1
            masks.draft_rows[seq.seq_id] = list(range(num_rows, num_rows + count))
            num_rows += count
        if writes:
            masks.bits = torch.zeros(num_rows, writes[0][0].num_words, dtype=torch.int32)
            row = 0
            for cursor, path, every_row in writes:
                row = cursor.write_bits_along(masks.bits, row, path, every_row)
            writes[0][0].spread_eos(masks.bits)
        return masks

    def rows_of(self, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor] | None:
        """(positions in `seqs` that are constrained, their bits) for the sampler or beam search."""
        if not self.sample_row:                 # the usual step: nothing constrained draws
            return None
        positions = [i for i, seq in enumerate(seqs) if seq.seq_id in self.sample_row]
        if not positions:
            return None
        return positions, self.bits[[self.sample_row[seqs[i].seq_id] for i in positions]]

    def draft_bits(self, seq: Sequence) -> torch.Tensor | None:
        """int32 [verified rows, words] of a constrained draft's sequence; None when unconstrained."""
        rows = self.draft_rows.get(seq.seq_id)
        return None if rows is None else self.bits[rows]
