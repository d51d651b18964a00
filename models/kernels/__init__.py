"""Native CPU kernels, compiled on first use with the system's C compiler and loaded with ctypes.

The kernels are plain C with OpenMP. The library links `libgomp.so.1`, which resolves to the OpenMP
runtime torch has already loaded, so a kernel's threads are torch's threads: no second pool competing
for the cores. The build is cached per source, flags and CPU under ~/.cache/gorgon/kernels (or
$GORGON_KERNEL_CACHE). Where no compiler works (a slim container, macOS without OpenMP) the engine
keeps its pure-torch path and says so once in the log; GORGON_NATIVE_KERNELS=0 selects that path.

The kernels are built for the CPU they run on (`-march=native`). GORGON_KERNEL_MARCH builds them for
another target instead, a lower CPU class in particular: `GORGON_KERNEL_MARCH=x86-64-v3` gives the AVX2
build on an AVX-512 machine, so both classes can be tested and measured on either. The vector code picks
its register tiles from what the target has (gemm.c), not from the machine it was compiled on.
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

from models.cpu_allocator import weight_storage

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("paged_attention.c", "prefill_attention.c", "fused_ops.c", "sampling.c", "gemm.c",
                        "quant_gemm.c", "bf16_gemm.c", "decoder.c", "tree_verify.c", "medusa_chain.c",
                        "eagle_chain.c", "threads.c", "memory_probe.c")]
HEADERS = [Path(__file__).with_name(name)
           for name in ("vector_math.h", "attention_row.h", "threads.h", "linear.h", "decoder.h")]
# -ffp-contract=fast lets the compiler fuse multiply-adds: ISO C mode (-std=c11) otherwise forbids it,
# which halves the arithmetic rate of every dot product and matrix tile.
BASE_FLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


def target_march() -> str:
    """The -march the kernels are built for: the machine's own unless GORGON_KERNEL_MARCH names another."""
    return os.environ.get("GORGON_KERNEL_MARCH") or "native"


def _flags() -> list[str]:
    return [*BASE_FLAGS, f"-march={target_march()}"]


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
    source = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    flags = _flags()
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode() + _cpu_identity().encode()).hexdigest()[:16]
    library = _cache_dir() / f"gorgon-kernels-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builds (test workers, server replicas) never see
    # a half-written library.
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(partial), "-lm"],
                       check=True, capture_output=True, text=True, timeout=120)
        partial.replace(library)
    finally:
        partial.unlink(missing_ok=True)
    return library


_I64, _F32, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
# Each exported C function's (argument types, return type).
SIGNATURES = {
    "set_kernel_threads": ([ctypes.c_int], None),
    "kernel_threads": ([], ctypes.c_int),
    "read_bandwidth_probe": ([_PTR, _I64], _F32),
    "paged_decode_attention": ([_PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR,
                                _I64, _I64, _I64, _I64, _I64, _I64, _F32, _F32, _PTR], None),
    "paged_prefill_attention": ([_PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR,
                                 _I64, _I64, _I64, _I64, _I64, _F32, _F32, _PTR], None),
    "rms_norm": ([_PTR, _I64, _PTR, _F32, _PTR, _I64, _I64], None),
    "rms_norm_heads": ([_PTR, _I64, _PTR, _F32, _I64, _I64, _I64], None),
    "rotary_write_kv": ([_PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64], None),
    "silu_mul": ([_PTR, _PTR, _I64, _I64], None),
    "sample_rows": ([_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR], None),
    "sample_rows_masked": ([_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR], None),
    "mask_rows_by_bits": ([_PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR], None),
    "log_softmax_rows": ([_PTR, _I64, _I64, _PTR, _PTR], None),
    "all_finite": ([_PTR, _I64], ctypes.c_int),
    "copy_transposed": ([_PTR, _I64, _I64, _I64, _PTR, _I64], None),
    "pack_panels": ([_PTR, _I64, _I64, _PTR], None),
    "linear_product": ([_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR], None),
    "bf16_products_supported": ([], ctypes.c_int),
    "decoder_scratch_floats": ([_PTR, _I64], _I64),
    "decoder_forward": ([_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR], None),
    "decoder_greedy_chain_scratch_floats": ([_PTR, _I64, _I64, _I64], _I64),
    "decoder_greedy_chain": ([_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR,
                              _I64, _PTR, _PTR, _PTR, _PTR, _PTR], None),
    "decoder_medusa_chain_scratch_floats": ([_PTR, _PTR, _PTR, _I64, _PTR], _I64),
    "decoder_medusa_chain": ([_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR], None),
    "decoder_eagle_chain_scratch_floats": ([_PTR, _PTR, _I64, _PTR], _I64),
    "decoder_eagle_chain": ([_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR], None),
}


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
    for name, (argtypes, restype) in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, restype
    return library


