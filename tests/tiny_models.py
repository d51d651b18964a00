"""Tiny random HF models of real architectures, saved to disk so the real `from_pretrained` path runs."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from decoding import Engine, SamplingParams

TRAINING_TEXT = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "import os\nimport sys\n\nfor path in sys.argv[1:]:\n    print(os.path.exists(path))\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n",
    "Prices rose 3.5% in 2024, while wages grew 4.1%: a modest gain for households. Ünïcödé ✓ 日本語",
] * 20

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


def _config(arch: str, vocab_size: int, tok: PreTrainedTokenizerFast):
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4, **ids)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "mistral-sliding":
        return MistralConfig(sliding_window=24, **common)
    raise ValueError(arch)


MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM,
                 "mistral-sliding": MistralForCausalLM, "gpt2": GPT2LMHeadModel}


def save_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """A random model of `arch` with a trained byte-level BPE tokenizer, saved as an HF folder."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = _config(arch, len(tokenizer), tokenizer)
    model = MODEL_CLASSES[arch](config).eval()
    # Random init gives near-uniform logits; sharpen them so greedy paths are not decided by noise.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@functools.cache
def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# Token-id prompts of different lengths, for batched comparisons against HF.
PROMPTS = [[1, 5, 9, 33, 70, 12, 100], [1, 40, 41], list(range(3, 40)), [1, 300, 200, 100, 50, 25, 12, 6, 3]]


def hf_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    """A full teacher-forced HF forward: [len, vocab] float32."""
    with torch.no_grad():
        return hf_model(path)(torch.tensor([token_ids])).logits[0].float()


def assert_target_logprobs(path: str, prompt: list[int], completion, temperature: float = 1.0) -> None:
    """Every returned logprob of `completion` (a CompletionOutput) is the model's own at that position,
    from one fresh forward over prompt + completion (at `temperature`, for processed logprobs)."""
    reference = torch.log_softmax(hf_logits(path, prompt + completion.token_ids) / temperature, -1)
    for i, (token, logprob) in enumerate(zip(completion.token_ids, completion.logprobs)):
        expected = float(reference[len(prompt) - 1 + i, token])
        assert abs(logprob.logprob - expected) <= 1e-4, (i, logprob.logprob, expected)


def within_binomial_bounds(draws: list[int], q: torch.Tensor) -> bool:
    """Every token's count among `draws` is plausible under Binomial(len(draws), q[token]) (two-sided tail
    above 1e-7): the exact test, since a normal approximation misjudges tokens with n * q far below 1
    drawn once."""
    n = len(draws)
    counts = torch.bincount(torch.tensor(draws), minlength=q.numel()).double()
    q = q.double().clamp(0, 1).unsqueeze(1)
    k = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (torch.lgamma(torch.tensor(n + 1.0)) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
               + torch.xlogy(k, q) + torch.xlogy(n - k, 1 - q))                      # [vocab, n + 1]
    pmf = log_pmf.exp()
    below = (pmf * (k <= counts.unsqueeze(1))).sum(1)
    above = (pmf * (k >= counts.unsqueeze(1))).sum(1)
    return bool((2 * torch.minimum(below, above) > 1e-7).all())


def assert_lossless_sampling_follows_the_target(path: str, engine, prompt: list[int] = PROMPTS[2],
                                                temperature: float = 0.1, runs: int = 1500,
                                                min_kept: float = 0.02) -> None:
    """End to end, a lossless speculating engine's verifier and proposer together: over `runs` seeds from
    one prompt, the first and second tokens a speculating step emits (the request's second and third)
    follow the target's own distribution given what came before, by an exact binomial test per token
    (each given the most frequent tokens before it). T = 0.1 puts most of the tiny model's mass on a
    few tokens, so a trained draft's candidates are kept often enough (at least `min_kept` per run) to
    test that path as well as the residual's."""
    outputs = []
    for first_seed in range(0, runs, 100):
        params = [SamplingParams(temperature=temperature, max_tokens=3, seed=seed)
                  for seed in range(first_seed, first_seed + 100)]
        outputs += [out.outputs[0].token_ids for out in engine.generate([prompt] * 100, params)]
    assert engine.speculation.counters.num_draft_tokens > 0
    assert engine.speculation.counters.num_accepted_tokens >= min_kept * runs, engine.speculation.counters
    context = list(prompt)
    for position in (1, 2):
        previous = [tokens[position - 1] for tokens in outputs if tokens[: position - 1] == context[len(prompt):]]
        context.append(max(set(previous), key=previous.count))
        draws = [tokens[position] for tokens in outputs if tokens[:position] == context[len(prompt):]]
        assert len(draws) >= 200, (position, len(draws))
        p = torch.softmax(hf_logits(path, context)[-1].double() / temperature, -1)
        assert within_binomial_bounds(draws, p), (position, context)


