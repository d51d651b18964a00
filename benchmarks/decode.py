"""Batch-1 greedy decode: Gorgon vs HF `generate` on the same model in the same run.

Also reports `roofline_frac`: tokens/s over (measured memory read bandwidth / weight bytes), the
ceiling for batch-1 decoding, which must stream every weight once per token.
"""

from __future__ import annotations


import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import (Timer, benchmark_model_path, cpu_description, interleaved, parse_args, random_prompts,
                               report, streamed_weight_bytes)
from decoding import Engine, SamplingParams
from models import kernels
from models.cpu_allocator import zeros_on_huge_pages


def measure_read_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second for reading a buffer far larger than the caches (best of `repeats`), on huge pages
    as the packed weights are: the native kernels' streaming sum on their threads where they run
    (kernels.stream_read, which reads as fast as the weight products stream), else torch's sum."""
    buffer = zeros_on_huge_pages((num_bytes // 4,), torch.float32)   # its values do not matter, only reading them
    read = kernels.stream_read if kernels.native_ops_available(buffer.device, buffer.dtype) else torch.sum
    read(buffer)
    best = float("inf")
    for _ in range(repeats):
        with Timer() as t:
            read(buffer)
        best = min(best, t.seconds)
    return num_bytes / best


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    new_tokens, prompt_len = 128, 32
    repeats = 2 if args.quick else 5
    engine = Engine(model=path, dtype=args.dtype, show_progress=False)
    prompt = random_prompts(1, prompt_len, engine.loaded.model.vocab_size)[0]
    # min_tokens = max_tokens: both sides generate exactly 128 tokens (EOS is suppressed, as in HF's
    # min_new_tokens), so the tokens can be compared one for one.
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    input_ids = torch.tensor([prompt])

    def run_ours():
        return engine.generate([prompt], params)[0].outputs[0].token_ids

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=engine.tokenizer.pad_token_id)
        return out[0, prompt_len:].tolist()

    ours_tokens, hf_tokens = run_ours(), run_hf()   # warm-up, and the identity check
    ours_seconds, hf_seconds = interleaved(run_ours, run_hf, repeats)
    ours_tok_s, hf_tok_s = new_tokens / ours_seconds, new_tokens / hf_seconds
    weight_bytes = streamed_weight_bytes(engine.loaded.model)
    bandwidth = measure_read_bandwidth()
    report({
        "benchmark": "decode", "model": path, "dtype": args.dtype, "batch": 1, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "ours_tok_s": round(ours_tok_s, 2), "baseline_tok_s": round(hf_tok_s, 2),
        "ratio": round(ours_tok_s / hf_tok_s, 3), "identical": ours_tokens == hf_tokens,
        "weight_mb": round(weight_bytes / 1e6, 1), "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "roofline_frac": round(ours_tok_s / (bandwidth / weight_bytes), 3),
        "baseline": "transformers generate(do_sample=False), same model, same process",
        **cpu_description(),
    }, args.json)


if __name__ == "__main__":
    main()
