"""Per-request sampling parameters, validated once when they are made."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

LogprobsMode = Literal["raw", "processed"]
MAX_LOGPROBS = 20
# Temperatures below this mean greedy (vLLM's rule): dividing logits by less overflows float32, and the
# distribution is already one-hot to float precision. Above MAX_TEMPERATURE it is uniform to float
# precision, and masked (-inf) logits divided by an infinite temperature would be NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
# Beyond this a penalised logit can overflow to -inf for every token of a row.
MAX_REPETITION_PENALTY = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """What to generate for one prompt. Field names and defaults follow vLLM's `SamplingParams`.

    `logprobs_mode`: `raw` reports log_softmax of the model's logits; `processed` reports the
    distribution actually sampled from, after penalties, temperature and top-k/top-p/min-p truncation
    (renormalised over the kept tokens). With temperature 0 the processed distribution uses T = 1.
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: no top-k truncation
    min_p: float = 0.0
    repetition_penalty: float = 1.0     # HF semantics, over prompt and output tokens
    presence_penalty: float = 0.0       # OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None         # top-N alternatives per generated token (0: the sampled one only)
    prompt_logprobs: int | None = None
    logprobs_mode: LogprobsMode = "processed"
    # The support each token was sampled from (what top-k / top-p / min-p, bans and a grammar kept):
    # `kept_mass` adds to each token's logprob the log of the mass the support holds under the raw
    # distribution (0.0 where nothing was removed), so a trainer can renormalise its full-vocabulary
    # logprobs onto it; `kept_token_ids` adds the kept ids themselves (vLLM's sampling mask; None where
    # the support is the whole vocabulary).
    kept_mass: bool = False
    kept_token_ids: bool = False
    skip_special_tokens: bool = True
    # Beam search, with HF generate's semantics. Deterministic: temperature must be 0.
    use_beam_search: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False          # True, False or "never"
    num_return_sequences: int = 1
    # Per-request opt-out of the engine's speculative decoding (which never changes what is generated,
    # only how fast; opting out trades that speed for a steadier per-step latency).
    speculative: bool = True
    # Constrained output (one at most): a JSON schema (dict or JSON text), a regex the whole output must
    # match, or a list of strings to choose from. Generated tokens never leave the grammar, and EOS is
    # allowed only where the output is complete.
    json_schema: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    # A schema with constructs the grammar cannot enforce is refused, unless the caller opts into best
    # effort: then it is enforced as far as it can be and each finished output says whether it validated.
    structured_best_effort: bool = False
    # The grammar engine to enforce the constraint with; None: the engine's default. See
    # decoding/structured/constraint.py for the choices; an engine enables some of them.
    structured_backend: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if isinstance(self.json_schema, dict):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.temperature, (int, float)) and 0 < self.temperature < GREEDY_BELOW_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        self._validate()

    def _validate(self) -> None:
        _require(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _require(isinstance(self.max_tokens, int) and self.max_tokens >= 0,
                 f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        # Scoring: the prompt's logprobs and nothing generated, so a prompt may fill the whole context.
        _require(self.max_tokens >= 1 or (self.prompt_logprobs is not None and not self.use_beam_search),
                 "max_tokens 0 only scores the prompt: ask for prompt_logprobs (or echo with logprobs), "
                 "without beam search; otherwise set max_tokens >= 1")
        _require(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
                 f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        _require(0 <= self.temperature <= MAX_TEMPERATURE,
                 f"temperature must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(isinstance(self.top_k, int) and self.top_k >= 0,
                 f"top_k must be a positive integer, or 0 / -1 to disable it, got {self.top_k!r}")
        _require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _require(0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
                 f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}")
        _require(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _require(-2 <= self.frequency_penalty <= 2,
                 f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings")
        _require(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                 "stop_token_ids must be a list of non-negative token ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                     f"{name} must be an integer between 0 and {MAX_LOGPROBS}, got {value!r}")
        _require(not (self.kept_mass or self.kept_token_ids) or self.logprobs is not None,
                 "kept_mass and kept_token_ids describe each token's logprob: ask for logprobs too")
        _require(not (self.kept_mass or self.kept_token_ids) or not self.use_beam_search,
                 "kept_mass and kept_token_ids describe sampled tokens; beam search samples none")
        _require(self.logprobs_mode in ("raw", "processed"),
                 f"logprobs_mode must be 'raw' or 'processed', got {self.logprobs_mode!r}")
        _require(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        self._validate_beam_search()
        self._validate_constraint()

    @property
    def is_constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.choice is not None

    def _validate_constraint(self) -> None:
        given = [name for name in ("json_schema", "regex", "choice") if getattr(self, name) is not None]
        _require(len(given) <= 1, f"set at most one of json_schema, regex and choice, got {', '.join(given)}")
        if self.choice is not None:
            _require(len(self.choice) > 0 and all(isinstance(c, str) and c for c in self.choice),
                     "choice must be a non-empty list of non-empty strings")
        if self.regex is not None:
            _require(isinstance(self.regex, str) and self.regex != "", "regex must be a non-empty string")
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except (TypeError, ValueError) as err:
                raise ValueError(f"json_schema must be a JSON object or its JSON text: {err}") from None
        _require(self.structured_backend is None or isinstance(self.structured_backend, str),
                 f"structured_backend must be a backend's name, got {self.structured_backend!r}")

    def _validate_beam_search(self) -> None:
        _require(isinstance(self.num_beams, int) and self.num_beams >= 1,
                 f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        _require(math.isfinite(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty}")
        _require(self.early_stopping in (True, False, "never"),
                 f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}")
        _require(isinstance(self.num_return_sequences, int) and 1 <= self.num_return_sequences <= self.num_beams,
                 f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), "
                 f"got {self.num_return_sequences!r}")
        if not self.use_beam_search:
            _require(self.num_beams == 1, "num_beams > 1 needs use_beam_search=True")
            return
        _require(self.n == 1, "beam search returns num_return_sequences beams; set n=1 (n > 1 is for sampling)")
        _require(self.temperature == 0, "beam search is deterministic: set temperature=0 (beam sampling is not "
                                        "supported)")
        _require(not self.has_truncation, "top_k, top_p and min_p do not apply to beam search; remove them")
        _require(self.presence_penalty == 0 and self.frequency_penalty == 0,
                 "presence_penalty and frequency_penalty are not supported with beam search; use "
                 "repetition_penalty")

    def stop_token_set(self, eos_token_ids: frozenset[int]) -> frozenset[int]:
        """Token ids that end a sequence: stop_token_ids, plus the model's EOS unless ignore_eos."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else eos_token_ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def has_truncation(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
