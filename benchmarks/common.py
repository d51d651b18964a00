"""Shared helpers for the benchmarks: the benchmark model, timing, and the JSON result line."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from decoding.config import EngineConfig

# The fixed benchmark model used until a model is named or the embedded default exists.
RANDOM_LLAMA = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                    intermediate_size=1536, vocab_size=8192, max_position_embeddings=4096)


def parse_args(description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None, help="HF folder, hub id or catalog name such as smollm2 (default: "
                        "the embedded model, or a fixed random Llama when none is shipped)")
    parser.add_argument("--quick", action="store_true", help="a shorter run (under a minute on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations, for Gorgon and the HF baseline alike")
    parser.add_argument("--cpu-class", choices=["native", "avx2"], default="native",
                        help="avx2: measure as on an AVX2 machine without AVX-512 (Gorgon's kernels built for "
                        "x86-64-v3, and torch's MKL and oneDNN and CTranslate2 held to AVX2 too)")
    if extra:
        extra(parser)
    args = parser.parse_args()
    if args.cpu_class == "avx2":
        _rerun_as_avx2()
    return args


def add_plain_decode_steps(parser: argparse.ArgumentParser) -> None:
    """A speculation benchmark's baseline: the plain engine as served (decode steps chained,
    decoding/multi_step.py) unless told to take one step per call."""
    parser.add_argument("--plain-decode-steps", type=int, default=EngineConfig.decode_steps,
                        help="decode_steps of the plain engine compared against (default: the engine's default; "
                             "1: one decode step per call, as the speculating engines step)")


# What holds each library to AVX2: read when the library loads, so they are set before the process starts.
AVX2_ENVIRONMENT = {"GORGON_KERNEL_MARCH": "x86-64-v3", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                    "ONEDNN_MAX_CPU_ISA": "AVX2", "CT2_FORCE_CPU_ISA": "AVX2"}


def _rerun_as_avx2() -> None:
    """Replace this process by the same benchmark with the libraries held to AVX2 (once)."""
    if all(os.environ.get(key) == value for key, value in AVX2_ENVIRONMENT.items()):
        return
    argv = [arg for arg in sys.argv[1:] if arg not in ("--cpu-class", "avx2", "--cpu-class=avx2")]
    module = sys.modules["__main__"].__spec__.name
    os.execve(sys.executable, [sys.executable, "-m", module, *argv, "--cpu-class", "avx2"],
              {**os.environ, **AVX2_ENVIRONMENT})


def cpu_description() -> dict:
    """The CPU the figures come from: its model, the vector extensions it has, and the class the native
    kernels were built for."""
    from models import kernels

    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    extensions = [name for name in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "avx2", "fma", "neon",
                                    "asimd", "sve") if name in flags]
    return {"cpu": model, "cpu_extensions": extensions, "kernel_march": kernels.target_march(),
            "threads": torch.get_num_threads()}


def benchmark_model_path(name: str | None) -> str:
    """The model to measure: the one named (a catalog name such as smollm2 as an HF folder of its weights,
    so that HF baselines load it as they load any folder), else the embedded default, else the fixed
    random Llama."""
    from models import catalog
    if name in catalog.CATALOG:
        return catalog_model_folder(name)
    if name:
        return name
    from models.loader import DEFAULT_MODEL_DIR
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        return str(DEFAULT_MODEL_DIR)
    return random_llama_path()


def catalog_model_folder(name: str) -> str:
    """A catalog model's GGUF converted once to an HF folder (float32 weights, as the GGUF dequantizes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from models import catalog

    gguf = Path(catalog.resolve(name))
    folder = catalog.cache_dir() / f"{gguf.stem}-hf"
    if not (folder / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain float32 now; transformers only refuses to save what it read from a GGUF.
        model.hf_quantizer = None
        vars(model.config).pop("quantization_config", None)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        partial = folder.with_suffix(".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.replace(folder)
    return str(folder)


def random_llama_path() -> str:
    """The fixed random Llama (RANDOM_LLAMA), saved once to the temporary folder."""
    # The folder is named by the configuration, so a changed RANDOM_LLAMA never reuses an old save.
    shape = hashlib.blake2b(json.dumps(RANDOM_LLAMA, sort_keys=True).encode(), digest_size=4).hexdigest()
    folder = Path(tempfile.gettempdir()) / f"gorgon-bench-random-llama-chat-{shape}"
    if not (folder / "config.json").exists():
        _save_random_llama(folder)
    return str(folder)


def random_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of `vocab_size` tokens (token identity does not matter for timing), with
    a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = []
    for a in sorted(alphabet):
        for b in sorted(alphabet):
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


def _save_random_llama(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **RANDOM_LLAMA)
    LlamaForCausalLM(config).save_pretrained(folder)
    random_tokenizer(RANDOM_LLAMA["vocab_size"]).save_pretrained(folder)


def random_prompts(num: int, lengths: list[int] | int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [lengths] * num if isinstance(lengths, int) else lengths
    # Skip the first ids so prompts never contain the special tokens.
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def streamed_weight_bytes(model) -> int:
    """Bytes a batch-1 decode step reads: every parameter of the native model, counting a tied embedding
    once (its transposed output-head copy is what streams), and a quantized matrix as its packed blocks."""
    from models.layers import FusedLinear

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if getattr(model, "tied", False):
        total -= model.vocab_size * model.hidden_size * next(model.parameters()).element_size()
    for linear in (module for module in model.modules() if isinstance(module, FusedLinear) and module.quantized):
        total += linear.streamed_bytes() - linear.weight_t.numel() * linear.weight_t.element_size()
    return total


def user_prompt_lengths(num: int, context: int, new_tokens: int, seed: int = 0) -> list[int]:
    """Prompt lengths like those users send: uniform from 16 to 2,048 tokens, or to what the model's
    context leaves for the new tokens when that is less (the embedded default model holds 1,024)."""
    longest = min(2048, context - new_tokens)
    return torch.randint(16, longest + 1, (num,), generator=torch.Generator().manual_seed(seed)).tolist()


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def interleaved(ours: Callable[[], object], baseline: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of `repeats` runs of each, taken in turn, so that drift on a shared machine hits
    both sides alike."""
    ours_times, baseline_times = [], []
    for _ in range(repeats):
        with Timer() as t:
            ours()
        ours_times.append(t.seconds)
        with Timer() as t:
            baseline()
        baseline_times.append(t.seconds)
    return statistics.median(ours_times), statistics.median(baseline_times)


def report(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    sys.stdout.flush()


async def stream_events(client, url: str, body: dict):
    """POST a streamed request; its server-sent JSON events, [DONE] aside (a non-200 raises)."""
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log=None, timeout: float = 600) -> None:
    """Until the server answers /health; its exit first is an error quoting the end of its `log` file."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            output = ""
            if log is not None:
                log.seek(0)
                output = log.read()[-2000:]
            raise RuntimeError(f"server exited with {process.returncode}: {output}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} did not become healthy in {timeout:.0f} s")


@contextmanager
def server_process(command: list[str], url: str, env: dict[str, str] | None = None):
    """Run a server command until the block ends; waits for its /health first. Its output goes to a
    temporary file (a pipe nobody reads would fill and stall a chatty server)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            wait_healthy(url, process, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def gorgon_server(model: str, *extra_args: str):
    """A `gorgon serve` subprocess on a free loopback port; the context yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", str(port),
               "--log-level", "warning", *extra_args]
    return server_process(command, f"http://127.0.0.1:{port}")
