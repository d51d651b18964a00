"""The native decode-attention kernel against SDPA over gathered blocks, and the engine on both paths."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from decoding import Engine, SamplingParams
from models.attention import decode_mask
from models.kernels import native_decode_available, paged_decode_attention
from tiny_models import PROMPTS, hf_greedy

needs_kernel = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                  reason="no C compiler to build the native kernel")


def reference_attention(query, key_cache, value_cache, block_tables, context_lens, scale, window):
    batch, max_blocks = block_tables.shape
    block_size, kv_heads, head_dim = key_cache.shape[1:]
    width = max_blocks * block_size
    keys = key_cache.index_select(0, block_tables.view(-1)).view(batch, width, kv_heads, head_dim)
    values = value_cache.index_select(0, block_tables.view(-1)).view(batch, width, kv_heads, head_dim)
    mask = decode_mask(context_lens, width, window)
    return F.scaled_dot_product_attention(query.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2),
                                          attn_mask=mask, scale=scale, enable_gqa=True).squeeze(2)


@needs_kernel
def test_the_kernel_builds_on_this_machine():
    assert native_decode_available(torch.device("cpu"), torch.float32)


@needs_kernel
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,block_size,window", [
    (1, 4, 4, 64, 16, None),      # one sequence: work split by KV head
    (5, 8, 2, 32, 4, 7),          # GQA with a sliding window, per-head items
    (40, 6, 3, 48, 8, None),      # enough sequences for per-sequence items, odd head_dim
    (40, 8, 2, 128, 16, 9),       # per-sequence items, GQA, window
    (33, 5, 5, 64, 16, None),     # the default model's shape
])
def test_kernel_matches_sdpa_over_gathered_blocks(batch, heads, kv_heads, head_dim, block_size, window):
    generator = torch.Generator().manual_seed(batch * heads + head_dim)
    num_blocks = 256
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    context_lens = torch.randint(1, 70, (batch,), generator=generator)
    max_blocks = int((context_lens.max() + block_size - 1) // block_size)
    block_tables = torch.zeros(batch, max_blocks, dtype=torch.long)   # padded with the null block
    for b in range(batch):
        used = int((context_lens[b] + block_size - 1) // block_size)
        block_tables[b, :used] = torch.randperm(num_blocks - 1, generator=generator)[:used] + 1
    # Queries as the model hands them over: a slice of the fused q/k projection, rows strided.
    fused = torch.randn(batch, heads + kv_heads, head_dim, generator=generator)
    query = fused[:, :heads]
    scale = head_dim ** -0.5
    out = paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale, window)
    expected = reference_attention(query, key_cache, value_cache, block_tables, context_lens, scale, window)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral-sliding", "gpt2"])
def test_pure_torch_decode_path_matches_hf(model_dir, arch):
    """The path used on CUDA and where no compiler exists: gathered blocks, SDPA per length group."""
    path = model_dir(arch)
    engine = Engine(model=path, show_progress=False, num_kv_blocks=128, block_size=4)
    engine.runner.native_decode = False
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=20)
    for prompt, output in zip(PROMPTS, engine.generate(PROMPTS, params)):
        assert output.outputs[0].token_ids == hf_greedy(path, prompt, 20)


@needs_kernel
def test_both_decode_paths_give_the_same_logprobs(llama_dir):
    params = SamplingParams(temperature=0.8, max_tokens=16, logprobs=2, seed=3, n=3)
    results = []
    for native in (True, False):
        engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=128, block_size=4)
        engine.runner.native_decode = native
        results.append(engine.generate(PROMPTS, params))
    for native_out, torch_out in zip(*results):
        for a, b in zip(native_out.outputs, torch_out.outputs):
            assert a.token_ids == b.token_ids
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
