"""SGLang's native request bodies, as slime, AReaL and ROLL send them (`/generate`, the weight and pause
routes), converted to SamplingParams. Fields SGLang has that Gorgon cannot honour (images, LoRA, custom
logit processors, routed experts) are refused with a 400 that names them, never ignored."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Literal

from pydantic import Field

from decoding import SamplingParams
from decoding.params import MAX_LOGPROBS, MAX_REPETITION_PENALTY, MAX_TEMPERATURE
from server.protocol import MAX_STOP_STRINGS, StrictModel, stop_strings

# SGLang's default when a request names no max_new_tokens.
DEFAULT_MAX_NEW_TOKENS = 128


class SGLangSamplingParams(StrictModel):
    max_new_tokens: int | None = Field(DEFAULT_MAX_NEW_TOKENS, ge=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0, le=1)
    # -1 (and 0) mean no top-k; AReaL sends 100,000,000 for the same: anything past the vocabulary is none.
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=MAX_REPETITION_PENALTY)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Fast tokenizers put no spaces between special tokens either way; accepted as slime sends it.
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False          # keep the matched stop string in the text
    n: int = Field(1, ge=1)
    sampling_seed: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    custom_params: dict | None = None
    logit_bias: dict | None = None

    def _max_tokens(self, scoring: bool) -> int:
        requested = DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens
        return requested if requested or scoring else 1

    def to_params(self, vocab_size: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        for name in ("ebnf", "structural_tag", "custom_params", "logit_bias"):
            if getattr(self, name):
                raise ValueError(f"sampling_params.{name} is not supported by this server; use json_schema or "
                                 "regex for constrained output")
        stop = stop_strings(self.stop)
        constraint = {}
        if self.json_schema is not None:
            try:
                constraint["json_schema"] = json.loads(self.json_schema)
            except ValueError as err:
                raise ValueError(f"sampling_params.json_schema is not valid JSON: {err}") from None
        if self.regex is not None:
            constraint["regex"] = self.regex
        return SamplingParams(
            # max_new_tokens 0 (slime's prompt scoring) scores the prompt and generates nothing; without
            # input logprobs asked for, one token is computed and not returned.
            n=self.n, max_tokens=self._max_tokens(prompt_logprobs is not None),
            min_tokens=self.min_new_tokens,
            temperature=self.temperature, top_p=self.top_p,
            top_k=0 if self.top_k < 0 or self.top_k >= vocab_size else self.top_k, min_p=self.min_p,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.no_stop_trim, ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens, seed=self.sampling_seed, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, **constraint)


class GenerateRequest(StrictModel):
    """SGLang's GenerateReqInput: one prompt or a batch, as text or token ids."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SGLangSamplingParams = Field(default_factory=SGLangSamplingParams)
    rid: str | list[str] | None = None
    return_logprob: bool = False
    logprob_start_len: int = Field(-1, ge=-1)      # -1: no prompt logprobs; k: from prompt position k
    top_logprobs_num: int = Field(0, ge=0, le=MAX_LOGPROBS)
    return_text_in_logprobs: bool = False
    # Each output token's sampling support (decoding/params.py): meta_info's output_token_kept_logprobs
    # and output_token_kept_ids; they need return_logprob.
    return_kept_mass: bool = False
    return_kept_token_ids: bool = False
    stream: bool = False
    image_data: list | str | None = None
    lora_path: str | list | None = None
    return_routed_experts: bool = False
    custom_logit_processor: str | None = None

    def prompts(self) -> tuple[list[str | list[int]], bool]:
        """The prompts, and whether the call was a batch (answered with a list)."""
        for name in ("image_data", "lora_path", "custom_logit_processor"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server")
        if self.return_routed_experts:
            raise ValueError("return_routed_experts is not supported: the served models are dense")
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text and input_ids")
        if self.text is not None:
            return ([self.text], False) if isinstance(self.text, str) else (list(self.text), True)
        if self.input_ids and isinstance(self.input_ids[0], list):
            return list(self.input_ids), True
        return [self.input_ids], False

    @property
    def scores_only(self) -> bool:
        """max_new_tokens 0: only the prompt's logprobs are wanted (slime's on-policy distillation)."""
        return self.sampling_params.max_new_tokens == 0

    def params(self, vocab_size: int) -> SamplingParams:
        logprobs = self.top_logprobs_num if self.return_logprob else None
        prompt_logprobs = self.top_logprobs_num if self.return_logprob and self.logprob_start_len >= 0 else None
        params = self.sampling_params.to_params(vocab_size, logprobs, prompt_logprobs)
        if self.return_kept_mass or self.return_kept_token_ids:
            if not self.return_logprob:
                raise ValueError("return_kept_mass and return_kept_token_ids describe output logprobs: set "
                                 "return_logprob too")
            params = replace(params, kept_mass=True, kept_token_ids=self.return_kept_token_ids)
        return params


class AbortRequest(StrictModel):
    rid: str = ""
    abort_all: bool = False
    finished_reason: dict | None = None
    aborted_message: str | None = None


class PauseGenerationRequest(StrictModel):
    # abort: abort every request; retract: keep them, recompute their cache on continue; in_place: keep all.
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGenerationRequest(StrictModel):
    torch_empty_cache: bool = True      # SGLang frees accelerator memory; nothing to free on the CPU


class UpdateWeightsFromDiskRequest(StrictModel):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | int | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    flush_cache: bool = True
    recapture_cuda_graph: bool = False
    token_step: int = 0
    dry_run: bool = False            # Gorgon's, as on /v1/weights/load: check only (the cluster's first phase)
    keep_previous: bool = False      # Gorgon's: save what the load overwrites, for /v1/weights/rollback

    def version(self) -> int | None:
        """SGLang's versions are strings; Gorgon's are integers (slime sends str(step))."""
        if self.weight_version is None or isinstance(self.weight_version, int):
            return self.weight_version
        try:
            return int(self.weight_version)
        except ValueError:
            raise ValueError(f"weight_version must be an integer or its decimal string, got "
                             f"{self.weight_version!r}") from None
