"""Beam search, num_beams = 4, 64 new tokens, 8 prompts: Gorgon (all prompts in the same engine steps,
beams sharing blocks) vs HF `generate(num_beams=4)` on the left-padded batch, same model, same run."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import Timer, benchmark_model_path, parse_args, random_prompts, report
from decoding import Engine, SamplingParams


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    num_prompts, num_beams, new_tokens = 8, 4, (32 if args.quick else 64)
    engine = Engine(model=path, dtype=args.dtype, show_progress=False)
    lengths = torch.randint(16, 129, (num_prompts,), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = random_prompts(num_prompts, lengths, engine.loaded.model.vocab_size)
    params = SamplingParams(use_beam_search=True, num_beams=num_beams, temperature=0, max_tokens=new_tokens,
                            min_tokens=new_tokens, num_return_sequences=1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()

    engine.generate(prompts[:1], SamplingParams(use_beam_search=True, num_beams=2, temperature=0, max_tokens=4))
    peak_blocks, steps = 0, 0
    with Timer() as ours:
        for prompt in prompts:
            engine.add_request(prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            peak_blocks = max(peak_blocks, engine.cache_usage().num_used_blocks)

    pad = engine.tokenizer.pad_token_id or 0
    width = max(lengths)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode(), Timer() as baseline:
        hf.generate(input_ids, attention_mask=attention_mask, num_beams=num_beams, do_sample=False,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    blocks_for = engine.kv.blocks_for
    unshared = sum(num_beams * blocks_for(n + new_tokens) for n in lengths)
    report({
        "benchmark": "beam", "model": path, "dtype": args.dtype, "prompts": num_prompts, "num_beams": num_beams,
        "new_tokens": new_tokens, "ours_tok_s": round(num_prompts * num_beams * new_tokens / ours.seconds, 2),
        "baseline_tok_s": round(num_prompts * num_beams * new_tokens / baseline.seconds, 2),
        "ratio": round(baseline.seconds / ours.seconds, 3),
        "peak_kv_blocks": peak_blocks, "kv_blocks_if_beams_copied_their_prefix": unshared,
        "peak_blocks_per_beam": round(peak_blocks / (num_prompts * num_beams), 2),
        "baseline": "transformers generate(num_beams=4) on the left-padded batch, same model, same process",
    }, args.json)


if __name__ == "__main__":
    main()
