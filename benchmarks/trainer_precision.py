"""How far a trainer's recomputed logprobs sit from the server's rollout logprobs, by the trainer's forward.

The server samples in float32 and reports each token's raw logprob (`logprobs_mode="raw"`, T = 1). Rollouts:
16 prompts of mixed lengths (8 to 120 tokens) x n = 4, each prompt with its own max_tokens (16 to 96), all
submitted at once to an engine whose step budget (64 tokens) splits prompts into chunks beside other
requests' decodes; then the same prompts again (prefix-cache hits). A trainer then recomputes every
completion token's logprob, in batches of 16 sequences laid out as TRL lays them out (prompts left-padded,
completions right-padded), with:
- `matched`: decoding.matched_forward.MatchedPolicy (the engine's own model and kernels; bar: 0.0),
- `float32`: transformers' model in float32,
- `bf16_autocast`: the same under bfloat16 autocast (TRL 1.16's GRPOConfig default, bf16=True),
- `bfloat16_weights`: the model cast to bfloat16.
Reported for each: the largest and the mean absolute difference over every completion token.
"""

from __future__ import annotations

import torch

from benchmarks.common import benchmark_model_path, cpu_description, parse_args, random_prompts, report
from decoding import Engine, SamplingParams
from decoding.matched_forward import MatchedPolicy

BATCH = 16


def trl_layout(pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids and attention_mask [B, P + C] with prompts left-padded to P and completions right-padded
    to C; -> (ids, mask, P)."""
    width_prompt = max(len(p) for p, _ in pairs)
    width_completion = max(len(c) for _, c in pairs)
    ids = torch.zeros(len(pairs), width_prompt + width_completion, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(pairs):
        start = width_prompt - len(prompt)
        ids[row, start : width_prompt + len(completion)] = torch.tensor(prompt + completion)
        mask[row, start : width_prompt + len(completion)] = 1
    return ids, mask, width_prompt


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    engine = Engine(model=path, show_progress=False, quantization="none", max_num_batched_tokens=64,
                    max_num_seqs=64)
    vocab = engine.loaded.model.vocab_size
    count = 4 if args.quick else 16
    prompts = [prompt[: 8 + (i * 37) % 113] for i, prompt in enumerate(random_prompts(count, 120, vocab, seed=0))]
    params = [SamplingParams(n=4, max_tokens=16 + (i * 29) % 81, temperature=1.0, seed=i, logprobs=0,
                             logprobs_mode="raw") for i in range(count)]
    outputs = engine.generate(prompts, params) + engine.generate(prompts, params)   # the second: prefix hits
    pairs, served = [], []
    for prompt, output in zip(prompts + prompts, outputs):
        for completion in output.outputs:
            pairs.append((prompt, completion.token_ids))
            served.append(torch.tensor([lp.logprob for lp in completion.logprobs]))

    policy = MatchedPolicy.from_pretrained(path)
    bfloat16 = MatchedPolicy.from_pretrained(path)
    bfloat16.hf.to(torch.bfloat16)
    forwards = {
        "matched": lambda ids, mask: policy(ids, mask),
        "float32": lambda ids, mask: policy.hf_logprobs(ids, mask),
        "bf16_autocast": lambda ids, mask: _autocast(policy.hf_logprobs, ids, mask),
        "bfloat16_weights": lambda ids, mask: bfloat16.hf_logprobs(ids, mask),
    }
    gaps: dict[str, list[torch.Tensor]] = {name: [] for name in forwards}
    for start in range(0, len(pairs), BATCH):
        batch = pairs[start : start + BATCH]
        ids, mask, width_prompt = trl_layout(batch)
        for name, forward in forwards.items():
            with torch.no_grad():
                logprobs = forward(ids, mask).float()
            for row, (_, completion) in enumerate(batch):
                recomputed = logprobs[row, width_prompt : width_prompt + len(completion)]
                gaps[name].append((recomputed - served[start + row]).abs())
    result = {name: {"max": float(torch.cat(g).max()), "mean": float(torch.cat(g).mean())} for name, g in gaps.items()}
    report({"benchmark": "trainer_precision", "model": path, "cpu": cpu_description(), "sequences": len(pairs),
            "tokens": int(sum(len(g) for g in gaps["matched"])), "matched_max_abs_diff": result["matched"]["max"],
            **result}, args.json)


def _autocast(forward, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return forward(ids, mask)


if __name__ == "__main__":
    main()
