"""The verifier: which draft tokens the target keeps, and the token it adds.

For each sequence the target scored its last token followed by k draft tokens, giving k + 1 rows of
logits. Row j is processed exactly as the sampler would process it had the first j draft tokens been
sampled for real (penalties see them, min_tokens counts them), so a verified position and a plainly
sampled one follow the same distribution p_j.

- Greedy rows keep draft token j while it equals argmax p_j; the first mismatch is replaced by the
  target's argmax, and when all k are kept the target's argmax at row k is a bonus token. The output is
  token-identical to plain greedy decoding.
- Sampled rows under the exact rule (the default): row j draws its token as the plain sampler would at
  that position (the same pipeline and the uniform of the request's seed and position; a row below a
  draft path counts that path, so it draws for the position the path leads to), and the walk keeps the
  draft tokens that equal those draws, as the greedy walk does with argmaxes. Every emitted token is the
  target's own draw (over trees too), and the output is the plainly sampled one token for token wherever
  the verified rows' logits equal plain decoding's bit for bit (on a large vocabulary, last-bit
  differences between a tree row and a decode row move the inverse CDF now and then). Proposers
  that draw with the same uniforms (draft models, Medusa's chains) agree with the target wherever the
  two inverse CDFs send that uniform to the same token.
- Sampled rows under the lossless rule use speculative sampling (Leviathan et al. 2023; Chen et al. 2023): keep draft
  token x ~ q_j with probability min(1, p_j(x) / q_j(x)); on the first rejection draw from the residual
  norm(max(0, p_j - q_j)) and stop; when all are kept draw a bonus token from p_k. Each emitted token is
  then distributed exactly as under p. A drawn tree (EAGLE's under this rule) gives a node several
  children drawn from its q without replacement, each with the distribution it was drawn from (q without
  the earlier ones, renormalised): they are tried in drawing order, each rejection replacing p by that
  residual, and only when all are rejected is the token drawn from what is left (recursive rejection
  sampling, Jeon et al. 2024; over a chain, the rule above). Deterministic proposals (prompt lookup's
  chains, Medusa's top-k trees: candidates chosen before the target's draws, no q) are walked node by
  node as EAGLE verifies its trees at T > 0: keep child c with probability p(c) / (the mass not yet
  rejected), else zero p(c) and try the next sibling; when every child is rejected draw from what is
  left of p, and stop. The emitted token is then distributed exactly as p, and a node is kept with the
  target's whole mass on its candidates, not only on its best one. Over a chain this is the rule above
  with a one-hot q, the same uniforms deciding the same way.

Returned logprobs are the target's at each emitted position, in the request's logprobs_mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from decoding.logits_processing import ProcessedLogits, process_logits
from decoding.sampler import Sampler
from decoding.sampling_metadata import SamplingMetadata, SamplingRows
from decoding.sequence import Sequence, TokenLogprob
from decoding.speculative.proposer import AcceptanceRule, Proposal


@dataclass
class Verdict:
    token_ids: list[int]                     # the kept draft tokens, then the target's own token
    logprobs: list[TokenLogprob | None]      # one per emitted token
    num_accepted: int                        # draft tokens kept
    # Verified rows of the kept draft tokens (row 0 is the last known token): a chain keeps 1..k, a
    # tree any root-to-node path, whose cache slots the engine then compacts.
    rows: list[int] = field(default_factory=list)

    @property
    def last_row(self) -> int:
        """The row whose logits produced the final emitted token."""
        return self.rows[-1] if self.rows else 0


def rows_to_verify(seqs: list[Sequence], proposals: list[Proposal],
                   allowed: list[torch.Tensor | None]) -> SamplingRows | None:
    """The rows the logits pipeline processes for verification: row j + 1 of a sequence as if the
    draft's path down to token j had been sampled, with its grammar bits (allowed[i], from StepMasks,
    for a constrained sequence). None where every chain is plainly greedy: `verify` then takes the
    argmax without the pipeline."""
    if all(_plainly_greedy(seq, bits) for seq, bits in zip(seqs, allowed)):
        return None
    row_seqs, drafted, constrained, bits = [], [], [], []
    for seq, proposal, seq_bits in zip(seqs, proposals, allowed):
        if seq_bits is not None:
            constrained += range(len(row_seqs), len(row_seqs) + len(seq_bits))
            bits.append(seq_bits)
        row_seqs += [seq] * (len(proposal.token_ids) + 1)
        drafted += [[]] + [proposal.path(j) for j in range(len(proposal.token_ids))]
    return SamplingRows(row_seqs, drafted, (constrained, torch.cat(bits)) if bits else None)


def verify(sampler: Sampler, seqs: list[Sequence], proposals: list[Proposal], logits: list[torch.Tensor],
           batch: SamplingMetadata | None, vocab_size: int, eos_token_ids: frozenset[int], device: torch.device,
           rule: AcceptanceRule = AcceptanceRule()) -> list[Verdict]:
    """logits[i] [len(proposals[i].token_ids) + 1, vocab] are the target's rows for sequence i: row 0
    scored its last known token, row j + 1 its draft token j; `batch` is the metadata of
    `rows_to_verify` (None: every chain plainly greedy). Sampled requests' drafts are kept under `rule`."""
    if batch is None:
        return _verify_plainly_greedy(seqs, proposals, logits, vocab_size, eos_token_ids)
    rows_logits = logits[0] if len(logits) == 1 else torch.cat(logits)
    processed = process_logits(rows_logits, batch, distribution=not batch.all_greedy or batch.num_top_logprobs >= 0)
    # (an argmax over every row of the whole vocabulary costs a quarter of a sampled walk: only for greedy rows)
    any_greedy = any(seq.request.params.is_greedy for seq in seqs)
    greedy_tokens = processed.penalised.argmax(dim=-1).tolist() if any_greedy else None
    probs = processed.logprobs.exp() if processed.logprobs is not None else None
    # Exact acceptance: every row's token as the plain sampler draws it at that row's position.
    drawn = sampler(rows_logits, batch).token_ids if rule.exact and not batch.all_greedy else None

    verdicts, base = [], 0
    for seq, proposal in zip(seqs, proposals):
        num_rows = len(proposal.token_ids) + 1
        if seq.request.params.is_greedy:
            rows, final = _walk_greedy(proposal, greedy_tokens[base : base + num_rows])
        elif rule.typical is not None:
            rows, final = _walk_typical(proposal, probs[base : base + num_rows], seq.generator, rule.typical)
        elif rule.exact:
            rows, final = _walk_greedy(proposal, drawn[base : base + num_rows])
        elif proposal.probs is None:
            rows, final = _walk_lossless(proposal, probs[base : base + num_rows], _uniforms(seq.generator, num_rows))
        else:
            rows, final = _walk_drawn(proposal, probs[base : base + num_rows], _uniforms(seq.generator, num_rows))
        tokens = [proposal.token_ids[r - 1] for r in rows] + [final]
        verdicts.append(Verdict(tokens, [], len(rows), rows))
        base += num_rows
    _attach_logprobs(sampler, processed, batch, proposals, verdicts, device)
    return verdicts


