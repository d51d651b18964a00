"""Native CPU kernels, compiled on first use with the system's C compiler and loaded with ctypes.

The kernels are plain C with OpenMP. The library links `libgomp.so.1`, which resolves to the OpenMP
runtime torch has already loaded, so a kernel's threads are torch's threads: no second pool competing
for the cores. The build is cached per source, flags and CPU under ~/.cache/gorgon/kernels (or
$GORGON_KERNEL_CACHE). Where no compiler works (a slim container, macOS without OpenMP) the engine
keeps its pure-torch path and says so once in the log; GORGON_NATIVE_KERNELS=0 selects that path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("GORGON_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "gorgon" / "kernels"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode() + _cpu_identity().encode()).hexdigest()[:16]
    library = _cache_dir() / f"paged_attention-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builds (test workers, server replicas) never see
    # a half-written library.
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"],
                       check=True, capture_output=True, text=True, timeout=120)
        partial.replace(library)
    finally:
        partial.unlink(missing_ok=True)
    return library


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("GORGON_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        logger.warning("no C compiler found: decode attention runs on the slower pure-torch path")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("native kernels unavailable (%s): decode attention runs on the pure-torch path", detail)
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    library.paged_decode_attention.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64, f32]
    library.paged_decode_attention.restype = None
    return library


def native_decode_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and _library() is not None


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           window: int | None) -> torch.Tensor:
    """query [B, heads, d] (rows may be strided, heads and d contiguous); key/value cache
    [num_blocks, block_size, kv_heads, d]; block_tables [B, max_blocks] and context_lens [B] int64
    -> [B, heads, d]. Only the first context_lens[b] slots of a table are read."""
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    assert query.stride(2) == 1 and query.stride(1) == head_dim, "query heads must be contiguous"
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert block_tables.dtype == torch.int64 and block_tables.is_contiguous() and context_lens.is_contiguous()
    out = torch.empty(batch, num_heads, head_dim, dtype=query.dtype)
    _library().paged_decode_attention(
        query.data_ptr(), query.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), out.data_ptr(),
        batch, num_heads, num_kv_heads, head_dim, block_size, window or 0, scale)
    return out
