"""Engine configuration: one frozen dataclass, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from decoding.structured.constraint import BACKENDS, EXTRAS, installed_backends

# What a draft head's (EAGLE's, Medusa's) products may run in: float32 panels, or a block format.
DRAFT_HEAD_WEIGHTS = ("float", "q8_0", "q4_0", "q4_1", "bf16")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None              # local folder or hub id; None = the embedded default model
    dtype: str = "float32"
    device: str = "cpu"
    # "auto": the native decoder for a native family, else the transformers fallback; "transformers": the
    # fallback for any model (vLLM's --model-impl transformers)
    model_impl: str = "auto"
    # Weights in quantized blocks (models/quantized_model.py): "auto" keeps a GGUF file's own; "none" runs
    # float32; "int8" (or q8_0, q4_0, q4_1) quantizes a float checkpoint at load.
    quantization: str = "auto"
    block_size: int | None = None         # tokens per KV block; None: 64 on the CPU, 16 elsewhere
    num_kv_blocks: int | None = None      # None: as many as kv_cache_memory_gb holds
    kv_cache_memory_gb: float = 1.0
    # Full KV blocks outlive their request, keyed by their tokens and everything before them; a request
    # that starts with cached blocks computes only the rest (decoding/kv_cache_manager.py).
    prefix_caching: bool = True
    max_num_seqs: int = 64                # sequences advanced in one step
    max_num_batched_tokens: int = 512     # token budget of one step (decodes + prefill chunks)
    max_model_len: int | None = None      # None: the model's own context length
    seed: int = 0                         # seeds the draws of requests that bring no seed
    # Decode steps run in one native call while no sequence of a step needs Python per token (penalties,
    # a grammar, beams, top-N logprobs, truncated sampling: decoding/multi_step.py); 1: one call per step.
    decode_steps: int = 8
    threads: int | None = None            # threads of torch and the native kernels; None: torch's default
    show_progress: bool = True
    # Speculative decoding: None (off), "draft" (a draft model), "ngram" (prompt lookup), "medusa" or "eagle".
    speculative: str | None = None
    draft_model: str | None = None        # None: the embedded default draft
    num_speculative_tokens: int = 4       # draft tokens verified per step (draft, ngram)
    # Steps with more decoding sequences than this do not speculate (their batch already keeps the
    # hardware busy, and verifying k more rows each costs more than it saves); None: always speculate.
    speculative_disable_by_batch_size: int | None = None
    # Per step, speculate only where measured to pay at that batch size (decoding/speculative/governor.py);
    # False: speculate in every step that can (what the acceptance benchmarks measure).
    speculative_adaptive: bool = True
    prompt_lookup_max: int = 4            # n-gram sizes prompt lookup tries, longest first
    prompt_lookup_min: int = 2
    medusa_heads: str | None = None       # None: the heads shipped for a catalog model, else the embedded model's
    medusa_choices: tuple[tuple[int, ...], ...] | None = None   # the candidate tree; None: the heads' own, else the default
    eagle_head: str | None = None         # None: the EAGLE head shipped for a catalog model
    eagle_tree: tuple[int, ...] | None = None   # (nodes, depth, top_k[, width]) of EAGLE's tree; None: the head's own
    # Candidates per level of EAGLE's drawn tree (sampled requests, lossless rule); None: the head's own
    eagle_drawn: tuple[int, ...] | None = None
    eagle_weights: str = "q8_0"           # the EAGLE draft's products, one of DRAFT_HEAD_WEIGHTS (it only proposes)
    # How sampled requests keep draft tokens (decoding/speculative/proposer.py, AcceptanceRule): "exact"
    # (the plain sampled tokens, token for token), "lossless" (the rejection rule: the same distribution),
    # or, for the tree proposers only (Medusa, EAGLE), "typical" (lossy).
    speculative_acceptance: str = "exact"
    medusa_acceptance: str = "exact"
    medusa_weights: str = "q8_0"          # the Medusa heads' products, likewise (models/medusa_native.py)
    typical_epsilon: float = 0.09         # typical acceptance: keep if p > min(epsilon, delta * exp(-H))
    typical_delta: float = 0.3
    # Each grammar compile (schema -> regex -> token index) runs in a worker process that the kernel stops
    # past this much CPU time or memory; up to grammar_workers compile at once.
    grammar_cpu_budget_s: float = 5.0
    grammar_memory_gb: float = 4.0
    grammar_workers: int = 2
    # The structured-output backends requests may use; the first is the default. Default: every one
    # installed (xgrammar is the `xgrammar` extra), llguidance first.
    structured_backends: tuple[str, ...] = field(default_factory=installed_backends)

    def __post_init__(self):
        if self.block_size is None:
            # The CPU attention kernel streams each block's keys and values from DRAM: longer blocks are
            # longer sequential reads and fewer softmax rescales. A 32-sequence decode step's attention
            # measured 5.1 ms at 16 tokens, 4.7 at 64 and 4.5 at 128 (AMD EPYC, 141 MB of keys and
            # values); 64 keeps a group's copy-on-write of a partial block small.
            object.__setattr__(self, "block_size", 64 if str(self.device).startswith("cpu") else 16)
        self._check_cache_and_batch()
        self._check_speculation()
        self._check_structured_output()
        if self.model_impl not in ("auto", "transformers"):
            raise ValueError(f"model_impl must be 'auto' or 'transformers', got {self.model_impl!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def _check_cache_and_batch(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {self.decode_steps}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")

    def _check_speculation(self) -> None:
        if self.speculative not in (None, "draft", "ngram", "medusa", "eagle"):
            raise ValueError(f"speculative must be 'draft', 'ngram', 'medusa', 'eagle' or None, got {self.speculative!r}")
        if self.medusa_acceptance not in ("exact", "lossless", "typical"):
            raise ValueError(f"medusa_acceptance must be 'exact', 'lossless' or 'typical', got {self.medusa_acceptance!r}")
        trees = self.speculative == "eagle"           # typical acceptance needs trees (Medusa's, EAGLE's)
        if self.speculative_acceptance not in (("exact", "lossless", "typical") if trees else ("exact", "lossless")):
            raise ValueError(f"speculative_acceptance must be 'exact' or 'lossless'{' or typical' if trees else ''}, "
                             f"got {self.speculative_acceptance!r}")
        for name in ("eagle_weights", "medusa_weights"):
            if getattr(self, name) not in DRAFT_HEAD_WEIGHTS:
                raise ValueError(f"{name} must be one of {', '.join(DRAFT_HEAD_WEIGHTS)}, got {getattr(self, name)!r}")
        if self.eagle_tree is not None and (len(self.eagle_tree) not in (3, 4) or min(self.eagle_tree) < 1):
            raise ValueError("eagle_tree must be three or four positive ints (nodes, depth, top_k[, width]), "
                             f"got {self.eagle_tree!r}")
        if self.eagle_drawn is not None and (not self.eagle_drawn or min(self.eagle_drawn) < 1):
            raise ValueError(f"eagle_drawn must be positive ints, candidates per level, got {self.eagle_drawn!r}")
        if self.speculative_disable_by_batch_size is not None and self.speculative_disable_by_batch_size < 1:
            raise ValueError("speculative_disable_by_batch_size must be >= 1 or None, got "
                             f"{self.speculative_disable_by_batch_size}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    def _check_structured_output(self) -> None:
        if not (self.grammar_cpu_budget_s > 0 and self.grammar_memory_gb > 0 and self.grammar_workers >= 1):
            raise ValueError("grammar compiles need grammar_cpu_budget_s > 0, grammar_memory_gb > 0 and "
                             "grammar_workers >= 1")
        if isinstance(self.structured_backends, str):
            object.__setattr__(self, "structured_backends", (self.structured_backends,))
        object.__setattr__(self, "structured_backends", tuple(self.structured_backends))
        unknown = [name for name in self.structured_backends if name not in BACKENDS]
        if not self.structured_backends or unknown:
            raise ValueError(f"structured_backends must name one or more of {', '.join(BACKENDS)}, got "
                             f"{list(self.structured_backends)}")
        missing = [name for name in self.structured_backends if name not in installed_backends()]
        if missing:
            raise ValueError(f"the {missing[0]} structured-output backend is not installed: "
                             f"pip install 'gorgon[{EXTRAS[missing[0]]}]'")
