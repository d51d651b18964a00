"""The native kernels built for the lower CPU classes this machine can also run (GORGON_KERNEL_MARCH),
through the same kernel tests: an AVX-512 machine checks its AVX2 build, any x86-64 machine its SSE
build. Each class picks its own register tiles (models/kernels/gemm.c), so each is its own code."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_kernels import needs_kernel


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def lower_classes() -> list[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    flags = _cpu_flags()
    classes = ["x86-64-v2"] if "sse4_2" in flags else []
    if "avx512f" in flags and "avx2" in flags and "fma" in flags:
        classes.append("x86-64-v3")
    return classes


@needs_kernel
@pytest.mark.skipif(os.environ.get("GORGON_KERNEL_MARCH") is not None, reason="already a run for one CPU class")
@pytest.mark.parametrize("march", lower_classes() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no lower x86-64 class to build for on this machine"))])
def test_kernels_pass_when_built_for_a_lower_cpu_class(march, tmp_path):
    env = {**os.environ, "GORGON_KERNEL_MARCH": march}
    # Exit status 0 means the kernel tests ran and passed (5 would mean none ran).
    result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider",
                             str(Path(__file__).with_name("test_kernels.py")),
                             str(Path(__file__).with_name("test_quantization.py")), "-k", "not engine and not gguf_runs "
                             "and not speculation and not pushed and not quantization_on and not unknown"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


_QUANTIZED_PRODUCT = """
import sys, torch
from models import kernels, quantization as Q
torch.manual_seed(0)
x = torch.randn(9, 160)
outputs = []
for name in sorted(n for n, f in Q.FORMATS.items() if f.kind != Q.BF16):   # bf16 needs AVX512_BF16
    blocks = Q.quantize(torch.randn(40, 160), Q.FORMATS[name])
    packed, weights = Q.pack(blocks), kernels.LinearWeights()
    weights.segments = 1
    weights.segment[0] = kernels.QuantSegment(packed.data_ptr(), blocks.format.kind, blocks.format.block,
                                              blocks.format.scale_dtype.itemsize, 40)
    outputs.append(kernels.linear_product(x, weights, 40))
    outputs.append(kernels.linear_product(x[4:5], weights, 40).expand(9, 40))   # one row: AVX2's own loop
torch.save(torch.stack(outputs), sys.argv[1])
"""


@needs_kernel
@pytest.mark.skipif(os.environ.get("GORGON_KERNEL_MARCH") is not None, reason="already a run for one CPU class")
def test_quantized_products_are_the_same_bits_on_every_cpu_class(tmp_path):
    """Integer block sums and one fixed sequence of float operations: AVX-512 VNNI, AVX2 and plain C agree."""
    results = {}
    for march in [None, *lower_classes()]:
        env = {**os.environ, **({"GORGON_KERNEL_MARCH": march} if march else {})}
        target = tmp_path / f"{march or 'native'}.pt"
        subprocess.run([sys.executable, "-c", _QUANTIZED_PRODUCT, str(target)], env=env, check=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=600)
        results[march or "native"] = torch.load(target)
    for march, result in results.items():
        assert torch.equal(result, results["native"]), march


_QUANTIZED_ENGINE = """
import sys, torch
from decoding import Engine, SamplingParams
engine = Engine(model=sys.argv[1], quantization="int8", show_progress=False, kv_cache_memory_gb=0.05)
prompts = [[1, 5, 9, 33, 70, 12, 100], list(range(3, 40))]
greedy = SamplingParams(max_tokens=12, temperature=0, logprobs=2, prompt_logprobs=1)
sampled = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7, logprobs=1, logprobs_mode="raw")
outputs = engine.generate(prompts, greedy) + engine.generate(prompts, sampled)
torch.save([(o.prompt_logprobs, [(c.token_ids, c.logprobs) for c in o.outputs]) for o in outputs], sys.argv[2])
"""


@needs_kernel
@pytest.mark.skipif(os.environ.get("GORGON_KERNEL_MARCH") is not None, reason="already a run for one CPU class")
@pytest.mark.skipif("x86-64-v3" not in lower_classes(), reason="no AVX2 class below this CPU to build for")
def test_a_quantized_model_gives_the_same_bits_on_avx2_and_avx512(llama_dir, tmp_path):
    """With 8-bit activations a last-bit difference anywhere before a product becomes a whole rounding step,
    so every kernel on the way (the norms' sums among them) must add in one order on every class with FMA:
    a prompt's logprobs, greedy and seeded sampled tokens and their logprobs come out the same on the AVX2
    build."""
    results = {}
    for march in (None, "x86-64-v3"):
        env = {**os.environ, **({"GORGON_KERNEL_MARCH": march} if march else {})}
        target = tmp_path / f"{march or 'native'}.pt"
        subprocess.run([sys.executable, "-c", _QUANTIZED_ENGINE, llama_dir, str(target)], env=env, check=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=600)
        results[march or "native"] = torch.load(target, weights_only=False)
    assert results["x86-64-v3"] == results["native"]