def _plainly_greedy(seq: Sequence, allowed: torch.Tensor | None) -> bool:
    """A greedy row whose only processing is min_tokens' ban, and which wants no logprobs."""
    params = seq.request.params
    return params.is_greedy and not params.has_penalties and params.logprobs is None and allowed is None


def _verify_plainly_greedy(seqs: list[Sequence], proposals: list[Proposal], logits: list[torch.Tensor],
                           vocab_size: int, eos_token_ids: frozenset[int]) -> list[Verdict]:
    """The common case without the sampling pipeline: the target's argmax per row, with stop tokens banned
    in the rows below min_tokens as Sampler.process bans them, so the same tokens as the pipeline's. A
    ban changes a row's argmax only where the argmax is a banned token (the first maximum stays first
    when later or lesser entries drop to -inf), so only such rows are masked and taken again."""
    rows = logits[0] if len(logits) == 1 else torch.cat(logits)
    greedy_tokens = rows.argmax(dim=-1).tolist()
    verdicts, base = [], 0
    for seq, proposal in zip(seqs, proposals):
        num_rows = len(proposal.token_ids) + 1
        below = seq.request.params.min_tokens - seq.num_output_tokens
        if below > 0:
            stops = seq.request.banned_before_min_tokens(eos_token_ids, vocab_size)
            # Row 0 counts no draft token, row j + 1 the path down to draft token j.
            drafted = [0] + [j + 1 if proposal.parents is None else proposal.depth(j) for j in range(num_rows - 1)]
            for row, count in enumerate(drafted):
                if count < below and greedy_tokens[base + row] in stops:
                    masked = rows[base + row].clone()
                    masked[stops] = float("-inf")
                    greedy_tokens[base + row] = int(masked.argmax())
        kept, final = _walk_greedy(proposal, greedy_tokens[base : base + num_rows])
        tokens = [proposal.token_ids[r - 1] for r in kept] + [final]
        verdicts.append(Verdict(tokens, [None] * len(tokens), len(kept), kept))
        base += num_rows
    return verdicts


