"""Gorgon against the CPU engines users would otherwise pick, on the same HF folder, prompts and threads.

Peers: CTranslate2 (the `peers` extra; the benchmark converts the folder itself; float32, and int8 against
Gorgon's `--quantization int8` on the 0.5B-class model), and llama.cpp (the `xllamacpp` wheel in a virtual
environment of its own, benchmarks/llamacpp_peer.py) on the real SmolLM2-135M-Instruct at F32, Q8_0 and
Q4_1: one GGUF file per format (benchmarks/gguf_requantize.py; Q4_1 is the file as shipped), read by
both engines. A peer that cannot run is reported as skipped, with why.
Workloads, each run in turn on both sides (Gorgon, peer, Gorgon, ...) with fresh prompts per run so that
no cache carries over, medians and the spread (min-max) reported:

- TTFT for prompts of 128, 512 and 2,048 tokens (those the model's context holds);
- batch-1 greedy decode: a 64-token prompt, exactly 128 new tokens (EOS banned before them, as
  CTranslate2's min_length does), with how far the two sides' greedy tokens agree (`first_token_agreement`
  after a dozen random prompts, `chat_leading_tokens` on held-out chat turns where the model has a chat
  template);
- 32 distinct prompts of 16-1,024 tokens, sampled (T = 1), 128 new tokens each;
- one 128-token prompt, n = 16 samples of 128 tokens (CTranslate2: `num_hypotheses`).

Models: the embedded default target, and a 0.5B-class Qwen2 with random weights that the benchmark
builds once (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4,864, the default tokenizer's
vocabulary, float32); its batch-1 decode is also reported as a fraction of the memory-bandwidth
roofline (`decode_roofline_frac`: greedy tokens per second after the first token, times the bytes of
weights a step streams, over the bandwidth of a 512 MB read on the kernels' threads, probed before each
run; the median of the runs' fractions). The default model's 50 MB of weights stay in a large last-level
cache, so its fraction can pass 1. Ratios are Gorgon over the peer: seconds_peer / seconds_gorgon for TTFT, tok/s over tok/s
otherwise, so above 1 means Gorgon is faster.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import Timer, cpu_description, parse_args, random_prompts, report, streamed_weight_bytes
from benchmarks.decode import measure_read_bandwidth
from benchmarks.gguf_requantize import requantized
from benchmarks.llamacpp_peer import LlamaCppProcess, find_llamacpp
from decoding import Engine, SamplingParams
from models.loader import DEFAULT_MODEL_DIR
from training.chat_prompts import chat_prompt_ids, prompts as chat_prompts

QWEN2_0P5B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, max_position_embeddings=4096, rope_theta=1_000_000.0,
                  tie_word_embeddings=True)
TTFT_LENGTHS = (128, 512, 2048)


@dataclass(frozen=True)
class Workloads:
    repeats: int
    num_batch_prompts: int
    batch_lengths: tuple[int, int]
    new_tokens: int
    group_n: int


FULL = Workloads(repeats=3, num_batch_prompts=32, batch_lengths=(16, 1024), new_tokens=128, group_n=16)
QUICK = Workloads(repeats=1, num_batch_prompts=8, batch_lengths=(16, 1024), new_tokens=32, group_n=16)


# ---- the sides ------------------------------------------------------------------------------------

class GorgonSide:
    """Gorgon's offline engine, in the benchmark's own process."""

    def __init__(self, path: str, threads: int, quantization: str = "auto"):
        self.engine = Engine(model=path, threads=threads, show_progress=False, kv_cache_memory_gb=2.0,
                             quantization=quantization)

    def first_token(self, prompt: list[int]) -> None:
        self.engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))

    # min_tokens = max_tokens: EOS is banned until the last token, as CTranslate2's min_length does (and
    # HF's min_new_tokens), so both sides generate exactly the same number of tokens and greedy tokens
    # can be compared one for one.
    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0)
        return self.engine.generate([prompt], params)[0].outputs[0].token_ids

    def sample(self, prompts: list[list[int]], new_tokens: int, n: int, seed: int) -> int:
        params = SamplingParams(n=n, max_tokens=new_tokens, min_tokens=new_tokens, temperature=1.0, seed=seed)
        outputs = self.engine.generate(prompts, params)
        return sum(len(c.token_ids) for out in outputs for c in out.outputs)

    def timed(self, method: str, *args) -> tuple[object, float]:
        with Timer() as t:
            result = getattr(self, method)(*args)
        return result, t.seconds

    def steady_decode_rate(self, prompt: list[int], new_tokens: int) -> float:
        """Greedy tokens per second after the first one (the prompt's prefill left out): the rate a
        bandwidth roofline bounds."""
        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0)
        [output] = self.engine.generate([prompt], params)
        return (new_tokens - 1) / (output.finish_time - output.first_token_time)


class CTranslate2Side:
    """A CTranslate2 generator over the converted folder (run it through PeerProcess)."""

    def __init__(self, path: str, threads: int, compute_type: str = "float32"):
        import ctranslate2
        from transformers import AutoTokenizer

        self.version = ctranslate2.__version__
        # int8: CTranslate2 quantizes the float32 conversion's weights at load (int8 weights, per row)
        self.generator = ctranslate2.Generator(str(_converted(path)), device="cpu", compute_type=compute_type,
                                               intra_threads=threads, inter_threads=1)
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def _tokens(self, prompt: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(prompt)

    def first_token(self, prompt: list[int]) -> None:
        self.generator.generate_batch([self._tokens(prompt)], max_length=1, sampling_topk=1,
                                      include_prompt_in_result=False)

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        [result] = self.generator.generate_batch([self._tokens(prompt)], max_length=new_tokens,
                                                 min_length=new_tokens, sampling_topk=1,
                                                 include_prompt_in_result=False)
        return result.sequences_ids[0]

    def sample(self, prompts: list[list[int]], new_tokens: int, n: int, seed: int) -> int:
        import ctranslate2

        ctranslate2.set_random_seed(seed)
        # Batches of up to 2,048 prompt tokens: the fastest of the batchings tried for 32 prompts of
        # 16-1,024 tokens (one batch, 1, 4 or 8 prompts, 2,048 or 4,096 tokens; one batch of prompts of
        # mixed lengths was the slowest, 3.8x slower than one at a time for 8 prompts).
        results = self.generator.generate_batch([self._tokens(p) for p in prompts], max_length=new_tokens,
                                                min_length=new_tokens, sampling_topk=0, sampling_temperature=1.0,
                                                num_hypotheses=n, include_prompt_in_result=False,
                                                max_batch_size=2048, batch_type="tokens")
        return sum(len(ids) for result in results for ids in result.sequences_ids)


PEERS = {"ctranslate2": CTranslate2Side}


class PeerProcess:
    """A peer engine in a process of its own, driven over a pipe; each call is timed inside that process.

    In one process with Gorgon, CTranslate2's own copy of the OpenMP runtime (a second thread pool on
    the same cores) made Gorgon's batch-1 decode 2.1x slower, even with CTranslate2 idle for 0.5 s."""

    def __init__(self, peer: str, path: str, threads: int, *options):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_peer, args=(child, peer, path, threads, *options), daemon=True)
        self._process.start()
        _, self.version = self._conn.recv()     # sent once the peer has loaded

    def _call(self, method: str, *args):
        self._conn.send((method, args))
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"peer failed in {method}: {value}")
        return value

    def timed(self, method: str, *args) -> tuple[object, float]:
        return self._call(method, *args)

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=60)


