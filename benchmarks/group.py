"""A group of n = 16 samples of one 128-token prompt: Gorgon (prompt prefilled once, blocks shared)
vs HF `generate(num_return_sequences=16)` on the same model in the same run."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import benchmark_model_path, interleaved, parse_args, random_prompts, report
from decoding import Engine, SamplingParams


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    n, prompt_len, new_tokens = 16, 128, (64 if args.quick else 128)
    engine = Engine(model=path, dtype=args.dtype, show_progress=False)
    prompt = random_prompts(1, prompt_len, engine.loaded.model.vocab_size)[0]
    params = SamplingParams(n=n, temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, seed=0)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()

    engine.generate([prompt], SamplingParams(n=n, max_tokens=4, seed=1))   # warm-up
    prefill_before = engine.counters.num_prompt_tokens_computed
    peak_blocks = 0
    engine.add_request(prompt, params)    # one stepped run for the cache figures
    while engine.has_unfinished_requests():
        engine.step()
        peak_blocks = max(peak_blocks, engine.cache_usage().num_used_blocks)
    prefilled = engine.counters.num_prompt_tokens_computed - prefill_before

    def run_hf():
        with torch.inference_mode():
            hf.generate(torch.tensor([prompt]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        pad_token_id=engine.tokenizer.pad_token_id)

    ours, baseline = interleaved(lambda: engine.generate([prompt], params), run_hf, 1 if args.quick else 3)
    total = n * new_tokens
    unshared_blocks = n * engine.kv.blocks_for(prompt_len + new_tokens)
    report({
        "benchmark": "group", "model": path, "dtype": args.dtype, "n": n, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "ours_tok_s": round(total / ours, 2), "baseline_tok_s": round(total / baseline, 2),
        "ratio": round(baseline / ours, 3),
        "prompt_tokens_prefilled": prefilled, "peak_kv_blocks": peak_blocks,
        "kv_blocks_without_sharing": unshared_blocks,
        "baseline": "transformers generate(do_sample=True, num_return_sequences=16), same model, same process",
    }, args.json)


if __name__ == "__main__":
    main()
