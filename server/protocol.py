"""The OpenAI-compatible request schemas. Pydantic lives here, at the HTTP edge, and nowhere else:
requests are validated once and converted to `SamplingParams`. Unknown fields are rejected (extra="forbid"),
never silently ignored."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from decoding import SamplingParams
from decoding.params import MAX_LOGPROBS, MAX_REPETITION_PENALTY, MAX_TEMPERATURE
from decoding.resume import ResumedSample, Resumption
from server.tool_calls import required_schema

# Bounds that keep one request's work and memory in proportion (stop strings are matched on every token).
MAX_STOP_STRINGS = 64
MAX_STOP_LENGTH = 1024


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """A request's stop field as a tuple (one string or several), each within MAX_STOP_LENGTH."""
    strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(len(s) > MAX_STOP_LENGTH for s in strings):
        raise ValueError(f"stop strings must be at most {MAX_STOP_LENGTH} characters long")
    return strings


class StrictModel(BaseModel):
    """Unknown fields, NaN and infinities, and text that is not valid Unicode are refused with a 400 that
    names the field, before any of the request is used."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        _check_unicode(data, ())
        return data


def _check_unicode(value, path: tuple) -> None:
    """JSON may escape a lone surrogate ("\\ud800"), which no text encoding can represent."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where = ".".join(map(str, path)) or "the body"
            raise ValueError(f"{where} holds an unpaired UTF-16 surrogate, which is not valid Unicode text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, path)
            _check_unicode(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_unicode(item, (*path, index))


class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaFormat(StrictModel):
    name: str
    schema_: dict = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(StrictModel):
    """OpenAI's response_format."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(StrictModel):
    """vLLM's structured_outputs: one of json (a schema), regex or choice."""

    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None


class _SamplingFields(StrictModel):
    """Fields shared by completions and chat (OpenAI's, plus vLLM's extensions)."""

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, description="0 (and below 1e-5) is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1: no top-k truncation")
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=MAX_REPETITION_PENALTY)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    seed: int | None = None
    logprobs_mode: Literal["raw", "processed"] = "processed"
    # Each sampled token's support (decoding/params.py): the log of its raw-distribution mass, and its ids.
    kept_mass: bool = False
    kept_token_ids: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None   # OpenAI's end-user tag: accepted, not used
    # Opt this request out of the server's speculative decoding (outputs are the same either way).
    speculative: bool = True
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Accept schemas with constructs the grammar cannot enforce; each choice then reports schema_valid.
    structured_best_effort: bool = False
    # The grammar engine for the constraint, among those the server enabled (default: its first).
    structured_backend: str | None = None
    # The caller's id for this call: abort it by this id (POST /abort_requests); one prompt's request
    # takes it as is, several take "<id>-<index>".
    request_id: str | None = Field(None, min_length=1, max_length=256)
    skip_special_tokens: bool = True
    # vLLM's: tokens in logprobs read "token_id:<id>", so that callers need no detokenizer to map them.
    return_tokens_as_token_ids: bool = False

    def constraint(self) -> dict:
        """The SamplingParams constraint fields these request fields ask for."""
        if self.response_format is not None and self.structured_outputs is not None:
            raise ValueError("set response_format or structured_outputs, not both")
        if self.response_format is not None:
            kind = self.response_format.type
            if kind == "json_object":
                return {"json_schema": {"type": "object"}}
            if kind == "json_schema":
                if self.response_format.json_schema is None:
                    raise ValueError("response_format of type json_schema needs a json_schema field")
                return {"json_schema": self.response_format.json_schema.schema_}
            return {}
        if self.structured_outputs is not None:
            given = {"json_schema": self.structured_outputs.json_, "regex": self.structured_outputs.regex,
                     "choice": self.structured_outputs.choice}
            return {name: value for name, value in given.items() if value is not None}
        return {}

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        stop = stop_strings(self.stop)
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()), include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, seed=self.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            logprobs_mode=self.logprobs_mode, kept_mass=self.kept_mass, kept_token_ids=self.kept_token_ids,
            speculative=self.speculative, **self.constraint(),
            structured_best_effort=self.structured_best_effort, structured_backend=self.structured_backend,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


MAX_TOKENS_RULE = "at least 1 (only /v1/completions takes 0, to score a prompt)"


class ResumedSampleState(StrictModel):
    """One sample as a stream's checkpoints left it (server/resumable.py)."""

    index: int = Field(ge=0)
    seed: int = Field(ge=0, lt=2**63)
    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | int | None = None
    version_ranges: list[tuple[int, int]] = []


class ResumedRequestState(StrictModel):
    samples: list[ResumedSampleState]


class StreamResume(StrictModel):
    """Continue a stream where another server left it, from the state its checkpoints gave (sent by the
    cluster's front when a replica dies mid-stream; server/resumable.py). The stream goes on as the
    uninterrupted one would have: the same id, no chunk repeated, the same tokens."""

    view: dict                                        # the response's own bookkeeping (server/responses.py)
    requests: dict[int, ResumedRequestState] = {}     # prompt index -> its samples so far
    on_weight_change: Literal["error", "keep"] = "error"

    def resumption(self, prompt_index: int) -> Resumption | None:
        state = self.requests.get(prompt_index)
        if state is None:
            return None
        samples = [ResumedSample(s.index, s.seed, s.token_ids, s.finish_reason, s.stop_reason,
                                 [tuple(r) for r in s.version_ranges]) for s in state.samples]
        return Resumption(samples, self.on_weight_change)


