"""Turning engine snapshots into OpenAI response bodies and streaming chunks."""

from __future__ import annotations

import time
import uuid

from decoding import RequestOutput
from decoding.outputs import CompletionOutput
from decoding.sequence import TokenLogprob
from server.protocol import stop_strings
from server.tool_calls import ToolCallStream, finished_calls


# OpenAI's floor for a reported logprob (vLLM reports the same): a token the processed distribution
# excludes has -inf, which JSON cannot carry.
LOGPROB_FLOOR = -9999.0


def wire_logprob(value: float) -> float:
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR     # -inf (and NaN, which fails >=) -> floor


KEPT_KEYS = ("kept_logprobs", "kept_token_ids")


def kept_support(logprobs: list[TokenLogprob | None]) -> dict:
    """Per token, the log of its sampling support's raw mass and the support's ids (None: the whole
    vocabulary), where the request asked (SamplingParams.kept_mass / kept_token_ids); else nothing."""
    if not any(lp is not None and lp.kept_logprob is not None for lp in logprobs):
        return {}
    return {"kept_logprobs": [wire_logprob(lp.kept_logprob) if lp else None for lp in logprobs],
            "kept_token_ids": [None if lp is None or lp.kept_token_ids is None else list(lp.kept_token_ids)
                               for lp in logprobs]}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_prompt_ids(tokenizer, messages, tools=None) -> list[int]:
    if not tokenizer.chat_template:
        raise ValueError("this model's tokenizer has no chat template; use /v1/completions instead")
    # Tool results read as user turns: not every chat template knows a "tool" role.
    conversation = [{"role": "user" if m.role == "tool" else m.role,
                     "content": f"[tool result] {m.text()}" if m.role == "tool" else m.text()} for m in messages]
    specs = [tool.model_dump() for tool in tools] if tools else None
    text = tokenizer.apply_chat_template(conversation, tools=specs, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def weight_versions(output: RequestOutput, completion: CompletionOutput) -> dict:
    """A choice's weight_version: the one its tokens were sampled under (the first, for a request kept
    across an update, which then also lists [first token index, version] ranges)."""
    ranges = completion.version_ranges
    fields = {"weight_version": ranges[0][1] if ranges else output.weight_version}
    if len(ranges) > 1:
        fields["weight_version_ranges"] = [list(r) for r in completion.version_ranges]
    return fields


class _View:
    """Bookkeeping shared by completions and chat: ids, usage, what each choice has streamed so far."""

    object_name = ""
    id_prefix = ""

    def __init__(self, tokenizer, model_name: str, body, streams):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.body = body
        self.id = new_id(self.id_prefix)
        self.created = int(time.time())
        self.prompt_tokens = [len(s.prompt_token_ids) for s in streams]
        self.include_usage = body.include_usage
        stops = stop_strings(body.stop)
        # Text that might be the start of a stop string is held back until it is known not to be one.
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.checkpointed: dict[int, int] = {}       # tokens per choice that checkpoints have carried
        self.sent_prompt_logprobs: set[int] = set()  # choices whose prompt logprobs went out (completions)
        self.finish_sent: set[int] = set()           # choices whose finish_reason went out
        self.resumed_prompts: set[int] = set()       # prompts started elsewhere (restore)
        self.completion_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}      # prompt index -> its tokens found in the prefix cache

    def choice_index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.body.n + completion.index

    def token_text(self, token_id: int) -> str:
        if self.body.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens)
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}

    def saw(self, prompt_index: int, output: RequestOutput) -> None:
        """Note what a snapshot says of its prompt (the tokens the prefix cache held where it started)."""
        if prompt_index not in self.resumed_prompts:
            self.cached_tokens[prompt_index] = output.num_cached_tokens

    # ---- checkpoints: what continuing this stream elsewhere needs (server/resumable.py) -------------
    def checkpoint(self, prompt_index: int, output: RequestOutput, seeds: list[int]) -> dict:
        """The samples' tokens since the last checkpoint and everything this view has sent, once a
        snapshot's chunks are out."""
        samples = []
        for completion in output.outputs:
            key = self.choice_index(prompt_index, completion)
            start = self.checkpointed.get(key, 0)
            self.checkpointed[key] = len(completion.token_ids)
            samples.append({"index": completion.index, "seed": seeds[completion.index], "from": start,
                            "token_ids": completion.token_ids[start:], "finish_reason": completion.finish_reason,
                            "stop_reason": completion.stop_reason,
                            "version_ranges": [list(r) for r in completion.version_ranges]})
        return {"prompt": prompt_index, "samples": samples, "view": self.state()}

    def state(self) -> dict:
        return {"id": self.id, "created": self.created, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "sent_text": self.sent_text,
                "prompt_logprobs_sent": sorted(self.sent_prompt_logprobs), "finish_sent": sorted(self.finish_sent)}

    def restore(self, state: dict, sent_tokens: dict[int, int]) -> None:
        """Take up a stream where `state` (this view's state() elsewhere) left it; `sent_tokens`: each
        choice's tokens already streamed. ValueError if the state is not one this view wrote."""
        try:
            self.id, self.created = str(state["id"]), int(state["created"])
            self.prompt_tokens = [int(count) for count in state["prompt_tokens"]]
            self.cached_tokens = {int(k): int(v) for k, v in state["cached_tokens"].items()}
            self.resumed_prompts = set(self.cached_tokens)
            self.sent_text = {int(k): int(v) for k, v in state["sent_text"].items()}
            self.sent_prompt_logprobs = {int(k) for k in state["prompt_logprobs_sent"]}
            self.finish_sent = {int(k) for k in state["finish_sent"]}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"resume.view is not a state this server wrote ({err!r})") from None
        if not set(self.sent_text) <= set(sent_tokens):
            raise ValueError("resume.view and resume.requests name different choices")
        self.sent_tokens = dict(sent_tokens)
        self.checkpointed = dict(sent_tokens)
        self.completion_tokens = dict(sent_tokens)

    def usage_chunk(self) -> dict:
        return {**self.header(), "choices": [], "usage": self.usage()}

    def header(self) -> dict:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model_name}

    def announces_finish(self, key: int, completion: CompletionOutput) -> bool:
        """The choice has finished and no chunk has said so yet."""
        return completion.finish_reason is not None and key not in self.finish_sent

    def new_part(self, key: int, completion: CompletionOutput) -> tuple[str, list[int], int]:
        """The text and tokens of `completion` not streamed yet (text held back near a possible stop
        while it runs)."""
        self.completion_tokens[key] = len(completion.token_ids)
        finished = completion.finish_reason is not None
        text_end = len(completion.text) if finished else max(0, len(completion.text) - self.holdback)
        text_start = self.sent_text.get(key, 0)
        token_start = self.sent_tokens.get(key, 0)
        self.sent_text[key] = max(text_start, text_end)
        self.sent_tokens[key] = len(completion.token_ids)
        return completion.text[text_start:text_end], completion.token_ids[token_start:], token_start


