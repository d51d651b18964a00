"""EAGLE decoding: Gorgon's plain decode against Gorgon with an EAGLE head, on a catalog model and the head
shipped for it (`--model smollm2`, the default) or any model with `--head`.

The same workload and keys as benchmarks/medusa.py: held-out chat prompts in the model's chat template,
batch 1, 128 new tokens with EOS suppressed; greedy `identical`, `speedup` and `mean_accepted_length`, then
T = 0.7 under the exact, typical and lossless acceptance rules.
"""

from __future__ import annotations

import json

from benchmarks.common import add_plain_decode_steps, benchmark_model_path, parse_args, report
from benchmarks.medusa import acceptance_modes, benchmark_prompts
from benchmarks.speculative import timed_in_turn
from decoding import Engine, SamplingParams
from models.catalog import shipped_heads
from models.eagle import EagleTree


def main() -> None:
    def extra(parser):
        add_plain_decode_steps(parser)
        parser.add_argument("--head", default=None, help="EAGLE head folder (default: the one shipped for --model)")
        parser.add_argument("--eagle-tree", type=EagleTree.parse, default=None,
                            help="NODES,DEPTH,TOP_K[,WIDTH] of the candidate tree (default: the head's own)")
        parser.add_argument("--sweep", type=EagleTree.parse, nargs="+", default=None,
                            help="greedy only, for each of these trees: how the tree is tuned (see the head's card)")
        parser.add_argument("--eagle-drawn", type=EagleTree.parse_drawn, default=None,
                            help="N1,N2,... candidates per level of the drawn tree, lossless rule (default: the head's)")
        parser.add_argument("--sweep-drawn", type=EagleTree.parse_drawn, nargs="+", default=None,
                            help="lossless at T = 0.7 only, for each of these drawn trees: how it is tuned")

    args = parse_args(__doc__, extra)
    args.model = args.model or "smollm2"
    head = args.head or shipped_heads(args.model, "eagle")
    if head is None:
        raise SystemExit(f"no EAGLE head is shipped for {args.model}: pass --head")
    target = benchmark_model_path(args.model)
    new_tokens = 64 if args.quick else 128
    num_prompts = 2 if args.quick else 8
    common = dict(model=target, dtype=args.dtype, show_progress=False)
    plain = Engine(decode_steps=args.plain_decode_steps, **common)
    *prompts, warmup_prompt = benchmark_prompts(plain.tokenizer, num_prompts + 1)
    result = {"benchmark": "eagle", "model": target, "head": str(head), "dtype": args.dtype, "prompts": len(prompts),
              "plain_decode_steps": args.plain_decode_steps,
              "prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1), "new_tokens": new_tokens,
              "eagle_tree": args.eagle_tree, "eagle_drawn": args.eagle_drawn}
    if args.sweep or args.sweep_drawn:
        if args.sweep:
            result["sweep"] = sweep(plain, str(head), args, prompts, warmup_prompt, new_tokens, common)
        if args.sweep_drawn:
            result["sweep_drawn"] = sweep_drawn(plain, str(head), args, prompts, warmup_prompt, new_tokens, common)
        report(result, args.json)
        return
    make = lambda acceptance: Engine(speculative="eagle", eagle_head=str(head), speculative_acceptance=acceptance,  # noqa: E731
                                     eagle_tree=args.eagle_tree, eagle_drawn=args.eagle_drawn, **common)
    result |= acceptance_modes(plain, make, prompts, warmup_prompt, new_tokens, args.quick)
    report(result, args.json)


def sweep(plain: Engine, head: str, args, prompts, warmup_prompt, new_tokens: int, common: dict) -> list:
    """Greedy speedup and accepted length of each tree, each against plain decode in turn."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    return _each_against_plain(plain, "tree", args.sweep, lambda tree: dict(eagle_tree=tree), params, args, prompts,
                               warmup_prompt, head, common)


def sweep_drawn(plain: Engine, head: str, args, prompts, warmup_prompt, new_tokens: int, common: dict) -> list:
    """Lossless speedup and accepted length at T = 0.7 of each drawn tree, each against plain decode in turn,
    each repeat with its own seed."""
    params = SamplingParams(temperature=0.7, max_tokens=new_tokens, min_tokens=new_tokens, seed=0)
    return _each_against_plain(plain, "drawn", args.sweep_drawn,
                               lambda drawn: dict(eagle_drawn=drawn, speculative_acceptance="lossless"), params, args,
                               prompts, warmup_prompt, head, common)


def _each_against_plain(plain: Engine, key: str, shapes, options, params, args, prompts, warmup_prompt, head: str,
                        common: dict) -> list:
    """One row per shape: an always-speculating engine with options(shape) against plain decode in turn
    (`identical` where greedy), printed as it finishes."""
    plain.generate([warmup_prompt], params)
    rows = []
    for shape in shapes:
        engine = Engine(speculative="eagle", eagle_head=head, speculative_adaptive=False, **options(shape), **common)
        engine.generate([warmup_prompt], params)
        plain_seconds, plain_tokens, seconds, tokens, stats = timed_in_turn(
            plain, engine, prompts, params, 1, 1 if args.quick else 3, reseed=params.temperature > 0)
        row = {key: list(shape), "speedup": round(plain_seconds / seconds, 3),
               "mean_accepted_length": stats["mean_acceptance_length"]}
        rows.append(row | ({"identical": tokens == plain_tokens} if params.temperature == 0 else {}))
        print(json.dumps(rows[-1]), flush=True)
    return rows

if __name__ == "__main__":
    main()