def _serve_peer(conn, peer: str, path: str, threads: int, *options) -> None:
    side = PEERS[peer](path, threads, *options)
    conn.send((True, side.version))   # the handshake PeerProcess waits for
    while (message := conn.recv()) is not None:
        method, args = message
        try:
            with Timer() as t:
                result = getattr(side, method)(*args)
            conn.send((True, (result, t.seconds)))
        except Exception as err:   # reported to the parent, which raises it
            conn.send((False, f"{err.__class__.__name__}: {err}"))


def _converted(path: str) -> Path:
    """The CTranslate2 conversion of an HF folder, made once per folder content."""
    from ctranslate2.converters import TransformersConverter

    digest = hashlib.sha256(Path(path, "config.json").read_bytes())
    for weights in sorted(Path(path).glob("*.safetensors")):
        digest.update(str(weights.stat().st_size).encode() + str(weights.stat().st_mtime_ns).encode())
    folder = Path(tempfile.gettempdir()) / f"gorgon-bench-ct2-{digest.hexdigest()[:12]}"
    if not (folder / "model.bin").exists():
        TransformersConverter(path).convert(str(folder), quantization="float32", force=True)
    return folder


def peers_available() -> dict[str, str | None]:
    """Each peer -> None when it can run here, else why it is skipped."""
    return {
        "ctranslate2": None if importlib.util.find_spec("ctranslate2") else
        "not installed (pip install -e '.[peers]')",
        "vllm": "vLLM's CPU build is not importable here" if importlib.util.find_spec("vllm") is None else
        "importable, but not driven by this benchmark yet",
    }