def recorded_proposals(engine) -> list:
    """A list that every proposal the engine's proposer makes from now on is appended to."""
    proposer, seen = engine.speculation.proposer, []
    propose = proposer.propose

    def recording(seqs, max_tokens):
        proposals = propose(seqs, max_tokens)
        seen.extend(proposals)
        return proposals

    proposer.propose = recording
    return seen


def assert_seeded_speculation(path: str, make_engine, prompt: list[int], params) -> None:
    """A seeded sampled request on a speculating engine (`make_engine()`, twice): the same tokens both times,
    drafts made, and the target's own logprobs at the request's temperature."""
    engine = make_engine()
    [first] = engine.generate([prompt], params)
    [again] = make_engine().generate([prompt], params)
    assert first.outputs[0].token_ids == again.outputs[0].token_ids           # seeded: reproducible
    assert engine.speculation.counters.num_draft_tokens > 0
    assert_target_logprobs(path, prompt, first.outputs[0], params.temperature)


def assert_chained_steps_keep_the_proposer_in_step(path: str, make_engine) -> None:
    """Two requests on `make_engine(decode_steps=N)` with speculation off while both run
    (speculative_disable_by_batch_size 1): chained plain steps (N = 8) leave the proposer where single
    steps (N = 1) do, so once the shorter request ends and it proposes again, its proposals and the tokens
    are the single-stepping engine's, and the tokens plain greedy decoding's of the model at `path`."""
    params = [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)]
    runs = []
    for decode_steps in (8, 1):
        engine = make_engine(speculative_disable_by_batch_size=1, decode_steps=decode_steps)
        proposals = recorded_proposals(engine)
        outputs = engine.generate([PROMPTS[0], PROMPTS[1]], params)
        runs.append((engine, [o.outputs[0].token_ids for o in outputs], [p.token_ids for p in proposals]))
    (chained, tokens, proposals), (_, single_tokens, single_proposals) = runs
    assert chained.multi_step.num_calls > 0 and proposals
    assert (tokens, proposals) == (single_tokens, single_proposals)
    plain = Engine(model=path, show_progress=False, num_kv_blocks=256, block_size=4, decode_steps=1)
    assert tokens == [o.outputs[0].token_ids for o in plain.generate([PROMPTS[0], PROMPTS[1]], params)]


def assert_chain_runs_as_single_steps(make_engine, path: str, params, prompts: list | None = None) -> list:
    """Each prompt alone on `make_engine()` (a lone request's speculating rounds chained:
    decoding/speculative/chain.py) and on the same engine with the native chain off: the same tokens and
    logprobs, the same drafts and acceptance counts at every depth, every block of the target's cache back;
    sampled requests also emit plain sampling's tokens and logprobs on the model at `path` (greedy ones: HF's
    greedy tokens). -> the chained engine's outputs."""
    prompts = prompts or PROMPTS[:3]
    runs, engines = [], []
    for native in (True, False):
        engine = make_engine()
        engine.speculating_chain.available = native and engine.speculating_chain.available
        outputs = [engine.generate([prompt], params)[0].outputs[0] for prompt in prompts]
        counters = engine.speculation.counters
        logprobs = [None if o.logprobs is None else [lp.logprob for lp in o.logprobs] for o in outputs]
        runs.append(([o.token_ids for o in outputs], logprobs, counters.num_drafts, counters.num_draft_tokens,
                     counters.accepted_per_position))
        chain = engine.speculating_chain
        assert (chain.num_calls > 0 and chain.num_rounds > chain.num_calls) == native
        assert engine.cache_usage().num_used_blocks == 0
        engines.append(engine)
    assert runs[0] == runs[1]
    if params.temperature == 0:
        assert runs[0][0] == [hf_greedy(path, prompt, params.max_tokens) for prompt in prompts]
    else:
        plain = Engine(model=path, show_progress=False, num_kv_blocks=256, block_size=4)
        expected = [plain.generate([prompt], params)[0].outputs[0] for prompt in prompts]
        assert runs[0][0] == [o.token_ids for o in expected]
        assert runs[0][1] == [None if o.logprobs is None else [lp.logprob for lp in o.logprobs] for o in expected]
    return engines


