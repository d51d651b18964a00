"""EAGLE decoding: Gorgon's plain decode against Gorgon with an EAGLE head, on a catalog model and the head
shipped for it (`--model smollm2`, the default) or any model with `--head`.

The same workload and keys as benchmarks/medusa.py: held-out chat prompts in the model's chat template,
batch 1, 128 new tokens with EOS suppressed; greedy `identical`, `speedup` and `mean_accepted_length`, then
T = 0.7 under the exact, typical and lossless acceptance rules.
"""

from __future__ import annotations

from benchmarks.common import benchmark_model_path, parse_args, report
from benchmarks.medusa import acceptance_modes, benchmark_prompts
from decoding import Engine
from models.catalog import shipped_heads
from models.eagle import EagleTree


def main() -> None:
    def extra(parser):
        parser.add_argument("--head", default=None, help="EAGLE head folder (default: the one shipped for --model)")
        parser.add_argument("--eagle-tree", type=EagleTree.parse, default=None,
                            help="NODES,DEPTH,TOP_K of the candidate tree (default: the head's own)")

    args = parse_args(__doc__, extra)
    args.model = args.model or "smollm2"
    head = args.head or shipped_heads(args.model, "eagle")
    if head is None:
        raise SystemExit(f"no EAGLE head is shipped for {args.model}: pass --head")
    target = benchmark_model_path(args.model)
    new_tokens = 64 if args.quick else 128
    num_prompts = 2 if args.quick else 8
    common = dict(model=target, dtype=args.dtype, show_progress=False)
    plain = Engine(**common)
    *prompts, warmup_prompt = benchmark_prompts(plain.tokenizer, num_prompts + 1)
    result = {"benchmark": "eagle", "model": target, "head": str(head), "dtype": args.dtype, "prompts": len(prompts),
              "prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1), "new_tokens": new_tokens,
              "eagle_tree": args.eagle_tree}
    make = lambda acceptance: Engine(speculative="eagle", eagle_head=str(head), speculative_acceptance=acceptance,  # noqa: E731
                                     eagle_tree=args.eagle_tree, **common)
    result |= acceptance_modes(plain, make, prompts, warmup_prompt, new_tokens, args.quick)
    report(result, args.json)


if __name__ == "__main__":
    main()