def set_num_threads(threads: int) -> None:
    """Threads for torch's intra-op pool and the native kernels alike (both run on the same OpenMP
    runtime, see above). The kernels' count holds for every thread; torch's OpenMP count only for the
    calling one, so whoever steps the engine calls this in its own thread (Engine.use_threads)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    library = _library()
    if library is not None:
        library.set_kernel_threads(threads)


def num_threads() -> int:
    """The threads a native kernel's parallel region uses now."""
    library = _library()
    return library.kernel_threads() if library is not None else torch.get_num_threads()


def native_decode_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and _library() is not None


# The fused layer ops build with the same library and run where the decode kernel runs.
native_ops_available = native_decode_available


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           window: int | None, extra_positions: torch.Tensor | None = None,
                           extra_counts: torch.Tensor | None = None, softcap: float | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, heads, d] (rows may be strided, heads and d contiguous); key/value cache
    [num_blocks, block_size, kv_heads, d]; block_tables [B, max_blocks] and context_lens [B] int64
    -> [B, heads, d]. Row b reads the first context_lens[b] positions of its table, then the first
    extra_counts[b] positions of extra_positions[b] ([B, max_extra] int64), when given."""
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    assert query.stride(2) == 1 and query.stride(1) == head_dim, "query heads must be contiguous"
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert block_tables.dtype == torch.int64 and block_tables.is_contiguous() and context_lens.is_contiguous()
    extras = extra_positions is not None
    if extras:
        assert extra_positions.is_contiguous() and extra_counts.is_contiguous() and extra_positions.shape[0] == batch
    out = torch.empty(batch, num_heads, head_dim, dtype=query.dtype)
    _library().paged_decode_attention(
        query.data_ptr(), query.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
        extra_positions.data_ptr() if extras else None, extra_positions.shape[1] if extras else 0,
        extra_counts.data_ptr() if extras else None, out.data_ptr(),
        batch, num_heads, num_kv_heads, head_dim, block_size, window or 0, scale, softcap or 0.0,
        _sinks(sinks, num_heads))
    return out


def _sinks(sinks: torch.Tensor | None, num_heads: int) -> int | None:
    if sinks is None:
        return None
    assert sinks.dtype == torch.float32 and sinks.is_contiguous() and sinks.numel() == num_heads
    return sinks.data_ptr()


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            q_starts: torch.Tensor, counts: torch.Tensor, cached: torch.Tensor,
                            block_tables: torch.Tensor, scale: float, window: int | None, out: torch.Tensor,
                            softcap: float | None = None, sinks: torch.Tensor | None = None) -> None:
    """Causal attention of prompt chunks whose keys and values are already in the cache, into out [T, heads,
    d] (contiguous; only the chunks' rows are written). query [T, heads, d] (rows may be strided); chunk s
    is rows [q_starts[s], q_starts[s] + counts[s]), its first token at position cached[s], its blocks
    block_tables[s] ([S, max_blocks]); all int64. softcap, sinks as paged_decode_attention's."""
    num_heads, head_dim = query.shape[1:]
    _, block_size, num_kv_heads, _ = key_cache.shape
    assert query.stride(2) == 1 and query.stride(1) == head_dim and out.is_contiguous()
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    for tensor in (q_starts, counts, cached, block_tables):
        assert tensor.dtype == torch.int64 and tensor.is_contiguous()
    _library().paged_prefill_attention(
        query.data_ptr(), query.stride(0), key_cache.data_ptr(), value_cache.data_ptr(), q_starts.data_ptr(),
        counts.data_ptr(), cached.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], q_starts.numel(),
        out.data_ptr(), num_heads, num_kv_heads, head_dim, block_size, window or 0, scale, softcap or 0.0,
        _sinks(sinks, num_heads))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, d] (rows may be strided) -> x * rsqrt(mean(x^2) + eps) * weight, contiguous [T, d]."""
    rows, dim = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous()
    out = torch.empty(rows, dim, dtype=x.dtype)
    _library().rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), eps, out.data_ptr(), rows, dim)
    return out


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int) -> None:
    """In place on the first num_heads heads of each row of x [T, >= num_heads * d] (rows may be strided,
    a row's heads contiguous): each head [d] gets rms_norm with weight [d] (Qwen3's q_norm, k_norm)."""
    rows, dim = x.shape[0], weight.numel()
    assert x.stride(1) == 1 and x.shape[1] >= num_heads * dim and weight.is_contiguous()
    _library().rms_norm_heads(x.data_ptr(), x.stride(0), weight.data_ptr(), eps, rows, num_heads, dim)


def rotary_write_kv(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, slots: torch.Tensor,
                    key_cache: torch.Tensor, value_cache: torch.Tensor, num_heads: int) -> None:
    """In place on the fused projection qkv [T, (heads + 2 * kv_heads) * d]: rotate the query and key
    heads (cos, signed_sin [T, d], see models.layers.RotaryEmbedding), then write the keys and values to
    their cache slots [T] (block * block_size + offset)."""
    rows = qkv.shape[0]
    _, _, num_kv_heads, head_dim = key_cache.shape
    assert qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
    assert cos.is_contiguous() and signed_sin.is_contiguous() and slots.dtype == torch.int64 and slots.is_contiguous()
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    _library().rotary_write_kv(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), signed_sin.data_ptr(), slots.data_ptr(),
                               key_cache.data_ptr(), value_cache.data_ptr(), rows, num_heads, num_kv_heads, head_dim)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in the tensor: one native pass over a contiguous float32 CPU tensor (a pushed
    weight), torch.isfinite elsewhere."""
    library = _library()
    if library is None or tensor.dtype != torch.float32 or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return bool(torch.isfinite(tensor).all())
    return bool(library.all_finite(tensor.data_ptr(), tensor.numel()))