def _children(proposal: Proposal) -> dict[int, list[int]]:
    """Row -> the rows of its draft children, in proposal order."""
    children: dict[int, list[int]] = {}
    for index, parent_row in enumerate(proposal.parent_rows()):
        children.setdefault(parent_row, []).append(index + 1)
    return children


def _walk_greedy(proposal: Proposal, target: list[int]) -> tuple[list[int], int]:
    """Follow the child that equals the target's token of its row (argmax, or the exact rule's draw), as
    deep as the proposal goes."""
    children, rows, row = _children(proposal), [], 0
    while True:
        match = next((c for c in children.get(row, ()) if proposal.token_ids[c - 1] == target[row]), None)
        if match is None:
            return rows, target[row]
        rows.append(match)
        row = match


def _walk_typical(proposal: Proposal, p: torch.Tensor, generator: torch.Generator,
                  typical: tuple[float, float]) -> tuple[list[int], int]:
    """Medusa's typical acceptance (lossy): keep a child whose probability under the target exceeds
    min(epsilon, delta * exp(-entropy)); the final token is sampled from the target at the last kept node."""
    epsilon, delta = typical
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=-1)
    thresholds = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy)).tolist()
    children, rows, row = _children(proposal), [], 0
    uniform = float(torch.rand(1, generator=generator, dtype=torch.float64))
    while True:
        match = next((c for c in children.get(row, ()) if float(p[row, proposal.token_ids[c - 1]]) > thresholds[row]),
                     None)
        if match is None:
            return rows, inverse_cdf_draw(p[row], uniform)
        rows.append(match)
        row = match


def _uniforms(generator: torch.Generator, count: int) -> list[float]:
    """One uniform per verified row, drawn whatever the walk reaches, so a seeded request consumes its
    generator the same way every run: uniforms[c - 1] decides draft row c, the last one the final draw."""
    return torch.rand(count, generator=generator, dtype=torch.float64).tolist()


def _walk_lossless(proposal: Proposal, p: torch.Tensor, uniforms: list[float]) -> tuple[list[int], int]:
    """The lossless rule over deterministic candidates, a chain or a tree. p [k + 1, vocab]: the target's
    sampling distribution at each verified row; uniforms as `_uniforms` lays them out."""
    children, rows, row = _children(proposal), [], 0
    while True:
        remaining = float(p[row].sum(dtype=torch.float64))
        rejected: list[int] = []
        match = None
        for child in children.get(row, ()):
            token = proposal.token_ids[child - 1]
            if token in rejected:
                continue
            mass = float(p[row, token])
            if uniforms[child - 1] * remaining < mass:
                match = child
                break
            rejected.append(token)
            remaining -= mass
        if match is None:
            return rows, inverse_cdf_draw(p[row], uniforms[-1], rejected)
        rows.append(match)
        row = match