# ---- measuring ------------------------------------------------------------------------------------

def _interleaved(ours: Callable[[int], float], peer: Callable[[int], float], repeats: int) -> dict:
    """Run ours(i) and peer(i) in turn, i = 0..repeats-1 (each run gets its own fresh inputs); each
    returns its seconds. A short pause before each run lets the other side's OpenMP threads stop
    spinning."""
    ours_s, peer_s = [], []
    for i in range(repeats):
        time.sleep(0.2)
        ours_s.append(ours(i))
        time.sleep(0.2)
        peer_s.append(peer(i))
    return {"ours_s": statistics.median(ours_s), "peer_s": statistics.median(peer_s),
            "ours_spread_s": [round(min(ours_s), 4), round(max(ours_s), 4)],
            "peer_spread_s": [round(min(peer_s), 4), round(max(peer_s), 4)]}


WORKLOADS = ("ttft", "decode", "batch", "group")


def seconds(side: GorgonSide | PeerProcess, method: str, *args) -> float:
    return side.timed(method, *args)[1]


def measure(ours: GorgonSide, peer: PeerProcess, vocab: int, max_len: int, work: Workloads,
            selected: tuple[str, ...] = WORKLOADS) -> dict:
    results: dict[str, dict] = {}
    warm = random_prompts(2, 32, vocab, seed=999)
    for side in (ours, peer):    # first calls build caches and pack weights
        side.timed("first_token", warm[0])
        side.timed("sample", warm, 4, 1, 0)

    for length in TTFT_LENGTHS if "ttft" in selected else ():
        if length + 1 > max_len:
            results[f"ttft_{length}"] = {"skipped": f"beyond the model's context ({max_len} tokens)"}
            continue
        prompts = random_prompts(2 * work.repeats, length, vocab, seed=length)
        timing = _interleaved(lambda i: seconds(ours, "first_token", prompts[2 * i]),
                              lambda i: seconds(peer, "first_token", prompts[2 * i + 1]), work.repeats)
        results[f"ttft_{length}"] = {**_rounded(timing), "ratio": round(timing["peer_s"] / timing["ours_s"], 3)}

    if "decode" in selected:
        results["decode"] = _decode(ours, peer, vocab, work)
    if "batch" in selected:
        results["batch"] = _batch(ours, peer, vocab, max_len, work)
    if "group" in selected:
        results["group"] = _group(ours, peer, vocab, work)
    return results


def _decode(ours: GorgonSide, peer: PeerProcess, vocab: int, work: Workloads) -> dict:
    new = work.new_tokens
    decode_prompts = random_prompts(work.repeats, 64, vocab, seed=64)
    agreement = _greedy_agreement(ours, peer, vocab, new)
    timing = _interleaved(lambda i: seconds(ours, "greedy", decode_prompts[i], new),
                          lambda i: seconds(peer, "greedy", decode_prompts[i], new), work.repeats)
    return _throughput(timing, new, **agreement)


AGREEMENT_RANDOM_PROMPTS = 12   # first greedy token of each: random prompts leave near ties, so a fraction
AGREEMENT_CHAT_PROMPTS = 4      # held-out chat turns (models with a chat template), new_tokens each


def _greedy_agreement(ours: GorgonSide, peer, vocab: int, new: int) -> dict:
    """How far both sides' greedy tokens agree: the first token after each of a dozen random 64-token
    prompts, and the leading tokens both generate for real chat turns. On random prompts the top two
    logits are often within a quantized model's rounding of each other, so one prompt alone says little
    (llama.cpp's Q8_0 and Gorgon's agreed on 23 of 24 first tokens, the odd one a 0.03-nat near tie)."""
    method = "greedy_ids" if isinstance(peer, LlamaCppProcess) else "greedy"
    first = [ours.timed("greedy", prompt, 1)[0] == peer.timed(method, prompt, 1)[0]
             for prompt in random_prompts(AGREEMENT_RANDOM_PROMPTS, 64, vocab, seed=640)]
    result = {"first_token_agreement": f"{sum(first)}/{len(first)}"}
    tokenizer = ours.engine.tokenizer
    if tokenizer.chat_template:
        leading = []
        for text in chat_prompts("heldout")[:AGREEMENT_CHAT_PROMPTS]:
            prompt = chat_prompt_ids(tokenizer, text)
            mine, theirs = ours.timed("greedy", prompt, new)[0], peer.timed(method, prompt, new)[0]
            leading.append(next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs))))
        result["chat_leading_tokens"] = leading
    return result


