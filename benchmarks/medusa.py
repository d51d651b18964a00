"""Medusa decoding: Gorgon's plain decode against Gorgon with the heads, on the embedded target and its
heads, or a catalog model and the heads shipped for it (`--model smollm2`).

Held-out prompts, batch 1 (prompts one after another), 128 new tokens with EOS suppressed: windows of
the default model's held-out corpus, or for a chat model user turns of held-out subjects
(training/chat_prompts.py) in its chat template. Greedy: `identical` (tokens equal to plain greedy), `speedup` over plain decode and
`mean_accepted_length` (tokens gained per target forward: 1 + accepted / verifications). Then the same
at temperature 0.7 against plain sampling, with exact acceptance (the default: the plain sampled tokens,
`identical` checked), typical acceptance (lossy) and lossless acceptance (the rejection rule).
"""

from __future__ import annotations

import json

from benchmarks.common import add_plain_decode_steps, benchmark_model_path, parse_args, report
from benchmarks.speculative import PROMPT_TOKENS, heldout_prompts, timed_in_turn
from decoding import Engine, SamplingParams
from models.catalog import shipped_heads
from models.loader import DEFAULT_MEDUSA_DIR
from training.chat_prompts import chat_prompt_ids, prompts as chat_prompts


def benchmark_prompts(tokenizer, count: int) -> list[list[int]]:
    """Held-out chat turns for a chat model, else held-out corpus windows (see speculative.py)."""
    if tokenizer.chat_template:
        return [chat_prompt_ids(tokenizer, text) for text in chat_prompts("heldout")[:count]]
    return heldout_prompts(tokenizer, count, PROMPT_TOKENS)


def acceptance_modes(plain: Engine, make_engine, prompts, warmup_prompt, new_tokens: int, quick: bool) -> dict:
    """Plain decode against `make_engine(acceptance)` in turn, greedy then at T = 0.7 under each acceptance
    rule; the greedy figures are also the result's headline keys."""
    result = {}
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    sampled = SamplingParams(temperature=0.7, max_tokens=new_tokens, min_tokens=new_tokens, seed=0)
    for name, acceptance, params in (("greedy", "exact", greedy), ("exact_t0.7", "exact", sampled),
                                     ("typical_t0.7", "typical", sampled), ("lossless_t0.7", "lossless", sampled)):
        speculative = make_engine(acceptance)
        for engine in (plain, speculative):                 # a full warm-up generation each
            engine.generate([warmup_prompt], params)
        plain_seconds, plain_tokens, spec_seconds, spec_tokens, stats = timed_in_turn(
            plain, speculative, prompts, params, 1, 1 if quick else 3, reseed=params.temperature > 0)
        total = len(prompts) * new_tokens
        entry = {"plain_tok_s": round(total / plain_seconds, 1), "speculative_tok_s": round(total / spec_seconds, 1),
                 "speedup": round(plain_seconds / spec_seconds, 3), "acceptance_rate": stats["acceptance_rate"],
                 "mean_accepted_length": stats["mean_acceptance_length"]}
        if acceptance == "exact":
            entry["identical"] = spec_tokens == plain_tokens
        result[name] = entry
    return result | {"identical": result["greedy"]["identical"], "speedup": result["greedy"]["speedup"],
                     "mean_accepted_length": result["greedy"]["mean_accepted_length"]}


def main() -> None:
    def extra(parser):
        add_plain_decode_steps(parser)
        parser.add_argument("--heads", default=None, help="Medusa heads folder (default: the embedded heads)")
        parser.add_argument("--medusa-choices", type=json.loads, default=None,
                            help="the candidate tree as a JSON list of paths (default: the engine's)")

    args = parse_args(__doc__, extra)
    target = benchmark_model_path(args.model)
    heads = str(args.heads or shipped_heads(args.model, "medusa") or DEFAULT_MEDUSA_DIR)
    new_tokens = 64 if args.quick else 128
    num_prompts = 2 if args.quick else 8
    common = dict(model=target, dtype=args.dtype, show_progress=False)
    plain = Engine(decode_steps=args.plain_decode_steps, **common)
    *prompts, warmup_prompt = benchmark_prompts(plain.tokenizer, num_prompts + 1)
    result = {"benchmark": "medusa", "model": target, "heads": heads, "dtype": args.dtype, "prompts": len(prompts),
              "plain_decode_steps": args.plain_decode_steps,
              "prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1), "new_tokens": new_tokens}
    make = lambda acceptance: Engine(speculative="medusa", medusa_heads=heads, medusa_acceptance=acceptance,  # noqa: E731
                                     medusa_choices=args.medusa_choices, **common)
    result |= acceptance_modes(plain, make, prompts, warmup_prompt, new_tokens, args.quick)
    report(result, args.json)


if __name__ == "__main__":
    main()
