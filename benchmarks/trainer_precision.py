"""How far a trainer's recomputed logprobs sit from the server's, by the trainer's precision.

The server samples in float32 and reports each token's logprob (`processed` mode, T = 1). A TRL trainer
recomputes the same logprobs for its loss: in float32, under `bf16=True` (TRL 1.16's GRPOConfig default:
a float32 model run under bfloat16 autocast), or with the model cast to bfloat16. Reported for each: the
largest and the mean absolute difference over every completion token, and the ratio to the float32 gap.
Rollouts: 8 prompts x n = 4, 64 new tokens, on the model named (default: the embedded one).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import benchmark_model_path, cpu_description, parse_args, random_prompts, report
from decoding import Engine, SamplingParams


def recomputed(model, prompt: list[int], completion: list[int], autocast: bool) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    engine = Engine(model=path, show_progress=False)
    prompts = random_prompts(2 if args.quick else 8, 32, engine.loaded.model.vocab_size)
    outputs = engine.generate(prompts, SamplingParams(n=4, max_tokens=64, temperature=1.0, seed=0, logprobs=0,
                                                      logprobs_mode="processed"))
    float32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bfloat16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    gaps: dict[str, list[torch.Tensor]] = {"float32": [], "bf16_autocast": [], "bfloat16_weights": []}
    for prompt, output in zip(prompts, outputs):
        for completion in output.outputs:
            served = torch.tensor([lp.logprob for lp in completion.logprobs])
            for name, model, autocast in (("float32", float32, False), ("bf16_autocast", float32, True),
                                          ("bfloat16_weights", bfloat16, False)):
                gaps[name].append((recomputed(model, prompt, completion.token_ids, autocast) - served).abs())
    result = {name: {"max": float(torch.cat(g).max()), "mean": float(torch.cat(g).mean())} for name, g in gaps.items()}
    for name in result:
        result[name]["mean_vs_float32"] = round(result[name]["mean"] / max(result["float32"]["mean"], 1e-12), 1)
    report({"benchmark": "trainer_precision", "model": path, "cpu": cpu_description(),
            "tokens": int(sum(len(g) for g in gaps["float32"])), **result}, args.json)


if __name__ == "__main__":
    main()
