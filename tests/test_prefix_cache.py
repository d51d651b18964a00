"""Prefix caching (decoding/kv_cache_manager.py): full blocks outlive their request, a request that starts
with them computes only the rest, and every output equals the output without the cache."""

import pytest
import torch

from decoding import Engine, SamplingParams

SYSTEM = [1] + [17, 93, 4, 250, 61, 8, 120, 33, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53]   # 23 tokens
TURNS = [SYSTEM + [60, 61, 62], SYSTEM + [70, 71], SYSTEM + [60, 61, 62, 63, 64, 65, 66, 67, 68]]


def engines(llama_dir, **options):
    """(cache on, cache off), otherwise alike."""
    return tuple(Engine(model=llama_dir, show_progress=False, block_size=4, prefix_caching=on,
                        **{"num_kv_blocks": 128, **options}) for on in (True, False))


def run_in_turn(engine, prompts, params):
    """One request after another, as turns of a conversation arrive."""
    return [engine.generate([prompt], params)[0].outputs for prompt in prompts]


def assert_same(cached, plain):
    for outs_c, outs_p in zip(cached, plain):
        for c, p in zip(outs_c, outs_p):
            assert c.token_ids == p.token_ids
            if p.logprobs:
                assert [lp.logprob for lp in c.logprobs] == pytest.approx([lp.logprob for lp in p.logprobs], abs=1e-5)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=12, logprobs=2),
    SamplingParams(temperature=0.9, seed=7, max_tokens=12, n=3, logprobs=0),
    SamplingParams(use_beam_search=True, num_beams=3, temperature=0, max_tokens=8),
], ids=["greedy", "group", "beams"])
def test_outputs_equal_the_outputs_without_the_cache(llama_dir, params):
    cached, plain = engines(llama_dir)
    got, expected = run_in_turn(cached, TURNS, params), run_in_turn(plain, TURNS, params)
    assert_same(got, expected)
    # The shared 23-token prefix is 5 full blocks of 4; the later turns find them.
    assert cached.kv.prefixes.hits >= 2 * 20
    assert cached.counters.num_prompt_tokens_computed < plain.counters.num_prompt_tokens_computed
    assert plain.kv.prefixes.hits == 0


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "yy"]}},
          "required": ["a", "b"], "additionalProperties": False}


@pytest.mark.parametrize("mode", ["draft", "ngram", "medusa", "constrained"])
def test_speculation_and_constraints_equal_their_outputs_without_the_cache(llama_dir, tmp_path, mode):
    """The draft model keeps its own cache (not prefix-cached: it catches up on the whole prompt), Medusa
    reads the target's hidden state of the last prompt row (always computed), and a grammar's cursor
    does not depend on how the prompt was computed."""
    options = {"draft": dict(speculative="draft", draft_model=llama_dir),
               "ngram": dict(speculative="ngram"), "constrained": {}}.get(mode)
    if mode == "medusa":
        from models.medusa import MedusaHeads
        torch.manual_seed(0)
        heads = MedusaHeads(64, 384, num_heads=3)
        with torch.no_grad():
            for param in heads.parameters():
                param.normal_(0, 0.2)
        heads.save(tmp_path, llama_dir)
        options = dict(speculative="medusa", medusa_heads=str(tmp_path))
    cached, plain = engines(llama_dir, **options)
    constraint = {"json_schema": SCHEMA} if mode == "constrained" else {}
    for params in (SamplingParams(temperature=0, max_tokens=12, logprobs=0, **constraint),
                   SamplingParams(temperature=0.8, seed=5, max_tokens=12, logprobs=0, **constraint)):
        if mode == "medusa" and params.temperature > 0:
            continue                      # typical acceptance draws differently from plain sampling
        assert_same(run_in_turn(cached, TURNS, params), run_in_turn(plain, TURNS, params))
    assert cached.kv.prefixes.hits > 0


def test_prompt_logprobs_are_computed_for_every_position(llama_dir):
    cached, plain = engines(llama_dir)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)
    got = [cached.generate([p], params)[0].prompt_logprobs for p in TURNS]
    expected = [plain.generate([p], params)[0].prompt_logprobs for p in TURNS]
    for g, e in zip(got, expected):
        assert [x and x.logprob for x in g] == pytest.approx([x and x.logprob for x in e], abs=1e-5)