def _batch(ours: GorgonSide, peer: PeerProcess, vocab: int, max_len: int, work: Workloads) -> dict:
    new = work.new_tokens
    low, high = work.batch_lengths
    high = min(high, max_len - new)     # the default model's context is 1,024 tokens
    gen = torch.Generator().manual_seed(0)
    batches = [random_prompts(work.num_batch_prompts,
                              torch.randint(low, high + 1, (work.num_batch_prompts,), generator=gen).tolist(),
                              vocab, seed=100 + i) for i in range(work.repeats)]
    timing = _interleaved(lambda i: seconds(ours, "sample", batches[i], new, 1, i),
                          lambda i: seconds(peer, "sample", batches[i], new, 1, i), work.repeats)
    return _throughput(timing, work.num_batch_prompts * new, prompts=work.num_batch_prompts,
                       prompt_tokens=[low, high])


def _group(ours: GorgonSide, peer: PeerProcess, vocab: int, work: Workloads) -> dict:
    new = work.new_tokens
    group_prompts = random_prompts(work.repeats, 128, vocab, seed=128)
    timing = _interleaved(lambda i: seconds(ours, "sample", [group_prompts[i]], new, work.group_n, i),
                          lambda i: seconds(peer, "sample", [group_prompts[i]], new, work.group_n, i), work.repeats)
    return _throughput(timing, work.group_n * new, n=work.group_n)


def _rounded(timing: dict) -> dict:
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in timing.items()}


def _throughput(timing: dict, tokens: int, **extra) -> dict:
    return {"ours_tok_s": round(tokens / timing["ours_s"], 2), "peer_tok_s": round(tokens / timing["peer_s"], 2),
            "ratio": round(timing["peer_s"] / timing["ours_s"], 3), **_rounded(timing), **extra}


# ---- models ---------------------------------------------------------------------------------------