class CompletionView(_View):
    object_name = "text_completion"
    id_prefix = "cmpl"

    def final(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for prompt_index, output in enumerate(outputs):
            self.saw(prompt_index, output)
            for completion in output.outputs:
                key = self.choice_index(prompt_index, completion)
                self.completion_tokens[key] = len(completion.token_ids)
                text = completion.text
                logprobs = self._logprobs(completion.token_ids, completion.logprobs)
                if self.body.echo:
                    text = self.tokenizer.decode(output.prompt_token_ids) + text
                    if logprobs is not None and output.prompt_logprobs is not None:
                        logprobs = self._merge(self._logprobs(output.prompt_token_ids, output.prompt_logprobs), logprobs)
                choices.append(self._choice(key, text, logprobs, completion, output))
        choices.sort(key=lambda c: c["index"])
        return {**self.header(), "choices": choices, "usage": self.usage()}

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[dict]:
        self.saw(prompt_index, output)
        chunks = []
        for completion in output.outputs:
            key = self.choice_index(prompt_index, completion)
            first = key not in self.sent_tokens
            text, tokens, start = self.new_part(key, completion)
            if self.body.echo and first:
                text = self.tokenizer.decode(output.prompt_token_ids) + text
            if not text and not tokens and not self.announces_finish(key, completion):
                continue
            self.finish_sent.update([key] if completion.finish_reason else [])
            logprobs = None
            if completion.logprobs is not None:
                logprobs = self._logprobs(tokens, completion.logprobs[start:])
            chunks.append({**self.header(), "choices": [self._choice(key, text, logprobs, completion, output, tokens)]})
        return chunks

    def _choice(self, index, text, logprobs, completion: CompletionOutput, output: RequestOutput,
                token_ids=None) -> dict:
        # The weights each choice ran under, in every response that carries its tokens (chunks too).
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": completion.finish_reason,
                  "stop_reason": completion.stop_reason, **weight_versions(output, completion)}
        if completion.score is not None:
            choice["score"] = wire_logprob(completion.score)
        if completion.schema_valid is not None:
            choice["schema_valid"] = completion.schema_valid
        if self.body.return_token_ids:
            choice["token_ids"] = completion.token_ids if token_ids is None else token_ids
            choice["prompt_token_ids"] = output.prompt_token_ids
        if self.body.prompt_logprobs is not None and index not in self.sent_prompt_logprobs:
            self.sent_prompt_logprobs.add(index)        # once per choice, streamed or not
            choice["prompt_logprobs"] = self._prompt_logprobs(output)
        return choice

    def _prompt_logprobs(self, output: RequestOutput) -> list[dict | None] | None:
        """vLLM's shape: per prompt position {token id: {logprob, rank, decoded_token}}, the prompt's
        own token first, then its top alternatives; None for the first position."""
        if output.prompt_logprobs is None:
            return None
        entries: list[dict | None] = []
        for token_id, lp in zip(output.prompt_token_ids, output.prompt_logprobs):
            if lp is None:
                entries.append(None)
                continue
            ranked = {token_id: (lp.logprob, lp.rank)}
            for rank, (alternative, value) in enumerate((lp.top or {}).items(), start=1):
                ranked.setdefault(alternative, (value, rank))
            entries.append({str(t): {"logprob": wire_logprob(v), "rank": r, "decoded_token": self.token_text(t)}
                            for t, (v, r) in ranked.items()})
        return entries

    def _logprobs(self, token_ids: list[int], logprobs: list[TokenLogprob | None] | None) -> dict | None:
        if logprobs is None:
            return None
        tokens = [self.token_text(t) for t in token_ids]
        offsets, offset = [], 0
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [wire_logprob(lp.logprob) if lp else None for lp in logprobs],
            "top_logprobs": [({self.token_text(t): wire_logprob(v) for t, v in lp.top.items()} if lp and lp.top else None)
                             for lp in logprobs],
            "text_offset": offsets,
            **kept_support(logprobs),
        }

    @staticmethod
    def _merge(first: dict, second: dict) -> dict:
        shift = sum(len(t) for t in first["tokens"])
        merged = {key: first[key] + second[key] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                             *KEPT_KEYS) if key in first}
        merged["text_offset"] = first["text_offset"] + [o + shift for o in second["text_offset"]]
        return merged


