"""Speculative decoding on the embedded target + draft: Gorgon's plain decode, Gorgon with the draft,
and HF `generate(assistant_model=draft)` on the same pair in the same run; then prompt lookup (n-gram)
on input-grounded prompts.

Greedy, 128 new tokens (EOS suppressed so every run emits the same count), held-out prompts of the
default model's corpus. Batch 1 runs the prompts one after another; batch 8 submits them together
(HF's assisted generation takes one sequence at a time, so its batch-8 time is the same sequential run).
Then batch 1 at temperature 0.7 (seeded) under the default exact acceptance: `identical` to plain
sampling, and its speedup. The speculating engine runs as served, its governor deciding per step whether
speculation pays (`batch8.governor` shows what it measured). `speedup` is over Gorgon's own plain decode; `ratio_vs_hf` over HF assisted generation with its
default schedule for the number of assistant tokens, `ratio_vs_hf_same_k` over HF drafting the same k
tokens per round as Gorgon (a constant schedule).
"""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import Timer, add_plain_decode_steps, benchmark_model_path, parse_args, report
from decoding import Engine, SamplingParams
from training.evaluate import heldout_texts
from models.loader import DEFAULT_DRAFT_DIR

PROMPT_TOKENS = 64


def heldout_prompts(tokenizer, num: int, length: int) -> list[list[int]]:
    """Windows from the middle of held-out files: code in progress, not license headers."""
    from pathlib import Path
    texts = heldout_texts(Path.home() / ".cache" / "gorgon" / "corpus")
    prompts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= 4 * length:
            middle = len(ids) // 2
            prompts.append(ids[middle : middle + length])
        if len(prompts) == num:
            break
    return prompts


def grounded_prompts(tokenizer, num: int) -> list[list[int]]:
    """A held-out function followed by its own first lines again: the continuation can copy the input,
    the case prompt lookup is for (edits, extraction, quoting)."""
    prompts = []
    for window in heldout_prompts(tokenizer, num, 4 * PROMPT_TOKENS):
        prompts.append(window + tokenizer("\n\n", add_special_tokens=False).input_ids + window[:PROMPT_TOKENS])
    return prompts


def timed_tokens(engine: Engine, prompts, params, batch: int):
    """(seconds, token lists) for the prompts submitted `batch` at a time."""
    tokens = []
    with Timer() as t:
        for start in range(0, len(prompts), batch):
            tokens += [o.outputs[0].token_ids for o in engine.generate(prompts[start : start + batch], params)]
    return t.seconds, tokens


def timed_in_turn(plain: Engine, other: Engine, prompts, params, batch: int, repeats: int, reseed: bool = False):
    """(plain seconds, plain tokens, other seconds, other tokens, the other's acceptance figures): each
    submission (`batch` prompts) runs on both engines back to back, in alternating order, `repeats` times
    over the prompts; the seconds are the medians of the repeats' totals, the tokens the first repeat's.
    Interleaving by submission, not by whole passes over the prompts, matters on a shared machine whose
    memory bandwidth drifts from minute to minute: EAGLE's lossless speedup at T = 0.7 measured 1.12-1.17
    with whole passes in turn and 1.43 (per-prompt ratios 1.26-1.84) interleaved per prompt, in the same
    hour. With `reseed`, repeat r samples with seed params.seed + r: a lossless engine's accepted length
    depends on the text it happens to draw (on SmolLM2 at T = 0.7, one seed's eight answers gave 1.76
    tokens per verification where four seeds' gave 1.94), so repeats over one seed measure one sample."""
    def run():
        plain_runs, other_runs = [], []
        for repeat in range(repeats):
            plain_run, other_run = [0.0, []], [0.0, []]
            repeat_params = replace(params, seed=params.seed + repeat) if reseed else params
            for n, start in enumerate(range(0, len(prompts), batch)):
                pair = [(plain, plain_run), (other, other_run)]
                for engine, totals in (pair if (n + repeat) % 2 == 0 else pair[::-1]):
                    seconds, tokens = timed_tokens(engine, prompts[start : start + batch], repeat_params, batch)
                    totals[0] += seconds
                    totals[1] += tokens
            plain_runs.append(plain_run)
            other_runs.append(other_run)
        return plain_runs, other_runs

    (plain_runs, other_runs), stats = counters_delta(other, run)
    plain_seconds = statistics.median(seconds for seconds, _ in plain_runs)
    other_seconds = statistics.median(seconds for seconds, _ in other_runs)
    return plain_seconds, plain_runs[0][1], other_seconds, other_runs[0][1], stats


