"""Tool calling: tools into the chat template, the model's calls out of its text.

As vLLM: the tools reach the model through its chat template (or `--chat-template`; a
ChatML model whose template has no tools, such as SmolLM2, gets the Hermes-style template
shipped here); with tool_choice "auto" a parser for the model's call format (Hermes
`<tool_call>` JSON, Llama 3 JSON; `--tool-call-parser`) turns the output into calls;
"required" and a named function are enforced by the grammar engine: a named choice's
output is its arguments, a required one's a JSON array of {"name", "parameters"}.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from strata.engine.guided import compile_json_schema
from strata.engine.sampling import GuidedDecoding
from strata.protocol import ChatCompletionRequest, NamedToolChoice, OpenAIError

PARSERS = ("hermes", "llama3_json")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
LLAMA3_TAG = "<|python_tag|>"


def shipped_template(name: str = "hermes_tools") -> str:
    """A chat template shipped with strata (strata/engine/templates/NAME.jinja)."""
    return resources.files("strata.engine").joinpath(f"templates/{name}.jinja").read_text()


@dataclass(frozen=True)
class ToolConfig:
    """How one replica renders and parses tool calls (the engine's tool flags)."""

    parser: str = "auto"  # auto (from the chat template), hermes, llama3_json
    enable_auto_tool_choice: bool = True
    chat_template: str | None = None  # overrides the model's for every chat request

    @classmethod
    def from_options(cls, parser: str, auto: bool, chat_template: str | None) -> ToolConfig:
        """From the engine flags: ``chat_template`` is a Jinja file or a shipped name."""
        text = None
        if chat_template:
            path = Path(chat_template)
            text = path.read_text() if path.is_file() else shipped_template(chat_template)
        return cls(parser, auto, text)


def template_for(config: ToolConfig, model_template: str | None, has_tools: bool) -> str | None:
    """The chat template to render with (None: the model's own)."""
    if config.chat_template:
        return config.chat_template
    if has_tools and model_template and "tools" not in model_template:
        if "<|im_start|>" in model_template:
            return shipped_template()
        raise OpenAIError(
            "this model's chat template does not render tools; start the engine with "
            "--chat-template naming a template that does", param="tools")
    return None


def parser_for(config: ToolConfig, template: str | None) -> str | None:
    """The call-format parser: as configured, or recognised from the template."""
    if config.parser != "auto":
        return config.parser
    t = template or ""
    if HERMES_OPEN in t or "<|im_start|>" in t:
        return "hermes"
    if LLAMA3_TAG in t or "<|eot_id|>" in t:
        return "llama3_json"
    return None


def template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as templates expect them (a call's arguments as an object)."""
    out = []
    for m in req.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            d["tool_calls"] = [_call_for_template(c) for c in m.tool_calls]
        out.append(d)
    return out


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except ValueError:
            pass  # rendered as the string it is
    return {**call, "function": fn}


def _parameters(tool: Any) -> dict[str, Any]:
    params = tool.function.parameters
    return params if params is not None else {"type": "object", "properties": {}}


def forced_decoding(req: ChatCompletionRequest,
                    check: Callable[[GuidedDecoding], None] | None = None) -> GuidedDecoding | None:
    """The grammar of tool_choice "required" or a named function (None otherwise).

    ``check`` validates a grammar (raising OpenAIError); each function's schema is checked
    alone, so that a 400 names the function whose parameters are not a usable schema.
    """
    tools = req.tools or []
    if isinstance(req.tool_choice, NamedToolChoice):
        i, tool = next((i, t) for i, t in enumerate(tools)
                       if t.function.name == req.tool_choice.function.name)
        return _compiled(_parameters(tool), f"tools.{i}.function.parameters", check)
    if req.tool_choice != "required":
        return None
    for i, t in enumerate(tools):
        _compiled(_parameters(t), f"tools.{i}.function.parameters", check)
    items = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False}
             for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return _compiled(schema, "tools", check)


def _compiled(schema: Any, param: str,
              check: Callable[[GuidedDecoding], None] | None) -> GuidedDecoding:
    try:
        guided = compile_json_schema(schema, param)
    except ValueError as e:
        raise OpenAIError(str(e), param=param) from None
    if check is not None:
        check(guided)
    return guided


@dataclass
class ToolCall:
    """One parsed call; `arguments` is JSON text, as the API carries it."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"chatcmpl-tool-{uuid.uuid4().hex}"

    def message(self) -> dict[str, Any]:
        """The call as it appears in a message's tool_calls."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def deltas(self, index: int) -> list[dict[str, Any]]:
        """The call as vLLM streams it: id, type and name first, then the arguments."""
        return [{"index": index, "id": self.id, "type": "function",
                 "function": {"name": self.name}},
                {"index": index, "function": {"arguments": self.arguments}}]


def _call_of(obj: Any, args_key: str = "arguments") -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("a tool call needs a string `name`")
    args = obj.get(args_key, obj.get("parameters", obj.get("arguments", {})))
    return ToolCall(obj["name"], args if isinstance(args, str)
                    else json.dumps(args, ensure_ascii=False))


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of Hermes-style output; text that does not parse is content."""
    start = text.find(HERMES_OPEN)
    if start < 0:
        return text, []
    try:
        calls = [_call_of(json.loads(m.group(1).strip()))
                 for m in _HERMES_BLOCK.finditer(text, start)]
    except ValueError:
        return text, []
    content = text[:start]
    return (content if content.strip() else None), calls


def parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of Llama 3 JSON calls: objects separated by ';', maybe after the tag."""
    body = text.strip()
    if body.startswith(LLAMA3_TAG):
        body = body[len(LLAMA3_TAG):].lstrip()
    if not body.startswith("{"):
        return text, []
    decoder = json.JSONDecoder()
    calls, i = [], 0
    try:
        while i < len(body):
            obj, i = decoder.raw_decode(body, i)
            calls.append(_call_of(obj, "parameters"))
            while i < len(body) and body[i] in " \t\n;":
                i += 1
    except ValueError:
        return text, []
    return None, calls


def parse_required(text: str) -> list[ToolCall]:
    """The calls of a tool_choice "required" output, a JSON array; ValueError if it is not."""
    items = json.loads(text)
    if not isinstance(items, list):
        raise ValueError("not a JSON array")
    return [_call_of(obj, "parameters") for obj in items]


def parse(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an auto tool-choice output with the named parser."""
    return parse_hermes(text) if parser == "hermes" else parse_llama3_json(text)


class ToolCallStream:
    """Streams one choice of an auto tool-choice output: content as it comes, each call
    once it is complete (text that could still open a call is held back)."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of text handed out as content
        self.in_calls = False
        self.calls: list[ToolCall] = []
        self._scan = 0  # where the next Hermes block may start

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool_calls deltas) for the next piece of output text."""
        self.text += delta
        if not self.in_calls:
            start = self._calls_start()
            if start is None:  # hold back what may still open a call
                upto = len(self.text) - self._held()
                content, self.sent = self.text[self.sent:upto], max(self.sent, upto)
                return content, []
            content, self.sent, self.in_calls = self.text[self.sent:start], start, True
            self._scan = start
            return content, self._complete_hermes()
        return "", self._complete_hermes()

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """What is left at the end: the remaining calls, or the held text as content."""
        if not self.in_calls:
            content, self.sent = self.text[self.sent:], len(self.text)
            return content, []
        _, calls = parse(self.parser, self.text[self.sent:])
        new = calls[len(self.calls):] if self.parser == "hermes" else calls
        if not calls and not self.calls:  # nothing parsed: it was content after all
            return self.text[self.sent:], []
        deltas = []
        for call in new:
            deltas += call.deltas(len(self.calls))
            self.calls.append(call)
        return "", deltas

    def _calls_start(self) -> int | None:
        if self.parser == "hermes":
            i = self.text.find(HERMES_OPEN)
            return i if i >= 0 else None
        body = self.text.lstrip()
        if body.startswith("{") or body.startswith(LLAMA3_TAG):
            return len(self.text) - len(body)
        return None

    def _held(self) -> int:
        if self.parser != "hermes":
            body = self.text.lstrip()  # undecided until the first visible character
            return len(self.text) if not body or LLAMA3_TAG.startswith(body) else 0
        for n in range(min(len(HERMES_OPEN) - 1, len(self.text)), 0, -1):
            if HERMES_OPEN.startswith(self.text[-n:]):
                return n
        return 0

    def _complete_hermes(self) -> list[dict[str, Any]]:
        if self.parser != "hermes":
            return []
        deltas: list[dict[str, Any]] = []
        while True:
            end = self.text.find(HERMES_CLOSE, self._scan)
            if end < 0:
                return deltas
            block = self.text[self._scan:end]
            self._scan = end + len(HERMES_CLOSE)
            opened = block.find(HERMES_OPEN)
            if opened < 0:
                continue
            block = block[opened + len(HERMES_OPEN):]
            try:
                call = _call_of(json.loads(block.strip()))
            except ValueError:
                continue  # left to finish(), which treats unparsable output as content
            deltas += call.deltas(len(self.calls))
            self.calls.append(call)


@dataclass(frozen=True)
class ToolMode:
    """How a chat request's output becomes tool calls: auto (parsed), named or required."""

    kind: str  # auto, named, required
    parser: str = ""  # auto: the call-format parser
    name: str = ""  # named: the function
    parallel: bool = True  # auto: False keeps the first call only (parallel_tool_calls)


class ChoiceTools:
    """One choice's output turned into content and tool calls, whole or streamed."""

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.stream = ToolCallStream(mode.parser) if mode.kind == "auto" else None
        self.text = ""
        self.call_id = ToolCall(mode.name, "").id
        self.called = False

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The whole message and its finish reason (tool_calls when auto or required called)."""
        calls: list[ToolCall] = []
        content: str | None = text
        if self.mode.kind == "named":
            calls, content = [ToolCall(self.mode.name, text, self.call_id)], None
        elif self.mode.kind == "required":
            try:
                calls, content = parse_required(text), None
            except ValueError:
                pass  # cut short (length): the text is all there is
        else:
            content, calls = parse(self.mode.parser, text)
            calls = calls if self.mode.parallel else calls[:1]
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [c.message() for c in calls]
        return msg, self._finish(bool(calls), finish_reason)

    def _finish(self, called: bool, finish_reason: str | None) -> str | None:
        if called and self.mode.kind != "named" and finish_reason == "stop":
            return "tool_calls"
        return finish_reason

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Stream deltas for the next output text."""
        if not text:
            return []
        if self.mode.kind == "named":
            call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if not self.called:
                call.update(id=self.call_id, type="function")
                call["function"] = {"name": self.mode.name, "arguments": text}
                self.called = True
            return [{"tool_calls": [call]}]
        if self.mode.kind == "required":
            self.text += text
            return []
        assert self.stream is not None
        content, calls = self.stream.feed(text)
        return self._deltas(content, calls)

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas and the finish reason."""
        if self.mode.kind == "named":
            return [], finish_reason
        if self.mode.kind == "required":
            try:
                calls = parse_required(self.text)
            except ValueError:
                return ([{"content": self.text}] if self.text else []), finish_reason
            deltas = [d for i, c in enumerate(calls) for d in c.deltas(i)]
            return [{"tool_calls": [d]} for d in deltas], self._finish(True, finish_reason)
        assert self.stream is not None
        content, calls = self.stream.finish()
        return self._deltas(content, calls), self._finish(bool(self.stream.calls), finish_reason)

    def _deltas(self, content: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"content": content}] if content else []
        return out + [{"tool_calls": [d]} for d in calls if self.mode.parallel or d["index"] == 0]