def copy_transposed(target: torch.Tensor, source: torch.Tensor) -> bool:
    """target [in, out] (rows may be strided, columns contiguous) = source [out, in] transposed, natively
    for float32 CPU tensors (-> True); False where it does not apply (the caller copies)."""
    library = _library()
    if (library is None or target.dtype != torch.float32 or source.dtype != torch.float32
            or target.device.type != "cpu" or source.device.type != "cpu" or target.dim() != 2
            or target.stride(1) != 1 or source.stride(1) != 1 or tuple(target.shape) != tuple(source.shape[::-1])):
        return False
    rows, cols = source.shape
    library.copy_transposed(source.data_ptr(), rows, cols, source.stride(0), target.data_ptr(), target.stride(0))
    return True


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * d] (the fused gate and up projections) -> silu(gate) * up, [T, d]."""
    rows, width = gate_up.shape
    assert gate_up.is_contiguous()
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
    _library().silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
    return out


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor, greedy: torch.Tensor,
                want_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row of logits [N, vocab] from softmax(logits / temperature) by inverse CDF with the
    row's uniform (greedy rows: the argmax). -> tokens [N] int64, the chosen token's logprob under the
    sampled distribution (temperature 1 for greedy rows) [N], and under temperature 1 where want_raw [N]."""
    rows, vocab = logits.shape
    logits = logits.contiguous()
    temperature, uniforms = temperature.float().contiguous(), uniforms.float().contiguous()
    greedy, want_raw = greedy.to(torch.uint8).contiguous(), want_raw.to(torch.uint8).contiguous()
    tokens = torch.empty(rows, dtype=torch.int64)
    logprobs, raw_logprobs = torch.empty(rows), torch.empty(rows)
    _library().sample_rows(logits.data_ptr(), rows, vocab, temperature.data_ptr(), uniforms.data_ptr(),
                           greedy.data_ptr(), want_raw.data_ptr(), tokens.data_ptr(), logprobs.data_ptr(),
                           raw_logprobs.data_ptr())
    return tokens, logprobs, raw_logprobs


def raw_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax of logits [N, vocab] float32 as every raw logprob the engine reports is computed:
    x - max - log(sum(exp(x - max))) with sample_rows' own summation (torch's log_softmax where the
    native kernels do not run). Whichever path reports a raw logprob, and a trainer recomputing it
    (decoding/matched_forward.py), gets the same bits."""
    native = log_softmax_at(logits, torch.ones(logits.shape[0]))
    return native if native is not None else torch.log_softmax(logits, dim=-1)


def log_softmax_at(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor | None:
    """log_softmax(logits / temperature[r]) per row [N, vocab] (float32, CPU) with the arithmetic of
    sample_rows' reported logprobs, so a row scored here gets the bits a natively drawn row reports;
    None where the native kernels do not run."""
    library = _library()
    if library is None or logits.device.type != "cpu" or logits.dtype != torch.float32:
        return None
    logits = logits.contiguous()
    rows, vocab = logits.shape
    inverse = (1.0 / temperature.to(torch.float32)).contiguous()
    out = torch.empty_like(logits)
    library.log_softmax_rows(logits.data_ptr(), rows, vocab, inverse.data_ptr(), out.data_ptr())
    return out


def sample_rows_masked(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor, greedy: torch.Tensor,
                       bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sample_rows where each row may only take the tokens set in its packed allowed-token bits [N, words]
    int32 (logits are read, not masked in place). -> tokens [N] int64 (-1 for a dead row), the chosen
    token's logprob under the masked distribution [N], and dead [N] bool: rows with nothing finite left."""
    rows, vocab = logits.shape
    assert bits.dtype == torch.int32 and bits.shape[0] == rows and bits.shape[1] * 32 >= vocab
    logits, bits = logits.contiguous(), bits.contiguous()
    temperature, uniforms = temperature.float().contiguous(), uniforms.float().contiguous()
    greedy = greedy.to(torch.uint8).contiguous()
    tokens, logprobs = torch.empty(rows, dtype=torch.int64), torch.empty(rows)
    dead = torch.empty(rows, dtype=torch.uint8)
    _library().sample_rows_masked(logits.data_ptr(), rows, vocab, temperature.data_ptr(), uniforms.data_ptr(),
                                  greedy.data_ptr(), bits.data_ptr(), bits.shape[1], tokens.data_ptr(),
                                  logprobs.data_ptr(), dead.data_ptr())
    return tokens, logprobs, dead.bool()