def test_a_tight_cache_evicts_and_preempts_and_stays_exact(llama_dir):
    """12 usable blocks: every turn's own blocks push older ones out (least recently released first),
    and concurrent requests preempt one another."""
    cached, plain = engines(llama_dir, num_kv_blocks=13, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=10)
    prompts = [SYSTEM[: 9 + 3 * i] + [80 + i] for i in range(6)]
    assert_same([o.outputs for o in cached.generate(prompts, params)],
                [o.outputs for o in plain.generate(prompts, params)])
    assert_same(run_in_turn(cached, TURNS * 2, params), run_in_turn(plain, TURNS * 2, params))
    assert cached.cache_usage().num_used_blocks == 0        # cached blocks count as free


def test_a_weight_update_drops_the_cache(llama_dir):
    """Pushed weights between two identical requests: the second equals a fresh engine's output under
    the new weights, not one that attends to keys and values the old weights computed."""
    cached, _ = engines(llama_dir)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0)
    cached.generate([TURNS[0]], params)
    name = "model.layers.0.self_attn.k_proj.weight"
    new = {name: torch.randn_like(dict(cached_weights(llama_dir))[name]) * 0.5}
    cached.weights.update(new)
    hits_before = cached.kv.prefixes.hits
    second = cached.generate([TURNS[0]], params)[0].outputs[0]
    assert cached.kv.prefixes.hits == hits_before             # nothing cached survived the update
    fresh = Engine(model=llama_dir, show_progress=False, block_size=4, num_kv_blocks=128)
    fresh.weights.update(new)
    expected = fresh.generate([TURNS[0]], params)[0].outputs[0]
    assert second.token_ids == expected.token_ids
    assert [lp.logprob for lp in second.logprobs] == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-5)


def cached_weights(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).state_dict().items()


def test_over_http_usage_metrics_and_the_reset_route(llama_dir):
    """The second turn reports its cached prompt tokens (OpenAI's usage field), /metrics counts lookups and
    hits (vLLM's names), and the admin route drops the cache."""
    import httpx
    from live_server import start_server, stop_server
    live = start_server(llama_dir, admin_key="admin")
    try:
        def complete():
            body = {"model": "tiny", "prompt": TURNS[0], "max_tokens": 4, "temperature": 0}
            return httpx.post(f"{live.url}/v1/completions", json=body, timeout=60).json()["usage"]

        assert complete()["prompt_tokens_details"]["cached_tokens"] == 0
        assert complete()["prompt_tokens_details"]["cached_tokens"] == 24      # 6 full blocks of 4, of 26
        metrics = httpx.get(f"{live.url}/metrics").text
        assert "gorgon:prefix_cache_hits_total 24.0" in metrics
        assert "gorgon:prefix_cache_queries_total 52.0" in metrics
        assert httpx.post(f"{live.url}/v1/reset_prefix_cache").status_code == 401
        reset = httpx.post(f"{live.url}/v1/reset_prefix_cache", headers={"Authorization": "Bearer admin"})
        assert reset.status_code == 200 and reset.json() == {"reset": True}
        assert complete()["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        stop_server(live)


def test_prompts_that_arrive_together_compute_their_common_prefix_once(llama_dir):
    """Eight requests with one 41-token prompt prefix, added at once: the first computes the prefix and the
    others wait until it is cached (a step or so), instead of all computing it in the same step."""
    cached, plain = engines(llama_dir)
    prompts = [SYSTEM + SYSTEM[:18] + [90 + i] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=6)
    assert_same([o.outputs for o in cached.generate(prompts, params)],
                [o.outputs for o in plain.generate(prompts, params)])
    whole = sum(len(p) for p in prompts)
    assert plain.counters.num_prompt_tokens_computed == whole
    # The shared 41 tokens hold 10 full blocks of 4; each later prompt computes only its last 2 tokens.
    assert cached.counters.num_prompt_tokens_computed == len(prompts[0]) + 7 * 2


def test_cached_prefixes_go_first_but_no_request_waits_unboundedly(llama_dir):
    """One request at a time is admitted (max_num_seqs 1). Behind an uncached request wait eight that
    start with a cached prefix: they go ahead of it, at most MAX_BYPASSES times."""
    from decoding.scheduler import MAX_BYPASSES
    engine = Engine(model=llama_dir, show_progress=False, block_size=4, num_kv_blocks=128, max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=2)
    engine.generate([SYSTEM + [60]], params)                       # the system prompt is now cached
    uncached = engine.add_request([5, 6, 7, 8, 9, 10, 11, 12, 13], params)
    cached = [engine.add_request(SYSTEM + [70 + i], params) for i in range(8)]
    order = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
    assert order.index(uncached) == MAX_BYPASSES                   # passed over exactly that often
    assert order[:MAX_BYPASSES] == cached[:MAX_BYPASSES]
    assert sorted(order) == sorted([uncached, *cached])
