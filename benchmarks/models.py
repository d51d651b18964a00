"""Every architecture users bring, on one random checkpoint shape per architecture (8 layers x 512 wide,
vocabulary 8,192): which backend serves it (native or the transformers fallback), whether it is exact
(greedy tokens equal to HF generate's and teacher-forced logprobs within 1e-4), and batch-1 decode and
16-prompt batch tokens/s against HF generate, same checkpoint, same process, in turn. Then the cost of the
fallback: the same Llama checkpoint at batch 8, native decoder against --model-impl transformers."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.common import cpu_description, interleaved, parse_args, random_prompts, random_tokenizer, report
from decoding import Engine, SamplingParams
from models.loader import SUPPORTED_MODEL_TYPES

SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, vocab_size=8192)
# What an architecture needs beyond SHAPE to be itself: experts, MLA ranks, sliding windows.
OPTIONS = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=384),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=128),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=384, q_lora_rank=256,
                        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, head_dim=32,
                        first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=8),
    "gemma2": dict(sliding_window=128), "gemma3_text": dict(sliding_window=128), "olmo3": dict(sliding_window=128),
    "exaone4": dict(sliding_window=128), "ministral": dict(sliding_window=128),
    "phi": dict(num_key_value_heads=8), "gpt_neox": dict(num_key_value_heads=8), "stablelm": dict(num_key_value_heads=8),
    "gpt2": dict(n_embd=512, n_layer=8, n_head=8, n_positions=1024),
}
ARCHITECTURES = ["llama", "qwen2", "mistral", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3", "phi",
                 "olmo2", "olmo3", "granite", "smollm3", "starcoder2", "gpt_neox", "mixtral", "gpt_oss", "glm4",
                 "cohere", "stablelm", "ministral", "exaone4", "seed_oss", "apertus", "hunyuan_v1_dense",
                 "deepseek_v3", "lfm2", "arcee", "gpt2"]
PROMPT_TOKENS = 32


def _save(arch: str, folder: Path) -> Path:
    tokenizer = random_tokenizer(SHAPE["vocab_size"])
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = AutoConfig.for_model(arch, **(SHAPE | ids | OPTIONS.get(arch, {})))
    if arch == "lfm2":   # LFM2's own layout: short-convolution layers between the attention layers
        config = AutoConfig.for_model(arch, **(SHAPE | ids | {"full_attn_idxs": [2, 5]}))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _exactness(engine: Engine, hf, prompts: list[list[int]], new_tokens: int) -> dict:
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens,
                                                      logprobs=0, logprobs_mode="raw"))
    tokens_equal, worst = True, 0.0
    with torch.inference_mode():
        for prompt, output in zip(prompts, outputs):
            completion = output.outputs[0]
            expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, pad_token_id=0)[0, len(prompt):].tolist()
            tokens_equal &= completion.token_ids == expected
            reference = torch.log_softmax(hf(torch.tensor([prompt + completion.token_ids])).logits[0].float(), -1)
            for i, (token, logprob) in enumerate(zip(completion.token_ids, completion.logprobs)):
                worst = max(worst, abs(logprob.logprob - reference[len(prompt) - 1 + i, token].item()))
    return {"tokens_equal": tokens_equal, "max_logprob_diff": worst, "exact": tokens_equal and worst < 1e-4}


def _speed(engine: Engine, hf, num_prompts: int, new_tokens: int, repeats: int) -> dict:
    prompts = random_prompts(num_prompts, PROMPT_TOKENS, SHAPE["vocab_size"], seed=num_prompts)
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, seed=0)
    batch = torch.tensor(prompts)

    def run_hf():
        with torch.inference_mode():
            hf.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, top_k=0, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, pad_token_id=0)

    ours, baseline = interleaved(lambda: engine.generate(prompts, params), run_hf, repeats)
    total = num_prompts * new_tokens
    return {"ours_tok_s": round(total / ours, 1), "hf_tok_s": round(total / baseline, 1),
            "ratio": round(baseline / ours, 3)}


def measure(arch: str, folder: Path, new_tokens: int, repeats: int) -> dict:
    try:
        engine = Engine(model=str(_save(arch, folder)), show_progress=False, max_num_seqs=16)
    except (ValueError, RuntimeError) as err:
        return {"loads": False, "error": str(err).splitlines()[0][:300]}
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine.generate([[3, 4, 5]], SamplingParams(max_tokens=2))         # warm-up
    result = {"loads": True, "backend": engine.loaded.backend}
    result |= _exactness(engine, hf, random_prompts(4, [7, 19, 33, 12], SHAPE["vocab_size"]), 16)
    result["decode_batch1"] = _speed(engine, hf, 1, new_tokens, repeats)
    result["batch16"] = _speed(engine, hf, 16, new_tokens, repeats)
    return result


def fallback_cost(folder: Path, new_tokens: int, repeats: int) -> dict:
    """Batch 8 on the same Llama checkpoint: the native decoder against the transformers fallback."""
    path = str(_save("llama", folder))
    native = Engine(model=path, show_progress=False)
    fallback = Engine(model=path, show_progress=False, model_impl="transformers")
    prompts = random_prompts(8, PROMPT_TOKENS, SHAPE["vocab_size"], seed=8)
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, seed=0)
    for engine in (native, fallback):
        engine.generate(prompts[:1], SamplingParams(max_tokens=2))
    native_s, fallback_s = interleaved(lambda: native.generate(prompts, params),
                                       lambda: fallback.generate(prompts, params), repeats)
    total = 8 * new_tokens
    return {"native_tok_s": round(total / native_s, 1), "fallback_tok_s": round(total / fallback_s, 1),
            "native_over_fallback": round(fallback_s / native_s, 3)}


def main() -> None:
    args = parse_args(__doc__, lambda parser: parser.add_argument(
        "--archs", default=",".join(ARCHITECTURES), help="comma-separated model types"))
    new_tokens, repeats = (32, 1) if args.quick else (64, 3)
    archs = args.archs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        results = {arch: measure(arch, Path(tmp) / arch, new_tokens, repeats) for arch in archs}
        cost = fallback_cost(Path(tmp) / "llama-fallback", new_tokens, repeats)
    exact = sum(1 for r in results.values() if r.get("exact"))
    report({"benchmark": "models", **cpu_description(), "shape": SHAPE, "new_tokens": new_tokens,
            "prompt_tokens": PROMPT_TOKENS, "coverage": f"{exact}/{len(archs)}", "exact": exact, "tried": len(archs),
            "native_families": list(SUPPORTED_MODEL_TYPES), "fallback_cost_batch8": cost, "architectures": results},
           args.json)


if __name__ == "__main__":
    main()