def mask_rows_by_bits(logits: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """In place on logits [N, vocab] (contiguous float32): rows [R] int64 get -inf wherever their packed
    allowed-token bits [R, words] int32 are clear. -> bool [R]: rows left with nothing finite."""
    assert logits.is_contiguous() and rows.dtype == torch.int64 and bits.dtype == torch.int32 and bits.is_contiguous()
    dead = torch.zeros(rows.numel(), dtype=torch.uint8)
    _library().mask_rows_by_bits(logits.data_ptr(), logits.shape[1], rows.contiguous().data_ptr(), rows.numel(),
                                 bits.data_ptr(), bits.shape[1], dead.data_ptr())
    return dead.bool()


PANEL = 16   # columns per packed weight panel (gemm.c)


def pack_panels(weight_t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight_t [in, out] float32 -> the panel layout gemm_panels reads (flat, zero padded), into `out`
    when it is a buffer of that size (an earlier packing of the same matrix)."""
    in_features, out_features = weight_t.shape
    weight_t = weight_t.contiguous()
    size = -(-out_features // PANEL) * in_features * PANEL
    packed = out if out is not None and out.numel() == size else weight_storage(size, torch.float32)
    _library().pack_panels(weight_t.data_ptr(), in_features, out_features, packed.data_ptr())
    return packed


class QuantSegment(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("kind", ctypes.c_int64), ("block", ctypes.c_int64),
                ("scale_bytes", ctypes.c_int64), ("columns", ctypes.c_int64)]


QUANT_MAX_SEGMENTS = 4


class LinearWeights(ctypes.Structure):
    """One linear layer as linear_product reads it (models/kernels/linear.h): float32 panels, or segments
    of columns in quantized blocks. The tensors it points into must outlive it."""

    _fields_ = [("panels", ctypes.c_void_p), ("segments", ctypes.c_int64),
                ("segment", QuantSegment * QUANT_MAX_SEGMENTS)]


def stream_read(buffer: torch.Tensor) -> float:
    """Read every float of a contiguous float32 buffer once, on the kernels' threads (the sum of its
    elements): the memory bandwidth probe of the benchmarks' rooflines (memory_probe.c)."""
    assert buffer.dtype == torch.float32 and buffer.is_contiguous()
    return _library().read_bandwidth_probe(buffer.data_ptr(), buffer.numel())


def bf16_products_supported() -> bool:
    """Whether bfloat16 weights run here (the kernels were built for a CPU with AVX512_BF16)."""
    library = _library()
    return library is not None and bool(library.bf16_products_supported())


def linear_product(x: torch.Tensor, weights: LinearWeights, out_features: int, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] (rows may be strided) @ the weights (+ bias [out]) (+ residual [M, out]) -> [M, out]."""
    rows, in_features = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is not None and not residual.is_contiguous():
        residual = residual.contiguous()
    out = torch.empty(rows, out_features, dtype=torch.float32)
    _library().linear_product(x.data_ptr(), rows, in_features, x.stride(0), ctypes.byref(weights), out_features,
                              bias.data_ptr() if bias is not None else None,
                              residual.data_ptr() if residual is not None else None, out.data_ptr())
    return out


def gemm_panels(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """linear_product over float32 panels packed by pack_panels."""
    weights = LinearWeights()
    weights.panels = packed.data_ptr()
    return linear_product(x, weights, out_features, bias, residual)


# The whole decoder stack in one call and the chains on it (decoder.c; tree_verify.c, medusa_chain.c,
# eagle_chain.c): their bindings live in decoder_stack.py and speculating_chains.py.
from models.kernels.decoder_stack import (  # noqa: E402, F401  (re-exported; they call _library above)
    ChainDraws, ChainFeed, DecodeRows, DecoderLayer, DecoderShape, GreedyChain, decoder_forward, decoder_greedy_chain,
    decoder_layers)
from models.kernels.speculating_chains import (  # noqa: E402, F401
    ChainedRounds, EagleChainDraft, EagleChained, EagleDraftCache, MedusaChained, MedusaChainHeads, SpeculatingSequence,
    decoder_eagle_chain, decoder_medusa_chain)
