"""The `gorgon` command."""

from __future__ import annotations

import argparse
import sys


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF folder or hub id (default: the embedded model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def _generate(args: argparse.Namespace) -> int:
    from decoding import Engine, SamplingParams
    from models import ModelLoadError

    try:
        params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        engine = Engine(model=args.model, dtype=args.dtype, device=args.device)
        [output] = engine.generate(args.prompt, params)
    except (ModelLoadError, ValueError) as err:
        print(f"gorgon: error: {err}", file=sys.stderr)
        return 2
    for completion in output.outputs:
        if args.n > 1:
            print(f"--- sample {completion.index} ({completion.finish_reason}) ---")
        print(args.prompt + completion.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gorgon", description="Gorgon: decoding engine and inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="complete a prompt offline and print the result")
    generate.add_argument("prompt")
    _add_engine_args(generate)
    generate.add_argument("--n", type=int, default=1, help="number of samples")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.set_defaults(handler=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
