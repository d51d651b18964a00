"""32 distinct prompts of 16-2,048 tokens (to the model's context), sampled: Gorgon's continuous batching vs HF `generate` on the
left-padded batch, same model, same run."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import benchmark_model_path, interleaved, parse_args, random_prompts, report, user_prompt_lengths
from decoding import Engine, SamplingParams


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    num_prompts, new_tokens = 32, (64 if args.quick else 128)
    engine = Engine(model=path, dtype=args.dtype, show_progress=False)
    lengths = user_prompt_lengths(num_prompts, engine.max_model_len, new_tokens)
    prompts = random_prompts(num_prompts, lengths, engine.loaded.model.vocab_size)
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, seed=0)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()

    engine.generate(prompts[:2], SamplingParams(max_tokens=4))   # warm-up
    pad = engine.tokenizer.pad_token_id
    width = max(lengths)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run_hf():
        with torch.inference_mode():
            hf.generate(input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0,
                        top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)

    ours, baseline = interleaved(lambda: engine.generate(prompts, params), run_hf, 1 if args.quick else 3)
    total = num_prompts * new_tokens
    report({
        "benchmark": "batch", "model": path, "dtype": args.dtype, "num_prompts": num_prompts, "prompt_tokens_min": min(lengths),
        "prompt_tokens_max": max(lengths), "new_tokens": new_tokens,
        "ours_tok_s": round(total / ours, 2), "baseline_tok_s": round(total / baseline, 2),
        "ratio": round(baseline / ours, 3),
        "baseline": "transformers generate(do_sample=True) on the left-padded batch, same model, same process",
    }, args.json)


if __name__ == "__main__":
    main()