def assert_speculating_chain_ends_where_plain_ends(engine, path: str, sampled_stop: bool = False) -> None:
    """On `engine` (a lone request's speculating rounds chained: decoding/speculative/chain.py): stop
    strings, stop tokens held back by min_tokens, and max_tokens reached inside a round end the request where
    plain decoding of the model at `path` ends it, with the same text and finish reason (`sampled_stop`: a
    sampled request's stop token held back too); the chain ran, every block came back, and a streamed request
    gets its tokens round by round."""
    plain = Engine(model=path, show_progress=False, num_kv_blocks=256, block_size=4)
    greedy = plain.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
    stop_token, stop_text = greedy.token_ids[5], greedy.text[6:9]
    cases = [SamplingParams(temperature=0, max_tokens=30, stop=[stop_text]),
             SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_token], min_tokens=9),
             SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_token]),
             SamplingParams(temperature=0, max_tokens=7)]
    if sampled_stop:
        sampled = plain.generate([PROMPTS[0]], SamplingParams(temperature=0.8, seed=2, max_tokens=30))[0].outputs[0]
        cases.append(SamplingParams(temperature=0.8, seed=2, max_tokens=30, stop_token_ids=[sampled.token_ids[4]],
                                    min_tokens=12))
    for params in cases:
        [expected] = plain.generate([PROMPTS[0]], params)
        [output] = engine.generate([PROMPTS[0]], params)
        assert [(o.token_ids, o.text, o.finish_reason) for o in output.outputs] == \
               [(o.token_ids, o.text, o.finish_reason) for o in expected.outputs]
    assert engine.speculating_chain.num_calls > 0
    assert engine.cache_usage().num_used_blocks == 0
    request_id = engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, min_tokens=40))
    chunks = []
    while engine.has_unfinished_requests():
        chunks += [len(out.outputs[0].token_ids) for out in engine.step() if out.request_id == request_id]
    assert chunks[-1] == 40 and len(chunks) > 3 and chunks == sorted(chunks)


def finished_together(engine, prompts: list, params: list) -> list:
    """Every request submitted at once (sharing the engine's steps), stepped to the end: their final
    RequestOutputs, in order."""
    request_ids = [engine.add_request(prompt, param) for prompt, param in zip(prompts, params)]
    finished = {}
    while engine.has_unfinished_requests():
        finished |= {out.request_id: out for out in engine.step() if out.finished}
    return [finished[request_id] for request_id in request_ids]


def assert_same_steps_match(engine, plain, prompts: list, params: list) -> None:
    """The requests submitted together to `engine` (sharing its steps) end as each does alone on `plain`:
    the same tokens, text and finish reason for every sequence."""
    for output, prompt, param in zip(finished_together(engine, prompts, params), prompts, params):
        [expected] = plain.generate([prompt], param)
        assert [(o.token_ids, o.text, o.finish_reason) for o in output.outputs] == \
               [(o.token_ids, o.text, o.finish_reason) for o in expected.outputs]


def hf_greedy(path: str, prompt: list[int], new_tokens: int) -> list[int]:
    ids = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)
    return ids[0, len(prompt):].tolist()


def assert_quantized_speculation_is_plain_decoding(path: str, make_engine) -> None:
    """A tree proposer over int8 weights (`make_engine(quantization="int8")`) verifies with rows that are the
    plain int8 engine's decode rows bit for bit: greedy and seeded sampled requests (exact acceptance) get
    plain decoding's tokens and the very same logprobs."""
    plain = Engine(model=path, show_progress=False, num_kv_blocks=256, block_size=4, quantization="int8",
                   decode_steps=1)
    engine = make_engine(quantization="int8")
    assert engine.loaded.quantization is not None
    for params in (SamplingParams(temperature=0, max_tokens=24, min_tokens=24, logprobs=0, logprobs_mode="raw"),
                   SamplingParams(temperature=0.7, max_tokens=24, min_tokens=24, seed=5, n=2, logprobs=0)):
        for got, expected in zip(engine.generate(PROMPTS[:3], params), plain.generate(PROMPTS[:3], params)):
            for completion, reference in zip(got.outputs, expected.outputs):
                assert completion.token_ids == reference.token_ids
                assert [lp.logprob for lp in completion.logprobs] == [lp.logprob for lp in reference.logprobs]
    assert engine.speculation.counters.num_accepted_tokens > 0