def qwen2_0p5b_path() -> str:
    """A 0.5B-class Qwen2 with random weights and the default tokenizer, built once in the temp folder."""
    folder = Path(tempfile.gettempdir()) / "gorgon-bench-qwen2-0p5b"
    if (folder / "config.json").exists():
        return str(folder)
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    # CTranslate2's Qwen2 converter adds an unknown token to the vocabulary when the tokenizer names
    # none; the byte-level tokenizer never produces one, so the padding token stands in.
    tokenizer.unk_token = tokenizer.pad_token
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **QWEN2_0P5B)
    torch.manual_seed(0)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    Qwen2ForCausalLM(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return str(folder)


def run_model(label: str, path: str, threads: int, work: Workloads, skipped: dict[str, str | None],
              selected: tuple[str, ...], quantization: str = "auto") -> dict:
    ours = GorgonSide(path, threads, quantization)
    vocab, max_len = ours.engine.loaded.model.vocab_size, ours.engine.max_model_len
    section: dict = {"model": label, "path": path, "quantization": ours.engine.loaded.quantization}
    if skipped["ctranslate2"] is None:
        peer = PeerProcess("ctranslate2", path, threads, "int8" if quantization == "int8" else "float32")
        try:
            section["ctranslate2"] = {"version": peer.version, **measure(ours, peer, vocab, max_len, work, selected)}
        finally:
            peer.close()
    section.update(_roofline(ours, vocab, work))
    return section


def run_gguf(label: str, gguf: str, threads: int, work: Workloads, llamacpp: tuple[str, str],
             selected: tuple[str, ...]) -> dict:
    """Gorgon and llama.cpp on the same GGUF file (TTFT, decode and the n = 16 group)."""
    ours = GorgonSide(gguf, threads)
    vocab, max_len = ours.engine.loaded.model.vocab_size, ours.engine.max_model_len
    section: dict = {"model": label, "path": gguf, "quantization": ours.engine.loaded.quantization}
    peer = LlamaCppProcess(llamacpp[0], gguf, threads, llamacpp[1])
    try:
        chosen = tuple(w for w in selected if w != "batch")   # the llama.cpp workloads: TTFT, decode, n = 16
        section["llamacpp"] = {"version": peer.version, **measure(ours, peer, vocab, max_len, work, chosen)}
    finally:
        peer.close()
    section.update(_roofline(ours, vocab, work))
    return section


def _roofline(ours: GorgonSide, vocab: int, work: Workloads) -> dict:
    """Steady batch-1 decode against the memory bandwidth, probed before each run (the machine is shared:
    its bandwidth moves between runs): the median of the runs' fractions, and the spread of both."""
    prompt = random_prompts(1, 64, vocab, seed=65)[0]
    ours.greedy(prompt, 8)
    weight_bytes = streamed_weight_bytes(ours.engine.loaded.model)
    rates, bandwidths = [], []
    for _ in range(work.repeats):
        bandwidths.append(measure_read_bandwidth(repeats=3))
        rates.append(ours.steady_decode_rate(prompt, work.new_tokens))
    fractions = [rate * weight_bytes / bandwidth for rate, bandwidth in zip(rates, bandwidths)]
    return dict(steady_decode_tok_s=round(statistics.median(rates), 2), weight_mb=round(weight_bytes / 1e6, 1),
                bandwidth_gb_s=round(statistics.median(bandwidths) / 1e9, 2),
                bandwidth_spread_gb_s=[round(min(bandwidths) / 1e9, 1), round(max(bandwidths) / 1e9, 1)],
                decode_roofline_frac=round(statistics.median(fractions), 3),
                roofline_frac_spread=[round(min(fractions), 3), round(max(fractions), 3)])


MODELS = ("default", "0p5b", "0p5b_int8", "smollm2_f32", "smollm2_q8_0", "smollm2_q4_1")


def main() -> None:
    def extra(parser):
        parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                            help="threads for Gorgon and every peer alike (default: torch's, one per core)")
        parser.add_argument("--models", default=None, help=f"comma-separated from {','.join(MODELS)} (default: "
                            "all; --quick: default only)")
        parser.add_argument("--workloads", default=",".join(WORKLOADS),
                            help=f"comma-separated from {','.join(WORKLOADS)} (default: all)")
        parser.add_argument("--llamacpp-python", default=None,
                            help="the interpreter of a virtual environment with xllamacpp (or GORGON_LLAMACPP_PYTHON)")

    args = parse_args(__doc__, extra)
    work = QUICK if args.quick else FULL
    models = (args.models or ("default" if args.quick else ",".join(MODELS))).split(",")
    selected = tuple(args.workloads.split(","))
    if unknown := set(selected) - set(WORKLOADS):
        raise SystemExit(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    if unknown := set(models) - set(MODELS):
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    skipped = peers_available()
    llamacpp_python, llamacpp_version = find_llamacpp(args.llamacpp_python)
    if llamacpp_python is None:
        skipped["llamacpp"] = llamacpp_version
    result: dict = {"benchmark": "peers", "quick": args.quick, **cpu_description(),
                    "threads": args.threads, "workloads": work.__dict__,
                    "skipped": {name: why for name, why in skipped.items() if why is not None}}
    for label in models:
        if label.startswith("smollm2"):
            if llamacpp_python is None:
                continue
            section = run_gguf(label, _smollm2_gguf(label.split("_", 1)[1].upper()), args.threads, work,
                               (llamacpp_python, llamacpp_version), selected)
        else:
            path = str(DEFAULT_MODEL_DIR) if label == "default" else qwen2_0p5b_path()
            section = run_model(label, path, args.threads, work, skipped, selected,
                                "int8" if label.endswith("int8") else "auto")
        print(json.dumps(section), file=sys.stderr, flush=True)   # each model's figures as soon as they exist
        result[label] = section
        result.update(_ratio_keys(label, section))
    report(result, args.json)


def _smollm2_gguf(type_name: str) -> str:
    from models import catalog

    shipped = catalog.resolve("smollm2")
    return shipped if shipped.endswith(f".{type_name}.gguf") else str(requantized(shipped, type_name))


def _ratio_keys(label: str, section: dict) -> dict:
    """The headline keys: ttft_512_ratio, decode_ratio, batch_ratio, group_ratio (suffixed by the model
    unless it is the default), and the decode's roofline fraction."""
    suffix = "" if label == "default" else f"_{label}"
    keys = {f"decode_roofline_frac{suffix}": section["decode_roofline_frac"]}
    peer = section.get("ctranslate2") or section.get("llamacpp")
    if peer:
        if "ttft_512" in peer:
            keys[f"ttft_512_ratio{suffix}"] = peer["ttft_512"].get("ratio")
        for workload in ("decode", "batch", "group"):
            if workload in peer:
                keys[f"{workload}_ratio{suffix}"] = peer[workload]["ratio"]
    return keys


if __name__ == "__main__":
    main()