def inverse_cdf_draw(p: torch.Tensor, uniform: float, excluded: list[int] | None = None) -> int:
    """Inverse-CDF draw from p with `excluded` tokens zeroed (all of p where that leaves nothing, which
    only rounding can cause: the excluded mass was 1 yet each of them was rejected)."""
    residual = p.double()
    if excluded:
        residual = residual.clone()
        residual[excluded] = 0.0
        if float(residual.sum()) <= 0.0:
            residual = p.double()
    cdf = residual.cumsum(dim=0)
    drawn = int(torch.searchsorted(cdf, torch.tensor([uniform * float(cdf[-1])], dtype=torch.float64), right=True))
    return min(drawn, p.shape[-1] - 1)


def _walk_drawn(proposal: Proposal, p: torch.Tensor, uniforms: list[float]) -> tuple[list[int], int]:
    """Recursive rejection sampling over candidates drawn from the proposal's distributions, a chain or a
    tree. p [k + 1, vocab]: the target's sampling distribution at each verified row; proposal.probs[c - 1]
    the distribution draft row c was drawn from; uniforms as `_uniforms` lays them out.

    Why each emitted token follows p: at a node whose (remaining) target distribution is r, a child x drawn
    from q is kept with probability min(1, r(x) / q(x)), which emits x with probability min(r(x), q(x));
    a rejection happens with probability sum(max(0, r - q)) and passes on norm(max(0, r - q)), so if what
    follows a rejection emits that residual, the node emits min(r, q) + max(0, r - q) = r. The next
    sibling is drawn, given everything before it, from its own stated q, so the same holds for it, down
    to the last one, after which the residual is drawn from directly."""
    children, rows, row = _children(proposal), [], 0
    while True:
        # The target's row as it is until a rejection: a kept first child (the common case) then costs
        # one sum over the vocabulary, not copies of p and q in float64 (the test reads two entries).
        residual = p[row]
        total = float(residual.sum(dtype=torch.float64))
        match = None
        for child in children.get(row, ()):
            token = proposal.token_ids[child - 1]
            q = proposal.probs[child - 1]
            if uniforms[child - 1] * float(q[token]) * total < float(residual[token]):
                match = child
                break
            left = (residual.double() / total - q.double()).clamp_(min=0.0)
            left_total = float(left.sum())
            if left_total > 0.0:          # else r == q up to rounding: a rejection that could not happen
                residual, total = left, left_total
        if match is None:
            return rows, inverse_cdf_draw(residual, uniforms[-1])
        rows.append(match)
        row = match


def _attach_logprobs(sampler: Sampler, processed: ProcessedLogits, batch: SamplingMetadata,
                     proposals: list[Proposal], verdicts: list[Verdict], device) -> None:
    """Each emitted token's logprob comes from the row that scored it: row 0 for the first, then the row
    of each kept draft token for the next."""
    if batch.num_top_logprobs < 0:
        for verdict in verdicts:
            verdict.logprobs = [None] * len(verdict.token_ids)
        return
    chosen, scoring = [], []
    base = 0
    for proposal, verdict in zip(proposals, verdicts):
        num_rows = len(proposal.token_ids) + 1
        tokens = [0] * num_rows                  # rows that scored nothing emitted get a placeholder
        rows = [0] + verdict.rows
        for row, token in zip(rows, verdict.token_ids):
            tokens[row] = token
        chosen += tokens
        scoring.append([base + row for row in rows])
        base += num_rows
    all_logprobs = sampler.logprobs(processed, torch.tensor(chosen, dtype=torch.long, device=device), batch)
    for verdict, rows in zip(verdicts, scoring):
        verdict.logprobs = [all_logprobs[row] for row in rows]
