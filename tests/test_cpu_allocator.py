"""Host memory for the CPU path: packed weights carved out of chunks of huge pages (models/cpu_allocator.py)."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from models import cpu_allocator
from models.cpu_allocator import HUGE_PAGE, WEIGHT_CHUNK, on_weight_pages, weight_storage
from models.layers import FusedLinear
from models.quantization import FORMATS

needs_kernel = pytest.mark.skipif(
    (shutil.which("cc") is None and shutil.which("gcc") is None) or os.environ.get("GORGON_NATIVE_KERNELS") == "0",
    reason="no C compiler to build the native kernels, or they are switched off")

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_pages_granted() -> bool:
    return sys.platform.startswith("linux") and THP.exists() and "[never]" not in THP.read_text()


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds address (smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_small_matrices_share_a_chunk_one_cache_line_apart():
    first = weight_storage(1000, torch.uint8)
    second = weight_storage(300, torch.float32)
    assert second.data_ptr() == first.data_ptr() + 1024        # the next 64-byte line after the first
    assert second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert first.untyped_storage().nbytes() >= WEIGHT_CHUNK     # a view of the chunk, which it keeps alive


def test_a_large_matrix_gets_huge_pages_of_its_own():
    large = weight_storage(WEIGHT_CHUNK // 4 + 1, torch.uint8)
    assert large.data_ptr() % HUGE_PAGE == 0
    assert large.untyped_storage().nbytes() < WEIGHT_CHUNK


def test_a_copy_on_weight_pages_is_equal():
    packed = torch.randn(12345)
    copy = on_weight_pages(packed)
    assert torch.equal(copy, packed) and copy.data_ptr() != packed.data_ptr()


@pytest.mark.skipif(not _huge_pages_granted(), reason="transparent huge pages are off here")
def test_weight_chunks_are_backed_by_huge_pages():
    cpu_allocator._weights = cpu_allocator._WeightArena()       # a fresh chunk, touched below
    storage = weight_storage(8 * HUGE_PAGE // 4, torch.float32).fill_(1.0)
    assert _anon_huge_kb(storage.data_ptr()) > 0


@needs_kernel
@pytest.mark.parametrize("quantized", [False, True])
def test_a_linear_layers_packed_weights_are_weight_storage(quantized):
    linear = FusedLinear(64, [48, 16], [False, False], torch.float32, torch.device("cpu"))
    torch.nn.init.normal_(linear.weight_t)
    if quantized:
        linear.quantize([FORMATS["q8_0"], FORMATS["q8_0"]])
    x = torch.randn(3, 64)
    out = linear(x)
    [packed] = linear._linear_storage
    assert packed.untyped_storage().nbytes() >= WEIGHT_CHUNK, "packed outside the weight chunks"
    # the product reads them there (Q8_0 with 8-bit activations: about 1% off the float product)
    torch.testing.assert_close(out, x @ linear.weight_t, rtol=0.05, atol=0.3 if quantized else 1e-4)