def counters_delta(engine: Engine, run):
    before = (engine.speculation.counters.num_drafts, engine.speculation.counters.num_draft_tokens,
              engine.speculation.counters.num_accepted_tokens)
    result = run()
    c = engine.speculation.counters
    drafts, drafted, accepted = c.num_drafts - before[0], c.num_draft_tokens - before[1], c.num_accepted_tokens - before[2]
    return result, {"verifications": drafts, "acceptance_rate": round(accepted / max(drafted, 1), 3),
                    "mean_acceptance_length": round(1 + accepted / max(drafts, 1), 3)}


def hf_assisted(hf_target, hf_draft, prompts, new_tokens: int, pad: int, constant_k: int | None = None):
    """(seconds, token lists) of HF assisted generation, one prompt at a time: the draft's default
    schedule for the number of assistant tokens, or `constant_k` per round."""
    config = hf_draft.generation_config
    if constant_k is not None:
        config.num_assistant_tokens, config.num_assistant_tokens_schedule = constant_k, "constant"
    tokens = []
    with torch.inference_mode(), Timer() as t:
        for prompt in prompts:
            out = hf_target.generate(torch.tensor([prompt]), assistant_model=hf_draft, do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
            tokens.append(out[0, len(prompt):].tolist())
    return t.seconds, tokens


def sampled_batch1(plain: Engine, spec: Engine, prompts, new_tokens: int, repeats: int) -> dict:
    """Seeded T = 0.7 at batch 1 under the engine's acceptance rule: identical to plain sampling?, speedup."""
    sampled = SamplingParams(temperature=0.7, max_tokens=new_tokens, min_tokens=new_tokens, seed=0)
    plain_seconds, plain_tokens, spec_seconds, spec_tokens, stats = timed_in_turn(plain, spec, prompts, sampled, 1,
                                                                                   repeats)
    return {"identical": spec_tokens == plain_tokens, "speedup": round(plain_seconds / spec_seconds, 3), **stats}


def hf_baseline(target: str, draft: str, dtype: torch.dtype, warmup_prompt: list[int], prompts, new_tokens: int,
                pad: int, k: int) -> tuple[float, float, list[list[int]]]:
    """HF assisted generation with the same draft after a warm-up: (seconds with its own schedule of draft
    lengths, seconds with a constant k, the tokens)."""
    hf_target = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).eval()
    with torch.inference_mode():                            # HF's warm-up, as for the engines
        hf_target.generate(torch.tensor([warmup_prompt]), assistant_model=hf_draft, do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    seconds, tokens = hf_assisted(hf_target, hf_draft, prompts, new_tokens, pad)
    constant_k_seconds, _ = hf_assisted(hf_target, hf_draft, prompts, new_tokens, pad, constant_k=k)
    return seconds, constant_k_seconds, tokens


def draft_batch(plain: Engine, spec: Engine, prompts, params: SamplingParams, batch: int, repeats: int,
                hf_seconds: float, hf_k_seconds: float) -> dict:
    """Greedy draft-model speculation at one batch size against plain decoding and HF's assisted generation."""
    plain_seconds, plain_tokens, spec_seconds, spec_tokens, stats = timed_in_turn(
        plain, spec, prompts, params, batch, repeats)
    total = len(prompts) * params.max_tokens
    return {"identical": spec_tokens == plain_tokens,
            "plain_tok_s": round(total / plain_seconds, 1), "spec_tok_s": round(total / spec_seconds, 1),
            "hf_assisted_tok_s": round(total / hf_seconds, 1), "hf_assisted_same_k_tok_s": round(total / hf_k_seconds, 1),
            "speedup": round(plain_seconds / spec_seconds, 3), "ratio_vs_hf": round(hf_seconds / spec_seconds, 3),
            "ratio_vs_hf_same_k": round(hf_k_seconds / spec_seconds, 3), **stats}


def main() -> None:
    def extra(parser):
        add_plain_decode_steps(parser)
        parser.add_argument("--draft", default=None, help="draft model folder (default: the embedded draft)")
        parser.add_argument("--k", type=int, default=4, help="draft tokens per verification")
        parser.add_argument("--disable-by-batch-size", type=int, default=None,
                            help="the draft engine's speculative_disable_by_batch_size (default: always speculate)")

    args = parse_args(__doc__, extra)
    target = benchmark_model_path(args.model)
    draft = args.draft or str(DEFAULT_DRAFT_DIR)
    new_tokens = 64 if args.quick else 128
    num_prompts = 2 if args.quick else 8
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    common = dict(dtype=args.dtype, show_progress=False)
    plain = Engine(model=target, decode_steps=args.plain_decode_steps, **common)
    spec = Engine(model=target, speculative="draft", draft_model=draft, num_speculative_tokens=args.k,
                  speculative_disable_by_batch_size=args.disable_by_batch_size, **common)
    ngram = Engine(model=target, speculative="ngram", num_speculative_tokens=args.k, **common)
    # One more prompt than is timed: a full warm-up generation, so one-time costs (oneDNN builds a kernel
    # the first time it meets a matrix shape, the allocator grows) stay out of every timed run.
    *prompts, warmup_prompt = heldout_prompts(plain.tokenizer, num_prompts + 1, PROMPT_TOKENS)
    for engine in (plain, spec, ngram):
        engine.generate([warmup_prompt], params)
    result = {"benchmark": "speculative", "model": target, "draft": draft, "dtype": args.dtype,
              "plain_decode_steps": args.plain_decode_steps,
              "num_speculative_tokens": args.k, "speculative_disable_by_batch_size": args.disable_by_batch_size,
              "prompts": len(prompts), "prompt_tokens": PROMPT_TOKENS,
              "new_tokens": new_tokens}
    hf_seconds, hf_k_seconds, hf_tokens = hf_baseline(target, draft, getattr(torch, args.dtype), warmup_prompt,
                                                      prompts, new_tokens, plain.tokenizer.pad_token_id, args.k)
    repeats = 1 if args.quick else 3
    for batch in (1, 8):
        result[f"batch{batch}"] = draft_batch(plain, spec, prompts, params, batch, repeats, hf_seconds, hf_k_seconds)
    result["batch8"]["governor"] = spec.speculation.governor.summary() if spec.speculation.governor else None
    result["exact_t0.7_batch1"] = sampled_batch1(plain, spec, prompts, new_tokens, repeats)
    result["hf_assisted_identical"] = hf_tokens == [out.outputs[0].token_ids for out in plain.generate(prompts, params)]
    grounded = grounded_prompts(plain.tokenizer, num_prompts)
    plain_seconds, plain_tokens, ngram_seconds, ngram_tokens, stats = timed_in_turn(
        plain, ngram, grounded, params, 1, repeats)
    result["ngram_grounded_batch1"] = {"identical": ngram_tokens == plain_tokens,
                                       "speedup": round(plain_seconds / ngram_seconds, 3), **stats}
    result |= {"identical": result["batch1"]["identical"], "speedup": result["batch1"]["speedup"],
               "ratio_vs_hf": result["batch1"]["ratio_vs_hf"],
               "ratio_vs_hf_same_k": result["batch1"]["ratio_vs_hf_same_k"], "acceptance_rate": result["batch1"]["acceptance_rate"],
               "mean_acceptance_length": result["batch1"]["mean_acceptance_length"]}
    report(result, args.json)


if __name__ == "__main__":
    main()