class ChatView(_View):
    object_name = "chat.completion"
    id_prefix = "chatcmpl"

    def __init__(self, tokenizer, model_name: str, body, streams):
        super().__init__(tokenizer, model_name, body, streams)
        self.tool_mode = body.tool_mode()
        self.functions = body.tool_functions() if self.tool_mode != "none" else {}
        self.tool_streams: dict[int, ToolCallStream] = {}

    def final(self, outputs: list[RequestOutput]) -> dict:
        [output] = outputs
        self.saw(0, output)
        choices = []
        for completion in output.outputs:
            self.completion_tokens[completion.index] = len(completion.token_ids)
            calls = (finished_calls(self.tool_mode, self.functions, completion.text)
                     if completion.finish_reason == "stop" else None)
            message = ({"role": "assistant", "content": None, "tool_calls": calls} if calls
                       else {"role": "assistant", "content": completion.text})
            choices.append({
                "index": completion.index,
                "message": message,
                "logprobs": self._logprobs(completion.token_ids, completion.logprobs),
                "finish_reason": "tool_calls" if calls else completion.finish_reason,
                **weight_versions(output, completion),
                **({"schema_valid": completion.schema_valid} if completion.schema_valid is not None else {}),
                **({"token_ids": completion.token_ids} if self.body.return_token_ids else {}),
            })
        body = {**self.header(), "choices": choices, "usage": self.usage()}
        if self.body.return_token_ids:
            body["prompt_token_ids"] = output.prompt_token_ids
        return body

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[dict]:
        self.saw(prompt_index, output)
        chunks = []
        for completion in output.outputs:
            key = completion.index
            version = weight_versions(output, completion)
            if key not in self.sent_tokens:
                chunks.append(self._chunk(key, {"role": "assistant", "content": ""}, None, None, version))
                if self.body.return_token_ids:
                    chunks[-1]["prompt_token_ids"] = output.prompt_token_ids
            if self.tool_mode != "none":
                chunks += self._tool_deltas(key, completion, version)
                continue
            text, tokens, start = self.new_part(key, completion)
            logprobs = None
            if completion.logprobs is not None and tokens:
                logprobs = self._logprobs(tokens, completion.logprobs[start:])
            if text or logprobs or (tokens and self.body.return_token_ids):
                chunks.append(self._chunk(key, {"content": text}, logprobs, None, version))
                if self.body.return_token_ids:
                    chunks[-1]["choices"][0]["token_ids"] = tokens
            if self.announces_finish(key, completion):
                self.finish_sent.add(key)
                chunks.append(self._chunk(key, {}, None, completion.finish_reason, version))
        return chunks

    def state(self) -> dict:
        progress = {key: stream.progress() for key, stream in self.tool_streams.items()}
        return {**super().state(), "tool_streams": progress}

    def restore(self, state: dict, sent_tokens: dict[int, int]) -> None:
        super().restore(state, sent_tokens)
        try:
            self.tool_streams = {int(key): ToolCallStream.resumed(self.tool_mode, self.functions, progress)
                                 for key, progress in state.get("tool_streams", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"resume.view is not a state this server wrote ({err!r})") from None

    def _tool_deltas(self, key: int, completion, version: dict) -> list[dict]:
        """A choice of a request with tools: its calls as OpenAI's tool_calls deltas, or its text."""
        self.completion_tokens[key] = len(completion.token_ids)
        self.sent_tokens[key] = len(completion.token_ids)
        stream = self.tool_streams.setdefault(key, ToolCallStream(self.tool_mode, self.functions, f"{self.id}:{key}"))
        finished = completion.finish_reason is not None
        stopped = completion.finish_reason == "stop"
        content, calls = stream.deltas(completion.text, stopped)
        if finished and not stopped and not content and not stream.made_calls:
            content, _ = stream.flush_content(completion.text)   # cut short: whatever was written is text
        chunks = []
        if content:
            chunks.append(self._chunk(key, {"content": content}, None, None, version))
        if calls:
            chunks.append(self._chunk(key, {"tool_calls": calls}, None, None, version))
        if self.announces_finish(key, completion):
            self.finish_sent.add(key)
            reason = "tool_calls" if stream.made_calls and stopped else completion.finish_reason
            chunks.append(self._chunk(key, {}, None, reason, version))
        return chunks

    def header(self) -> dict:
        return {**super().header(), "object": "chat.completion.chunk" if self.body.stream else "chat.completion"}

    def _chunk(self, index: int, delta: dict, logprobs, finish_reason, versions: dict) -> dict:
        return {**self.header(), "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish_reason, **versions}]}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": wire_logprob(logprob), "bytes": list(text.encode())}

    def _logprobs(self, token_ids: list[int], logprobs: list[TokenLogprob] | None) -> dict | None:
        if logprobs is None:
            return None
        content = []
        for token_id, lp in zip(token_ids, logprobs):
            entry = self._entry(token_id, lp.logprob)
            entry["top_logprobs"] = [self._entry(t, v) for t, v in (lp.top or {}).items()]
            if lp.kept_logprob is not None:
                entry["kept_logprob"] = wire_logprob(lp.kept_logprob)
                entry["kept_token_ids"] = None if lp.kept_token_ids is None else list(lp.kept_token_ids)
            content.append(entry)
        return {"content": content}
