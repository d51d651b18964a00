"""Prompt logprobs: each prompt token's logprob given the tokens before it (and its top alternatives),
read off the prefill chunks' logits as they are computed."""

from __future__ import annotations

import torch

from decoding.logits_processing import prompt_log_probs
from decoding.runner import StepLogits
from decoding.step_plan import SchedulerOutput
from decoding.sequence import TokenLogprob


def record_prompt_logprobs(sched: SchedulerOutput, logits: StepLogits, wanted: set[int]) -> None:
    """Append each wanted chunk's prompt logprobs to its request's list, where entry i is token i's
    (entry 0 is None: the first token has no context). A chunk's row j predicts token start + j + 1;
    rows whose entry is already there (a chunk recomputed after preemption) are skipped."""
    for item in sched.scheduled:
        chunk = logits.chunk.get(item.seq.seq_id) if item.seq.seq_id in wanted else None
        if chunk is None:
            continue
        request = item.seq.request
        if not request.prompt_logprobs:
            request.prompt_logprobs.append(None)   # the first prompt token has no context
        first = len(request.prompt_logprobs) - 1   # the first prompt position without an entry
        end = min(item.start + item.num_new_tokens, request.prompt_len - 1)
        if first >= end:
            continue
        params = request.params
        logprobs = prompt_log_probs(chunk[first - item.start :], params)
        targets = torch.tensor(request.prompt_token_ids[first + 1 : end + 1])
        rows = logprobs[: len(targets)]
        chosen = rows.gather(1, targets.unsqueeze(1))
        # vLLM's rank: 1 + the number of tokens more likely than the prompt's own.
        ranks = ((rows > chosen).sum(dim=1) + 1).tolist()
        top = rows.topk(params.prompt_logprobs, dim=-1) if params.prompt_logprobs else None
        for i, value in enumerate(chosen.squeeze(1).tolist()):
            alternatives = dict(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else None
            request.prompt_logprobs.append(TokenLogprob(value, alternatives, ranks[i]))
