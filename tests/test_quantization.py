"""Quantized weights kept in their blocks (models/quantization.py, models/kernels/quant_gemm.c): GGUF's
block layouts read as gguf-py reads them, the product against its reference on every row count and shape,
row independence, and the engine on a quantized GGUF file and on int8 at load: groups, speculation, pushes."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from decoding import Engine, SamplingParams
from models import ModelLoadError, kernels
from models import quantization as Q
from test_kernels import needs_kernel
from tiny_models import PROMPTS

GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
BLOCK_FORMATS = sorted(name for name, fmt in Q.FORMATS.items() if fmt.kind != Q.BF16)   # the integer-dot ones


def _raw_blocks(type_name: str, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Bytes of a GGUF tensor: gguf-py's quantizer where it has one, else random blocks with sane float16
    scales (every bit pattern of the values and six-bit scales is a valid block)."""
    rng = np.random.default_rng(seed)
    kind = GGMLQuantizationType[type_name]
    if type_name in ("Q8_0", "Q4_0", "Q4_1"):
        return quants.quantize(rng.standard_normal((rows, columns)).astype(np.float32), kind)
    block_bytes, block_values, _ = Q.GGUF_TYPES[type_name]
    raw = rng.integers(0, 256, size=(rows, columns // block_values, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, size=raw.shape[:2] + (2,)).astype(np.float16).view(np.uint8)
    if type_name == "Q4_K":
        raw[..., 0:4] = scales.reshape(*raw.shape[:2], 4)
    else:
        raw[..., 208:210] = scales[..., 0:2]
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_gguf_blocks_read_as_gguf_py_dequantizes_them(type_name):
    raw = _raw_blocks(type_name, 6, 512)
    expected = quants.dequantize(raw, GGMLQuantizationType[type_name])
    blocks = Q.from_gguf(torch.from_numpy(raw), type_name, 512)
    assert blocks.format.name == type_name.lower()
    torch.testing.assert_close(blocks.dequantize(), torch.from_numpy(expected), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1"])
def test_load_quantizers_make_the_blocks_llama_cpp_makes(name):
    weight = torch.randn(8, 256)
    raw = quants.quantize(weight.numpy(), GGMLQuantizationType[name.upper()])
    stored = Q.from_gguf(torch.from_numpy(raw), name.upper(), 256).dequantize()
    assert torch.equal(Q.quantize(weight, Q.FORMATS[name]).dequantize(), stored)


def _segments(parts: list[Q.QuantizedBlocks]) -> tuple[kernels.LinearWeights, list[torch.Tensor]]:
    weights, storage = kernels.LinearWeights(), []
    for index, blocks in enumerate(parts):
        storage.append(Q.pack(blocks))
        weights.segment[index] = kernels.QuantSegment(storage[-1].data_ptr(), blocks.format.kind, blocks.format.block,
                                                      blocks.format.scale_dtype.itemsize, blocks.shape[0])
    weights.segments = len(parts)
    return weights, storage


def _quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the product sees it: per block of 32 inputs, round(x * 127 / max|x|) * max|x| / 127."""
    pad = -x.shape[1] % 32
    blocks = torch.nn.functional.pad(x, (0, pad)).view(x.shape[0], -1, 32)
    top = blocks.abs().amax(-1, keepdim=True)
    values = torch.round(blocks * torch.where(top > 0, 127 / top, torch.zeros_like(top)))
    return (values * (top / 127)).view(x.shape[0], -1)[:, : x.shape[1]]


@needs_kernel
@pytest.mark.parametrize("name", BLOCK_FORMATS)
@pytest.mark.parametrize("rows,in_features,out_features", [(1, 64, 16), (3, 80, 40), (13, 256, 200), (70, 96, 33),
                                                         (133, 64, 24)])
def test_quantized_product_matches_its_reference_and_every_row_is_its_own(name, rows, in_features, out_features):
    torch.manual_seed(rows * 7 + in_features)
    fmt = Q.FORMATS[name]
    blocks = Q.quantize(torch.randn(out_features, in_features), fmt)   # zero padded to whole blocks
    weights, _storage = _segments([blocks])
    x, bias, residual = torch.randn(rows, in_features), torch.randn(out_features), torch.randn(rows, out_features)
    y = kernels.linear_product(x, weights, out_features, bias, residual)
    expected = _quantized_rows(x) @ blocks.dequantize()[:, :in_features].t() + bias + residual
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    alone = torch.cat([kernels.linear_product(x[i : i + 1], weights, out_features, bias, residual[i : i + 1])
                       for i in range(rows)])
    assert torch.equal(alone, y)


@needs_kernel
def test_a_fused_matrix_of_several_formats_is_its_parts_side_by_side():
    torch.manual_seed(0)
    parts = [Q.quantize(torch.randn(48, 128), Q.FORMATS["q4_k"]), Q.quantize(torch.randn(20, 128), Q.FORMATS["q6_k"]),
             Q.quantize(torch.randn(16, 128), Q.FORMATS["q8_0"])]
    fused, _storage = _segments(parts)
    x = torch.randn(5, 128)
    alone = [_segments([part]) for part in parts]
    separate = [kernels.linear_product(x, weights, part.shape[0]) for (weights, _), part in zip(alone, parts)]
    assert torch.equal(kernels.linear_product(x, fused, 84), torch.cat(separate, dim=1))


def _greedy(engine: Engine, prompts, tokens: int = 12):
    params = SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens)
    return [out.outputs[0].token_ids for out in engine.generate(prompts, params)]


def _mean_kl(reference: Engine, engine: Engine, prompts) -> float:
    """KL(reference || engine) per token over every position of the prompts."""
    from benchmarks.fidelity import compare     # (the repository root is not on the path of a class run)
    return compare(reference, engine, prompts)["kl_mean"]


@pytest.fixture(scope="module")
def q8_gguf(llama_dir, tmp_path_factory):
    from pathlib import Path

    from gguf_files import write_llama_gguf
    return str(write_llama_gguf(Path(llama_dir), tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf", "Q8_0"))


@needs_kernel
def test_a_q8_0_gguf_runs_in_its_blocks_close_to_its_float_weights(q8_gguf):
    engine = Engine(model=q8_gguf, show_progress=False, num_kv_blocks=128, block_size=4)
    float_engine = Engine(model=q8_gguf, show_progress=False, num_kv_blocks=128, block_size=4, quantization="none")
    matrices = 7 * engine.loaded.config.num_hidden_layers + 1      # q k v o gate up down per layer, the head
    assert engine.loaded.quantization == f"gguf: q8_0 x {matrices}" and float_engine.loaded.quantization is None
    prompts = [list(p) for p in PROMPTS]
    assert _mean_kl(float_engine, engine, prompts) < 1e-3
    # every row is its own: a prompt decodes the same alone, in a batch and as a group
    alone = [_greedy(engine, [prompt])[0] for prompt in prompts]
    assert _greedy(engine, prompts) == alone
    group = engine.generate([prompts[0]], SamplingParams(temperature=0, n=3, max_tokens=12, min_tokens=12))[0]
    assert [c.token_ids for c in group.outputs] == [alone[0]] * 3


@needs_kernel
def test_speculation_on_a_quantized_model_is_lossless(llama_dir):
    plain = Engine(model=llama_dir, show_progress=False, num_kv_blocks=128, block_size=4, quantization="int8")
    speculative = Engine(model=llama_dir, show_progress=False, num_kv_blocks=128, block_size=4, quantization="int8",
                         speculative="ngram", num_speculative_tokens=3)
    prompts = [plain.tokenizer.encode("one two three one two three one two three one two")] + \
        [list(p) for p in PROMPTS]
    assert _greedy(speculative, prompts, 16) == _greedy(plain, prompts, 16)


@needs_kernel
def test_int8_at_load_quantizes_pushed_weights_the_same_way(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil
    from pathlib import Path

    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=128, block_size=4, quantization="int8")
    assert engine.loaded.quantization.startswith("int8: q8_0 x ")
    tensors = load_file(str(Path(llama_dir) / "model.safetensors"))
    torch.manual_seed(1)
    pushed = {name: t + 0.02 * torch.randn_like(t) for name, t in tensors.items() if name.endswith("proj.weight")}
    engine.weights.update(pushed)
    changed = tmp_path / "changed"
    shutil.copytree(llama_dir, changed)
    save_file({**tensors, **pushed}, str(changed / "model.safetensors"))
    fresh = Engine(model=str(changed), show_progress=False, num_kv_blocks=128, block_size=4, quantization="int8")
    prompts = [list(p) for p in PROMPTS]
    assert _greedy(engine, prompts) == _greedy(fresh, prompts)


def test_an_unknown_quantization_is_a_clear_error(llama_dir):
    with pytest.raises(ModelLoadError, match="quantization 'q9' is not supported; use one of"):
        Engine(model=llama_dir, show_progress=False, quantization="q9")


def test_quantization_on_the_transformers_fallback_is_refused(llama_dir):
    with pytest.raises(ModelLoadError, match="cannot run with --quantization int8: it runs on the transformers"):
        Engine(model=llama_dir, show_progress=False, quantization="int8", model_impl="transformers")


@needs_kernel
def test_a_push_into_a_quantized_server_says_how_it_was_kept(llama_dir):
    import httpx

    from live_server import start_server, stop_server
    from wire.safetensors import encode_payload

    live = start_server(llama_dir, engine_options={"quantization": "int8"}, admin_key="admin")
    try:
        models = httpx.get(f"{live.url}/v1/models").json()["data"][0]
        assert models["quantization"].startswith("int8: q8_0 x ")
        weight = live.engine.weights.current(["model.layers.0.mlp.down_proj.weight"])
        pushed = {name: tensor * 1.5 for name, tensor in weight.items()}
        answer = httpx.post(f"{live.url}/v1/weights/update", content=encode_payload(pushed),
                            headers={"Authorization": "Bearer admin", "Content-Type": "application/octet-stream"})
        assert answer.status_code == 200 and answer.json()["quantized_as"] == models["quantization"]
    finally:
        stop_server(live)


needs_bf16 = pytest.mark.skipif(not kernels.bf16_products_supported(),
                                reason="the kernels are not built for a CPU with AVX512_BF16")


@needs_kernel
@needs_bf16
@pytest.mark.parametrize("rows,in_features,out_features", [(1, 64, 16), (5, 80, 40), (19, 256, 200)])
def test_bf16_product_is_bf16_rounded_operands_in_float_and_every_row_is_its_own(rows, in_features, out_features):
    torch.manual_seed(rows)
    blocks = Q.quantize(torch.randn(out_features, in_features), Q.FORMATS["bf16"])
    weights, _storage = _segments([blocks])
    x, bias = torch.randn(rows, in_features), torch.randn(out_features)
    y = kernels.linear_product(x, weights, out_features, bias)
    expected = x.bfloat16().double() @ blocks.values[:, :in_features].double().t() + bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    alone = torch.cat([kernels.linear_product(x[i : i + 1], weights, out_features, bias) for i in range(rows)])
    assert torch.equal(alone, y)


@needs_kernel
@needs_bf16
def test_bf16_weights_decode_close_to_float32_with_exact_batches(llama_dir):
    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=128, block_size=4, quantization="bf16")
    reference = Engine(model=llama_dir, show_progress=False, num_kv_blocks=128, block_size=4)
    assert engine.loaded.quantization.startswith("bf16: bf16 x ")
    prompts = [list(p) for p in PROMPTS]
    assert _mean_kl(reference, engine, prompts) < 1e-3
    assert _greedy(engine, prompts) == [_greedy(engine, [prompt])[0] for prompt in prompts]
