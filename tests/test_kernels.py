"""The native kernels against the torch ops they replace (decode attention against SDPA over gathered
blocks, the fused layer ops, the sampling kernel), packed weights, and the engine on both paths."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from decoding import Engine, SamplingParams
from models import kernels
from models.attention import decode_mask
from models.kernels import native_decode_available, paged_decode_attention
from models.layers import FusedLinear, RotaryEmbedding, apply_rotary, rms_norm
from tiny_models import PROMPTS, hf_greedy

needs_kernel = pytest.mark.skipif(
    (shutil.which("cc") is None and shutil.which("gcc") is None) or os.environ.get("GORGON_NATIVE_KERNELS") == "0",
    reason="no C compiler to build the native kernels, or they are switched off")


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
    (1, 9, 3, 64, 16, None),      # one sequence of SmolLM2's shape: query heads shared out among the threads
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


def _relaid_cache(keys: torch.Tensor, values: torch.Tensor, block_size: int, generator, spare: int = 0):
    """Positions [L, kv_heads, d] laid out in a paged cache of this block size over shuffled blocks (block 0
    the null block), `spare` positions more allocated after them -> (key cache, value cache, table [1, n])."""
    length = keys.shape[0] + spare
    used = (length + block_size - 1) // block_size
    table = torch.randperm(used, generator=generator) + 1
    key_cache = torch.zeros(used + 1, block_size, *keys.shape[1:])
    value_cache = torch.zeros_like(key_cache)
    for pos in range(keys.shape[0]):
        key_cache[table[pos // block_size], pos % block_size] = keys[pos]
        value_cache[table[pos // block_size], pos % block_size] = values[pos]
    return key_cache, value_cache, table.view(1, -1)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,window,softcap,sinks", [
    (9, 3, 64, None, None, False),     # SmolLM2's shape
    (4, 4, 128, None, None, False),
    (8, 2, 36, 11, None, False),       # a head_dim off the 8-lane grid, a sliding window
    (6, 2, 64, None, 30.0, True),      # Gemma 2's soft-capping, gpt-oss's sinks
    (4, 4, 16, None, None, False),     # the tests' tiny models: a head_dim under a 32-float tile
])
def test_a_token_attends_alike_whatever_kernel_step_and_block_size(heads, kv_heads, head_dim, window, softcap, sinks):
    """A token's attention output is the same bits whether its prompt is prefilled whole, in chunks, or the
    token is a decode row, a speculative tree node (its ancestors at scattered slots), under any block
    size: what makes rollout logprobs reproducible by a trainer (decoding/matched_forward.py)."""
    generator = torch.Generator().manual_seed(head_dim + heads)
    length, scale = 75, head_dim ** -0.5
    keys = torch.randn(length, kv_heads, head_dim, generator=generator)
    values = torch.randn(length, kv_heads, head_dim, generator=generator)
    query = torch.randn(length, heads, head_dim, generator=generator)
    head_sinks = torch.randn(heads, generator=generator) if sinks else None
    options = dict(softcap=softcap, sinks=head_sinks)

    def prefill(key_cache, value_cache, table, chunks):
        out = torch.full((length, heads, head_dim), float("nan"))
        start = 0
        for count in chunks:
            q_starts, counts, cached = (torch.tensor([v]) for v in (start, count, start))
            kernels.paged_prefill_attention(query, key_cache, value_cache, q_starts, counts, cached, table, scale,
                                            window, out, **options)
            start += count
        return out

    key_cache, value_cache, table = _relaid_cache(keys, values, 16, generator)
    whole = prefill(key_cache, value_cache, table, [length])
    if not (softcap or sinks):
        expected = reference_attention(query, key_cache, value_cache, table.expand(length, -1).contiguous(),
                                       torch.arange(1, length + 1), scale, window)
        torch.testing.assert_close(whole, expected, atol=3e-6, rtol=1e-5)
    assert torch.equal(prefill(key_cache, value_cache, table, [5, 16, 1, 30, 23]), whole)
    rows = paged_decode_attention(query, key_cache, value_cache, table.expand(length, -1).contiguous(),
                                  torch.arange(1, length + 1), scale, window, **options)
    assert torch.equal(rows, whole)
    # One row alone: its query heads shared out among the threads where its KV heads cannot be evenly
    threads = kernels.num_threads()
    try:
        for count in (2, 3):
            kernels.set_num_threads(count)
            for pos in (0, 16, 40, length - 1):
                alone = paged_decode_attention(query[pos : pos + 1], key_cache, value_cache, table,
                                               torch.tensor([pos + 1]), scale, window, **options)
                assert torch.equal(alone, whole[pos : pos + 1])
    finally:
        kernels.set_num_threads(threads)
    for block_size in (4, 64):
        relaid = _relaid_cache(keys, values, block_size, generator)
        assert torch.equal(prefill(*relaid, [length - 9, 9]), whole)
    # Tree nodes: positions [context, p] are ancestors written to spare slots after the sequence.
    key_cache, value_cache, table = _relaid_cache(keys, values, 16, generator, spare=20)
    context, ancestors = 60, torch.tensor([80, 71, 90, 77, 84, 93, 88, 79, 72, 91, 85, 74, 82, 75, 89])
    for extra, pos in zip(ancestors, range(context, length)):
        block, slot = table[0, int(extra) // 16], int(extra) % 16
        key_cache[block, slot], value_cache[block, slot] = keys[pos], values[pos]
    depth = length - context
    nodes = paged_decode_attention(query[context:], key_cache, value_cache, table.expand(depth, -1).contiguous(),
                                   torch.full((depth,), context), scale, window, ancestors.expand(depth, -1).contiguous(),
                                   torch.arange(1, depth + 1), **options)
    assert torch.equal(nodes, whole[context:])


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
        engine.loaded.model.native_ops = native
        results.append(engine.generate(PROMPTS, params))
    for native_out, torch_out in zip(*results):
        for a, b in zip(native_out.outputs, torch_out.outputs):
            assert a.token_ids == b.token_ids
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.logprob == pytest.approx(y.logprob, abs=1e-5)


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral-sliding", "qwen3"])
def test_one_call_decoder_stack_matches_the_per_layer_kernels(model_dir, arch, monkeypatch):
    """Decode steps run the whole stack in one native call (models/kernels/decoder.c); the per-layer
    path runs the same kernels one by one, so tokens and logprobs agree exactly. The models cover a
    q/k/v bias (Qwen2), a sliding window (Mistral) and per-head q/k norms (Qwen3)."""
    import models.decoder

    path = model_dir(arch)
    params = SamplingParams(temperature=0.8, max_tokens=12, logprobs=3, seed=5, n=2)
    engine = Engine(model=path, show_progress=False, num_kv_blocks=128, block_size=4)
    fused = engine.generate(PROMPTS, params)
    calls = []
    stack = kernels.decoder_forward
    monkeypatch.setattr(kernels, "decoder_forward", lambda *a, **k: calls.append(1) or stack(*a, **k))
    engine.generate(PROMPTS[:1], SamplingParams(max_tokens=3))
    assert calls, "decode steps should run on the one-call stack"
    monkeypatch.setattr(models.decoder, "_only_decode_group", lambda meta, num_tokens: None)
    per_layer = Engine(model=path, show_progress=False, num_kv_blocks=128, block_size=4).generate(PROMPTS, params)
    for a, b in zip(fused, per_layer):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids
            assert [t.logprob for t in x.logprobs] == [t.logprob for t in y.logprobs]
            assert [t.top for t in x.logprobs] == [t.top for t in y.logprobs]


@needs_kernel
def test_one_call_stack_keeps_only_the_rows_asked_for(llama_dir, monkeypatch):
    """Chains of decode rows whose last rows alone are read (a draft model's catch-up): the stack
    compacts those rows at the last layer, with the same logits as the per-layer path."""
    import models.decoder
    from decoding.step_plan import ScheduledSeq, SchedulerOutput

    engine = Engine(model=llama_dir, show_progress=False, num_kv_blocks=64, block_size=4)
    for prompt in PROMPTS[:2]:
        engine.add_request(prompt, SamplingParams(max_tokens=8))
    engine.step()                                              # both prompts prefilled, a token sampled
    items = []
    for request in engine.scheduler.running:
        seq = request.seqs[0]
        start = seq.num_computed
        seq.token_ids += [5, 7]                                # two more tokens to compute: a 3-token chain
        engine.kv.reserve(seq, 3)
        items.append(ScheduledSeq(seq, start, 3, reaches_end=True))
    stack = engine.runner.execute(SchedulerOutput(scheduled=items))
    whole = engine.runner.execute(SchedulerOutput(scheduled=items, chunk_logits_for={item.seq.seq_id for item in items}))
    monkeypatch.setattr(models.decoder, "_only_decode_group", lambda meta, num_tokens: None)
    per_layer = engine.runner.execute(SchedulerOutput(scheduled=items))
    assert stack.last.shape[0] == 2
    assert torch.equal(stack.last, per_layer.last)
    for item in items:                                         # the chain's last row, read either way
        assert torch.equal(whole.chunk[item.seq.seq_id][-1], stack.last[stack.last_seq_ids.index(item.seq.seq_id)])


@needs_kernel
def test_fused_layer_ops_match_the_torch_ops():
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, rows = 6, 2, 64, 37
    x = torch.randn(rows, 2 * 96, generator=generator)[:, :96]          # strided rows, as a slice
    weight = torch.randn(96, generator=generator)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), atol=1e-6, rtol=1e-5)

    gate_up = torch.randn(rows, 2 * 80, generator=generator) * 4
    expected = F.silu(gate_up[:, :80]) * gate_up[:, 80:]
    torch.testing.assert_close(kernels.silu_mul(gate_up), expected, atol=1e-6, rtol=1e-5)

    rotary = RotaryEmbedding(1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)), 1.0)
    positions = torch.randint(0, 500, (rows,), generator=generator)
    cos, sin = rotary.cos_sin(positions, torch.float32)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator)
    heads_view = qkv.view(rows, -1, head_dim)
    expected_qk = apply_rotary(heads_view[:, : heads + kv_heads], cos, sin)
    expected_v = heads_view[:, heads + kv_heads :].clone()
    key_cache = torch.zeros(20, 4, kv_heads, head_dim)
    value_cache = torch.zeros(20, 4, kv_heads, head_dim)
    slots = torch.randperm(80, generator=generator)[:rows]
    kernels.rotary_write_kv(qkv, cos.squeeze(1).contiguous(), sin.squeeze(1).contiguous(), slots, key_cache, value_cache, heads)
    torch.testing.assert_close(heads_view[:, : heads + kv_heads], expected_qk, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(key_cache.view(80, kv_heads, head_dim)[slots], expected_qk[:, heads:], atol=1e-6, rtol=1e-5)
    assert torch.equal(value_cache.view(80, kv_heads, head_dim)[slots], expected_v)
    untouched = torch.ones(80, dtype=torch.bool)
    untouched[slots] = False
    assert not key_cache.view(80, -1)[untouched].any() and not value_cache.view(80, -1)[untouched].any()


@needs_kernel
def test_sampling_kernel_follows_the_inverse_cdf_rule():
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 64, 1000
    logits = torch.randn(rows, vocab, generator=generator) * 3
    logits[:, :10] = float("-inf")                              # banned: never drawn, even for u = 0
    temperature = torch.rand(rows, generator=generator) + 0.3
    uniforms = torch.rand(rows, generator=generator)
    uniforms[0] = 0.0
    greedy = torch.zeros(rows, dtype=torch.bool)
    greedy[1:4] = True
    want_raw = torch.arange(rows) % 2 == 0
    tokens, logprobs, raw = kernels.sample_rows(logits, temperature, uniforms, greedy, want_raw)

    scale = torch.where(greedy, 1.0, temperature).unsqueeze(1)
    cdf = torch.softmax(logits / scale, -1).cumsum(-1)
    expected = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    expected[greedy] = logits[greedy].argmax(-1)
    assert torch.equal(tokens, expected)
    assert (tokens >= 10).all()
    chosen = tokens.unsqueeze(1)
    torch.testing.assert_close(logprobs, torch.log_softmax(logits / scale, -1).gather(1, chosen).squeeze(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[want_raw], torch.log_softmax(logits, -1).gather(1, chosen).squeeze(1)[want_raw], atol=1e-5, rtol=0)


@needs_kernel
def test_masked_sampling_reads_the_bits_as_masking_would():
    """sample_rows_masked over logits and packed allowed-token bits draws exactly what masking the logits
    and then sample_rows draws (same tokens, same logprobs, bit for bit), and reports rows the bits
    leave nothing finite in."""
    from decoding.structured.grammar import unpack_bits
    generator = torch.Generator().manual_seed(1)
    rows, vocab = 40, 1003                                     # not a multiple of 32: a partial last word
    logits = torch.randn(rows, vocab, generator=generator) * 3
    logits[5, :] = float("-inf")
    logits[5, 7] = 0.0
    bits = torch.randint(-2**31, 2**31 - 1, (rows, 32), dtype=torch.int32, generator=generator)
    bits[3] = 0                                                 # nothing allowed
    bits[4] = 0
    bits[4, 2] = 1 << 5                                         # one token allowed: 69
    bits[5, 0] &= ~(1 << 7)                                     # allowed only where banned
    temperature = torch.rand(rows, generator=generator) + 0.3
    uniforms = torch.rand(rows, generator=generator)
    greedy = torch.arange(rows) % 3 == 0
    tokens, logprobs, dead = kernels.sample_rows_masked(logits, temperature, uniforms, greedy, bits)
    masked = logits.masked_fill(~unpack_bits(bits, vocab), float("-inf"))
    expected, expected_logprobs, _ = kernels.sample_rows(masked, temperature, uniforms, greedy,
                                                         torch.zeros(rows, dtype=torch.bool))
    assert dead.nonzero().flatten().tolist() == [3, 5]
    live = ~dead
    assert torch.equal(tokens[live], expected[live]) and tokens[4] == 69
    assert torch.equal(logprobs[live], expected_logprobs[live])
    assert unpack_bits(bits, vocab)[live].gather(1, tokens[live].unsqueeze(1)).all()


def test_packed_weights_follow_every_write():
    """A pushed weight update writes through the checkpoint slots; the packed copy must not go stale."""
    linear = FusedLinear(64, [48, 80], [False, False], torch.float32, "cpu")
    slots = linear.slots(["a.weight", "b.weight"], [None, None])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=generator)
    for _ in range(2):
        for name, width in (("a.weight", 48), ("b.weight", 80)):
            slots[name].copy_(torch.randn(width, 64, generator=generator))     # HF layout [out, in]
        torch.testing.assert_close(linear(x), x @ linear.weight_t, atol=1e-5, rtol=1e-5)
        residual = torch.randn(5, 128, generator=generator)
        torch.testing.assert_close(linear.forward_residual(x, residual), residual + x @ linear.weight_t, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,window,chunks", [
    (4, 2, 64, 4, None, [(0, 13), (5, 9), (17, 1)]),      # GQA, chunks after a cached prefix, a lone token
    (5, 5, 64, 64, None, [(0, 200), (100, 37)]),         # the embedded model's shape, 64-token blocks
    (8, 2, 32, 16, 20, [(0, 50), (30, 40)]),              # a sliding window shorter than the chunks
    (6, 3, 128, 64, None, [(64, 64)]),
    (14, 2, 64, 64, None, [(1536, 512), (0, 512)]),     # a 0.5B Qwen2's heads: the last chunk of 2,048 tokens
])
def test_prefill_kernel_matches_causal_sdpa(heads, kv_heads, head_dim, block_size, window, chunks):
    """Prompt chunks attend causally over their scattered blocks: chunk s sees its cached prefix and
    itself up to each query, as SDPA does over the gathered keys with the same mask."""
    generator = torch.Generator().manual_seed(heads * head_dim + block_size)
    num_blocks = 200
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    order = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    tables = []
    for cached, count in chunks:
        needed = -(-(cached + count) // block_size)
        tables.append(order[:needed])
        order = order[needed:]
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    counts = torch.tensor([count for _, count in chunks])
    q_starts = counts.cumsum(0) - counts
    total = int(counts.sum())
    query = torch.randn(total, heads + 2 * kv_heads, head_dim, generator=generator)[:, :heads]   # strided rows
    out = torch.zeros(total, heads, head_dim)
    scale = head_dim ** -0.5
    kernels.paged_prefill_attention(query, key_cache, value_cache, q_starts, counts,
                                    torch.tensor([cached for cached, _ in chunks]), block_tables, scale, window, out)
    for s, (cached, count) in enumerate(chunks):
        length = cached + count
        keys = key_cache[block_tables[s]].reshape(-1, kv_heads, head_dim)[:length]
        values = value_cache[block_tables[s]].reshape(-1, kv_heads, head_dim)[:length]
        query_pos, key_pos = torch.arange(cached, length)[:, None], torch.arange(length)[None, :]
        mask = key_pos <= query_pos
        if window is not None:
            mask &= query_pos - key_pos < window
        rows = query[q_starts[s] : q_starts[s] + count]
        expected = F.scaled_dot_product_attention(rows.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                                  values.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                                  enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(out[q_starts[s] : q_starts[s] + count], expected, atol=2e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 9, 11, 12, 13, 40, 300])
@pytest.mark.parametrize("in_features,out_features", [(37, 50), (64, 16), (64, 33), (320, 960), (1500, 40)])
def test_panel_product_matches_matmul(rows, in_features, out_features):
    """Every tile shape of every CPU class (one tile up to 12 rows on AVX-512, 6 on AVX2 and NEON; full
    tiles and a shorter last one beyond), blocks of rows, k split in blocks (over 1,024 inputs), a lone
    last panel, ragged last columns, strided rows, with and without bias and residual."""
    generator = torch.Generator().manual_seed(rows * out_features + in_features)
    weight_t = torch.randn(in_features, out_features, generator=generator)
    packed = kernels.pack_panels(weight_t)
    x = torch.randn(rows, in_features + 3, generator=generator)[:, :in_features]
    bias = torch.randn(out_features, generator=generator)
    residual = torch.randn(rows, out_features, generator=generator)
    tolerance = dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kernels.gemm_panels(x, packed, out_features), x @ weight_t, **tolerance)
    torch.testing.assert_close(kernels.gemm_panels(x, packed, out_features, bias, residual),
                               x @ weight_t + bias + residual, **tolerance)


@needs_kernel
@pytest.mark.parametrize("in_features,out_features", [(320, 960), (864, 320), (1500, 40)])
def test_panel_product_rows_do_not_depend_on_the_other_rows(in_features, out_features):
    """A row's result is bit-identical whether it is multiplied alone (a decode), in a single tile (a
    draft or tree verification) or among hundreds (a prompt chunk): what lossless speculation and
    batch-independent outputs rest on."""
    generator = torch.Generator().manual_seed(in_features)
    weight_t = torch.randn(in_features, out_features, generator=generator)
    packed = kernels.pack_panels(weight_t)
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(300, in_features, generator=generator)
    alone = torch.cat([kernels.gemm_panels(x[i : i + 1], packed, out_features, bias) for i in range(300)])
    for rows in (5, 12, 40, 300):
        assert torch.equal(kernels.gemm_panels(x[:rows], packed, out_features, bias), alone[:rows])


@needs_kernel
def test_kernel_rows_with_extra_positions_attend_like_a_tree_mask():
    """A tree node's row: its context, then its ancestors and itself at scattered later positions."""
    generator = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, block_size, num_blocks = 4, 2, 64, 4, 64
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    table = (torch.randperm(num_blocks - 1, generator=generator)[:10] + 1).tolist()
    cached, parents = 13, (-1, 0, 0, 1, 3)               # a root, two children, a chain below the first
    ancestry = []
    for i, parent in enumerate(parents):
        ancestry.append((ancestry[parent] if parent >= 0 else []) + [i])
    rows = len(parents)
    query = torch.randn(rows, heads, head_dim, generator=generator)
    block_tables = torch.tensor([table] * rows)
    context_lens = torch.full((rows,), cached)
    width = max(len(a) for a in ancestry)
    extra_positions = torch.tensor([[cached + j for j in a] + [0] * (width - len(a)) for a in ancestry])
    extra_counts = torch.tensor([len(a) for a in ancestry])
    out = paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens, 0.125, None,
                                 extra_positions, extra_counts)

    flat_keys = key_cache.index_select(0, torch.tensor(table)).view(-1, kv_heads, head_dim)
    flat_values = value_cache.index_select(0, torch.tensor(table)).view(-1, kv_heads, head_dim)
    for row, ancestors in enumerate(ancestry):
        visible = list(range(cached)) + [cached + j for j in ancestors]
        keys = flat_keys[visible].transpose(0, 1).unsqueeze(0)
        values = flat_values[visible].transpose(0, 1).unsqueeze(0)
        expected = F.scaled_dot_product_attention(query[row].unsqueeze(0).unsqueeze(2), keys, values, scale=0.125,
                                                  enable_gqa=True).squeeze(2).squeeze(0)
        torch.testing.assert_close(out[row], expected, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_threads_option_sets_torch_and_the_kernels(llama_dir):
    before = torch.get_num_threads()
    try:
        engine = Engine(model=llama_dir, threads=1, show_progress=False)
        assert torch.get_num_threads() == 1 and kernels.num_threads() == 1
        [out] = engine.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0))
        assert out.outputs[0].token_ids == hf_greedy(llama_dir, PROMPTS[0], 4)
    finally:
        kernels.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        Engine(model=llama_dir, threads=0, show_progress=False)