class _Resumable(StrictModel):
    resume: StreamResume | None = Field(None, description="continue an interrupted stream (server/resumable.py)")

    def resumptions(self, num_prompts: int) -> list[Resumption | None]:
        if self.resume is None:
            return [None] * num_prompts
        if not self.stream:
            raise ValueError("resume continues a stream; set stream: true")
        if any(index >= num_prompts for index in self.resume.requests):
            raise ValueError(f"resume names a prompt index beyond the {num_prompts} prompts")
        return [self.resume.resumption(index) for index in range(num_prompts)]


class CompletionRequest(_SamplingFields, _Resumable):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 scores the prompt and generates nothing (OpenAI's legacy scoring: echo with logprobs).
    max_tokens: int | None = Field(16, ge=0, description="default 16; 0 only with echo and logprobs, or "
                                                         "prompt_logprobs: the prompt is scored, nothing generated")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    return_token_ids: bool = False
    # vLLM's: each prompt position's logprob, rank and top alternatives (the first position has none).
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's convention: with use_beam_search, `n` is the beam width and all n beams are returned.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    def completion_params(self) -> SamplingParams:
        logprobs = self.logprobs
        echoed = self.logprobs if self.echo else None
        prompt_logprobs = self.prompt_logprobs if echoed is None else max(echoed, self.prompt_logprobs or 0)
        if not self.use_beam_search:
            return self.sampling_params(16 if self.max_tokens is None else self.max_tokens, logprobs, prompt_logprobs)
        if self.temperature not in (0, 1.0):
            raise ValueError("beam search is deterministic; leave temperature out or set it to 0")
        beam = self.model_copy(update={"n": 1, "temperature": 0.0})
        params = beam.sampling_params(16 if self.max_tokens is None else self.max_tokens, logprobs, prompt_logprobs)
        return SamplingParams(**{**params.__dict__, "use_beam_search": True, "num_beams": self.n,
                                 "num_return_sequences": self.n, "length_penalty": self.length_penalty,
                                 "early_stopping": self.early_stopping})

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        if not self.prompt:
            raise ValueError("prompt is empty")
        return list(self.prompt)


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None        # an assistant turn that called tools
    tool_call_id: str | None = None             # a tool turn: which call it answers

    def text(self) -> str:
        if self.content is None:
            # An assistant turn made only of tool calls reads as the calls themselves.
            return json.dumps([call.get("function", call) for call in self.tool_calls or []])
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)


class FunctionSpec(StrictModel):
    name: str
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields, _Resumable):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description=f"default: the rest of the context; {MAX_TOKENS_RULE}")
    max_completion_tokens: int | None = Field(None, ge=1, description=f"overrides max_tokens; {MAX_TOKENS_RULE}")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None    # OpenAI's default (None) is true: "required" may make several
    return_token_ids: bool = False             # vLLM's: prompt_token_ids in the body, token_ids per choice

    def tool_mode(self) -> str:
        """"none", "auto", "required" or "named"."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    def tool_functions(self) -> dict:
        """The functions the output may call: all tools, or only the one tool_choice names."""
        functions = {tool.function.name: tool.function for tool in self.tools or []}
        if self.tool_mode() == "named":
            name = self.tool_choice.function.name
            if name not in functions:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
            return {name: functions[name]}
        return functions

    def tool_constraint(self) -> dict:
        """The JSON schema the output must follow for tool_choice required / a named function
        (server/tool_calls.py says what the model writes in each mode)."""
        mode = self.tool_mode()
        if mode in ("none", "auto"):
            return {}
        if not self.tools:
            raise ValueError(f"tool_choice {mode!r} needs tools")
        if self.response_format is not None or self.structured_outputs is not None:
            raise ValueError("tool_choice required or a named function cannot be combined with another constraint")
        functions = self.tool_functions()
        if mode == "named":
            [spec] = functions.values()
            return {"json_schema": spec.parameters}
        return {"json_schema": required_schema(functions, self.parallel_tool_calls is not False)}


class RolloutRequest(_SamplingFields):
    """Group rollouts for RL trainers: `n` completions per prompt, token ids and logprobs in TRL's shape."""

    prompts: list[str | list[int] | list[ChatMessage]] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1, description=MAX_TOKENS_RULE)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ScoreRequest(StrictModel):
    """Teacher-forced logprobs of completion tokens given their prompts (PPO's old-policy / reference)."""

    model: str | None = None
    request_id: str | None = Field(None, min_length=1, max_length=256)
    sequences: list[list[int]] = Field(min_length=1)      # prompt + completion token ids
    prompt_lens: list[int]                                 # where each completion starts
    logprobs_mode: Literal["raw", "processed"] = "raw"
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)   # also the k most likely tokens per position
    reference: bool = False                # score under the frozen reference model (--reference-model)


class SharedWeightsRequest(StrictModel):
    """A push through shared memory: the safetensors file a trainer on this machine wrote under /dev/shm
    (client.GorgonClient.push_weights does it), applied as an HTTP body would be."""

    path: str
    weight_version: int | None = None
    policy: Literal["wait", "abort", "keep"] = "wait"
    recompute_kv: bool = False
    allow_non_finite: bool = False
    allow_version_rollback: bool = False
    dry_run: bool = False
    keep_previous: bool = False


class WeightsLoadRequest(StrictModel):
    path: str
    weight_version: int | None = None
    policy: Literal["wait", "abort", "keep"] = "wait"
    recompute_kv: bool = False              # policy keep: kept requests recompute their cache first
    allow_non_finite: bool = False          # accept NaN / infinite values (refused by default)
    allow_version_rollback: bool = False    # accept a weight_version below the served one
    dry_run: bool = False                   # check the checkpoint against the model; change nothing
    keep_previous: bool = False             # save what the load overwrites, for /v1/weights/rollback


class AbortRequestsRequest(StrictModel):
    """vLLM's /abort_requests: the ids to abort; none or empty aborts every request."""

    request_ids: list[str] | None = None
