"""Group rollouts for RL: 8 prompts x G = 8 samples x 128 new tokens through `/v1/rollouts` of a
`gorgon serve` process, vs HF `generate(num_return_sequences=8)` per prompt in this process."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import Timer, benchmark_model_path, gorgon_server, parse_args, random_prompts, report
from client import GorgonClient


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    num_prompts, group, new_tokens = 8, 8, (32 if args.quick else 128)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    lengths = torch.randint(32, 129, (num_prompts,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = random_prompts(num_prompts, lengths, hf.config.vocab_size)
    sampling = dict(n=group, max_tokens=new_tokens, min_tokens=new_tokens, temperature=1.0, seed=0)
    with gorgon_server(path, "--dtype", args.dtype) as url:
        client = GorgonClient(url)
        client.rollouts(prompts[:1], n=2, max_tokens=4)                       # warm-up
        with Timer() as ours:
            out = client.rollouts(prompts, **sampling)
    generated = sum(len(ids) for ids in out["completion_ids"])
    with torch.inference_mode(), Timer() as baseline:
        for prompt in prompts:
            hf.generate(torch.tensor([prompt]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        num_return_sequences=group, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        pad_token_id=hf.config.pad_token_id or 0)
    report({
        "benchmark": "rollout", "model": path, "dtype": args.dtype, "prompts": num_prompts, "group_size": group,
        "new_tokens": new_tokens, "ours_tok_s": round(generated / ours.seconds, 2),
        "baseline_tok_s": round(num_prompts * group * new_tokens / baseline.seconds, 2),
        "ratio": round(baseline.seconds / ours.seconds * generated / (num_prompts * group * new_tokens), 3),
        "baseline": "transformers generate(num_return_sequences=8) per prompt, same model, same machine",
    }, args.json)


if __name__ == "__main__":
    main()
