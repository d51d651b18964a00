"""Chat tool calls: the constraint each `tool_choice` puts on the output, the calls a finished output
makes, and the calls of an output still being generated, as OpenAI's streaming deltas.

What the model writes, by `tool_choice`:
- a named function: that function's arguments object (one call);
- "required": a call `{"name": ..., "arguments": {...}}`, or with `parallel_tool_calls` (OpenAI's
  default) a non-empty array of them;
- "auto": anything; a finished output that is such a call (or array of calls) naming a tool, whose
  arguments validate against its parameters, becomes tool calls, and anything else stays text.
The arguments of a call are the exact text the model wrote for them, in the response and in the stream.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field


def call_schema(functions: dict) -> dict:
    """One call of any of the functions: {"name": <its name>, "arguments": <its parameters>}."""
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": spec.parameters},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, spec in functions.items()]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def required_schema(functions: dict, parallel: bool) -> dict:
    one = call_schema(functions)
    return {"type": "array", "items": one, "minItems": 1} if parallel else one


@dataclass
class CallText:
    """A call found in the output: its function's name (None until its string is complete) and the text of
    its arguments so far."""

    name: str | None = None
    arguments: str = ""
    arguments_complete: bool = False


def calls_in_prefix(text: str) -> list[CallText] | None:
    """The calls of a possibly unfinished output shaped as a call or an array of calls; None when it is
    not shaped so (as far as it goes)."""
    pos = _skip(text, 0)
    if pos == len(text):
        return []
    in_array = text[pos] == "["
    pos = _skip(text, pos + 1) if in_array else pos
    calls: list[CallText] = []
    while pos < len(text):
        if in_array and text[pos] == "]":
            break
        if calls and in_array:
            if text[pos] != ",":
                return None
            pos = _skip(text, pos + 1)
            if pos == len(text):
                break
        if text[pos] != "{":
            return None
        call = CallText()
        calls.append(call)
        pos = _call_members(text, pos + 1, call)
        if pos is None:
            return None
        if pos >= len(text) or not in_array:
            break
        pos = _skip(text, pos)
    return calls


def _call_members(text: str, pos: int, call: CallText) -> int | None:
    """Parse the members of a call object from just after its '{'; the position after its '}' (or the end
    of the text, when it stops inside), None when it is not a call."""
    while True:
        pos = _skip(text, pos)
        if pos == len(text):
            return pos
        if text[pos] == "}":
            return pos + 1
        if text[pos] == ",":
            pos = _skip(text, pos + 1)
            if pos == len(text):
                return pos
        key_end = _value_end(text, pos)
        if text[pos] != '"':
            return None
        if key_end is None:
            return len(text)
        key = json.loads(text[pos:key_end])
        pos = _skip(text, key_end)
        if pos == len(text):
            return pos
        if text[pos] != ":":
            return None
        start = _skip(text, pos + 1)
        end = _value_end(text, start)
        if key == "name":
            if end is not None:
                name = json.loads(text[start:end])
                if not isinstance(name, str):
                    return None
                call.name = name
        elif key == "arguments":
            call.arguments = text[start:end] if end is not None else text[start:]
            call.arguments_complete = end is not None
        else:
            return None
        if end is None:
            return len(text)
        pos = end


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _value_end(text: str, pos: int) -> int | None:
    """The end of the JSON value that starts at pos, or None when the text stops inside it."""
    if pos >= len(text):
        return None
    first = text[pos]
    if first == '"':
        i = pos + 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                return i + 1
            i += 1
        return None
    if first in "{[":
        depth, i, in_string = 0, pos, False
        while i < len(text):
            ch = text[i]
            if in_string:
                if ch == "\\":
                    i += 1
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    i = pos                               # a number, true, false or null: ends at a delimiter
    while i < len(text) and text[i] not in ",}] \t\r\n":
        i += 1
    return i if i < len(text) else None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finished_calls(mode: str, functions: dict, text: str) -> list[dict] | None:
    """The OpenAI tool calls of a finished output, or None when it makes none (see the module doc)."""
    import jsonschema

    if mode == "none":
        return None
    if mode == "named":
        [name] = functions
        try:
            json.loads(text)
        except ValueError:
            return None
        found = [CallText(name, text.strip(), True)]
    else:
        found = calls_in_prefix(text)
        try:
            json.loads(text)
        except ValueError:
            return None
        if not found or any(c.name is None or not c.arguments_complete for c in found):
            return None
    calls = []
    for call in found:
        if call.name not in functions:
            return None
        if mode == "auto":
            try:
                jsonschema.validate(json.loads(call.arguments), functions[call.name].parameters)
            except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
                return None
        calls.append({"id": new_call_id(), "type": "function",
                      "function": {"name": call.name, "arguments": call.arguments}})
    return calls


@dataclass
class ToolCallStream:
    """One choice's tool calls as OpenAI streams them: per call, a first delta with its index, id, type
    and name, then fragments of its arguments. `auto` holds back an output that starts like a call until
    it finishes (only then is it known to be one); an output that cannot be a call streams as content."""

    mode: str
    functions: dict
    # Names its calls' ids: "call_" + a hash of it and the call's index, so that a stream resumed on
    # another server (server/resumable.py) names a call as the uninterrupted stream would have.
    call_id_prefix: str = field(default_factory=lambda: uuid.uuid4().hex)
    _sent: list[int] = field(default_factory=list)      # argument characters sent, per call
    _content_sent: int = 0
    _is_content: bool = False

    def progress(self) -> dict:
        """What it has sent, as JSON (a resumed stream goes on from it: `resumed`)."""
        return {"call_id_prefix": self.call_id_prefix, "sent": self._sent, "content_sent": self._content_sent,
                "is_content": self._is_content}

    @classmethod
    def resumed(cls, mode: str, functions: dict, progress: dict) -> ToolCallStream:
        return cls(mode, functions, str(progress["call_id_prefix"]), [int(n) for n in progress["sent"]],
                   int(progress["content_sent"]), bool(progress["is_content"]))

    def deltas(self, text: str, finished: bool) -> tuple[str, list[dict]]:
        """(content text to send, tool-call deltas to send) for the output so far."""
        if self._is_content:
            return self._content(text)
        if self.mode == "named":
            [name] = self.functions
            calls = [CallText(name, text.strip(), finished)]   # as finished_calls reads it
        elif self.mode == "auto":
            start = text.lstrip()[:1]
            if start and start not in "{[":
                self._is_content = True
                return self._content(text)
            if not finished:
                return "", []
            made = finished_calls(self.mode, self.functions, text)
            if made is None:
                self._is_content = True
                return self._content(text)
            calls = [CallText(c["function"]["name"], c["function"]["arguments"], True) for c in made]
        else:
            calls = calls_in_prefix(text) or []
        return "", self._call_deltas(calls)

    def flush_content(self, text: str) -> tuple[str, list[dict]]:
        """An output that will not be a call after all (it was cut short): the text not sent yet."""
        self._is_content = True
        return self._content(text)

    def _content(self, text: str) -> tuple[str, list[dict]]:
        new = text[self._content_sent:]
        self._content_sent = len(text)
        return new, []

    def _call_deltas(self, calls: list[CallText]) -> list[dict]:
        deltas = []
        for index, call in enumerate(calls):
            if call.name is None:
                break                                   # its name is still being written
            if index == len(self._sent):
                self._sent.append(0)
                call_id = hashlib.sha256(f"{self.call_id_prefix}:{index}".encode()).hexdigest()[:24]
                deltas.append({"index": index, "id": f"call_{call_id}", "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            fragment = call.arguments[self._sent[index]:]
            if fragment:
                self._sent[index] = len(call.arguments)
                deltas.append({"index": index, "function": {"arguments": fragment}})
        return deltas

    @property
    def made_calls(self) -> bool:
        return bool(self._sent)
