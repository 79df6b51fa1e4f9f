"""OpenAI-compatible request and response models, SSE framing and error bodies.

Field coverage follows vLLM's OpenAI server: every field it honours is honoured
here or refused with a 400 that names it. Shared by the engine server and the
gateway.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import models_json_schema


class OpenAIError(Exception):
    """An error to return to the client in OpenAI's error format."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.err_type = err_type
        self.param = param
        self.code = code if code is not None else status_code

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return error_body(self.message, self.err_type, self.param, self.code)


def error_body(
    message: str, err_type: str = "BadRequestError", param: str | None = None, code: Any = 400
) -> dict[str, Any]:
    """OpenAI error envelope."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


# Bounds of the API's numbers, as vLLM checks them: seeds are torch int64, ids and counts
# fit int32. A number outside them is the client's mistake (400), never an overflow deep
# in torch that kills the engine loop.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_N = 128  # choices per prompt
MAX_LOGPROBS = 20  # OpenAI's cap on top logprobs
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024  # of one stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300  # entries, OpenAI's cap
MAX_TEMPLATE_KWARGS = 64
# Names the chat template renderer binds itself: a kwarg of the same name is refused, except
# the two switches that vLLM also lets chat_template_kwargs set.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "self", "tools", "documents", "chat_template"})
TEMPLATE_SWITCHES = ("add_generation_prompt", "continue_final_message")

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]


@dataclass(frozen=True)
class RequestLimits:
    """Caps on the work one request may create; a request beyond them is refused (4xx)."""

    max_body_bytes: int = 8 << 20
    max_seqs_per_request: int = 256  # prompts x n
    max_json_depth: int = 32

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024 or self.max_seqs_per_request < 1 or self.max_json_depth < 4:
            raise ValueError(
                "RequestLimits: max_body_bytes >= 1024, max_seqs_per_request >= 1 and "
                "max_json_depth >= 4 are needed to serve any request"
            )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; send a finite number")


def parse_json_body(body: bytes, max_depth: int = 32) -> dict[str, Any]:
    """A request body as a JSON object, or an OpenAIError (400) saying what is wrong.

    Python's json accepts NaN/Infinity literals and lone UTF-16 surrogates and recurses
    per nesting level; each is refused here so that none reaches a tokenizer or torch.
    """
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise OpenAIError(f"the JSON body nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise OpenAIError(f"invalid JSON body: {e}") from None
    if not isinstance(data, dict):
        raise OpenAIError("the request body must be a JSON object")
    check_json_value(data, max_depth)
    return data


def check_json_value(data: Any, max_depth: int = 32) -> None:
    """Refuse nesting deeper than max_depth and strings that are not valid Unicode text."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= max_depth:
            raise OpenAIError(
                f"{path or 'the body'} nests deeper than {max_depth} levels", param=path or None
            )
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, path)
                stack.append((v, f"{path}.{k}" if path else k, depth + 1))
        else:
            stack.extend((v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(value))


def _check_text(s: str, path: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError(
            f"{path or 'a key'} contains a lone UTF-16 surrogate (e.g. \\ud800), which is not "
            "text; send valid Unicode",
            param=path or None,
        ) from None


_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids (integers in "
    "[0, vocabulary size)) or a list of token-id lists, none of them empty",
    "stop": f"must be a string or a list of at most {MAX_STOP_STRINGS} strings, each of 1 to "
    f"{MAX_STOP_CHARS} characters",
    "content": "must be a string, null, or a list of {\"type\": \"text\", \"text\": ...} parts",
    "tool_choice": "must be \"none\", \"auto\", \"required\" or "
    "{\"type\": \"function\", \"function\": {\"name\": ...}}",
}


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        "[" in part or part in ("str", "int", "float", "bool", "none") or part.startswith("constrained-")
    )


def validation_error(e: ValidationError) -> OpenAIError:
    """A pydantic error as a 400 naming the field (`param`) and what it must be."""
    errs = e.errors()
    loc = errs[0]["loc"]
    cut = next((i for i, part in enumerate(loc) if _is_union_tag(part)), len(loc))
    path = [str(x) for x in loc[:cut] if x != "[key]"]
    param = ".".join(path) or None
    if cut < len(loc) and len(errs) > 1:  # every member of a union failed
        field_name = next((x for x in reversed(path) if not x.isdigit()), "")
        hint = _UNION_HINTS.get(field_name) or "; or ".join(
            dict.fromkeys(x["msg"] for x in errs)
        )
        message = f"{param}: {hint}"
    else:
        message = errs[0]["msg"].removeprefix("Value error, ")
        if "[key]" in loc:
            message = f"key {loc[-2]!r}: {message}" if len(loc) > 1 else message
        if param:
            message = f"{param}: {message}"
    return OpenAIError(message, param=param)


class StreamOptions(BaseModel):
    """stream_options of OpenAI's API."""

    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
    """Fields common to completions and chat completions (OpenAI + vLLM extensions).

    Strict: a JSON `true` is not the number 1 and `"5"` is not 5; floats must be finite.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: (
        Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
            Field(max_length=MAX_STOP_STRINGS),
        ]
        | None
    ) = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: (
        Annotated[
            dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Annotated[float, Field(ge=-100, le=100)]],
            Field(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = None
    user: str | None = None
    # vLLM extensions
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=1e6)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: Count = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    # Structured output (strata.engine.guided): OpenAI's response_format, vLLM's guided_*
    # extensions and its newer structured_outputs object; at most one of them per request.
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: Annotated[str, Field(max_length=65536)] | None = None
    guided_choice: Annotated[list[str], Field(min_length=1, max_length=4096)] | None = None
    guided_grammar: Annotated[str, Field(max_length=1 << 20)] | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: Annotated[str, Field(max_length=1024)] | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)] = 0
    request_id: Annotated[str, Field(max_length=256)] | None = None

    @model_validator(mode="after")
    def _refusals(self) -> _SamplingFields:
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError("best_of other than n is not supported; leave it unset", param="best_of")
        if self.guided_decoding_backend not in (None, "auto", "llguidance", "guidance"):
            raise OpenAIError(
                "guided_decoding_backend: this server's structured output runs on llguidance; "
                "send \"auto\" or \"llguidance\", or leave it unset",
                param="guided_decoding_backend",
            )
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        return self

    @property
    def structured_output_field(self) -> str | None:
        """The first structured-output field the request sets, or None."""
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format"
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs"):
            if getattr(self, name) is not None:
                return name
        return None

    def stop_list(self) -> list[str]:
        """Stop strings as a list."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: str | None = None
    # As vLLM: a text prompt gets the tokenizer's special tokens (BOS for Gemma, Llama 3).
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.suffix:
            raise OpenAIError("suffix is not supported; leave it unset", param="suffix")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one per string or token-id list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    """One chat message; content may be text or a list of text parts."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        """Flatten text parts; non-text parts are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(
                    f"message content part type {part.get('type')!r} is not supported; "
                    "this model takes text only"
                )
            text = part.get("text", "")
            if not isinstance(text, str):
                raise ValueError("a text content part's `text` must be a string")
            parts.append(text)
        return "".join(parts)


class FunctionDefinition(BaseModel):
    """A tool's function: its name, what it does, and a JSON schema of its arguments."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """An entry of `tools`."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    """{"name": ...} of a named tool choice."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=256)]


class NamedToolChoice(BaseModel):
    """tool_choice naming the function to call."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=1024)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The template writes the special tokens; as vLLM, none are added on top by default.
    add_special_tokens: bool = False
    chat_template_kwargs: (
        Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_KWARGS)] | None
    ) = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.tool_choice not in (None, "none") and not self.tools:
            raise OpenAIError("tool_choice other than \"none\" needs `tools`", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or ()]
            if self.tool_choice.function.name not in names:
                raise OpenAIError(
                    f"tool_choice names function {self.tool_choice.function.name!r}, which is "
                    f"not among the tools ({', '.join(names)})", param="tool_choice")
        if self.forced_tool_choice and self.structured_output_field is not None:
            raise OpenAIError(
                f"{self.structured_output_field} cannot be combined with tool_choice "
                "\"required\" or a named function: the tool call is the structured output",
                param=self.structured_output_field)
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise OpenAIError(
                "continue_final_message and add_generation_prompt cannot both be true",
                param="continue_final_message",
            )
        return self

    @property
    def forced_tool_choice(self) -> bool:
        """tool_choice "required" or a named function: the output must be tool calls."""
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def template_kwargs(self) -> tuple[bool, bool, dict[str, Any]]:
        """(add_generation_prompt, continue_final_message, extra kwargs) for the renderer.

        As in vLLM, chat_template_kwargs may set the two switches (they override the
        top-level fields); other names the renderer binds itself are refused with a 400.
        """
        kwargs = dict(self.chat_template_kwargs or {})
        switches = {"add_generation_prompt": self.add_generation_prompt,
                    "continue_final_message": self.continue_final_message}
        for name in TEMPLATE_SWITCHES:
            if name in kwargs:
                value = kwargs.pop(name)
                if not isinstance(value, bool):
                    raise OpenAIError(
                        f"chat_template_kwargs.{name} must be true or false",
                        param=f"chat_template_kwargs.{name}",
                    )
                switches[name] = value
        bad = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS
                     or not k.isidentifier() or k.startswith("_"))
        if bad:
            raise OpenAIError(
                f"chat_template_kwargs may not set {', '.join(map(repr, bad))}: the renderer "
                "binds these itself, or they are not identifiers; use the request's own fields "
                "(messages) or drop them",
                param="chat_template_kwargs",
            )
        if switches["add_generation_prompt"] and switches["continue_final_message"]:
            raise OpenAIError(
                "continue_final_message and add_generation_prompt cannot both be true "
                "(chat_template_kwargs included); set one",
                param="chat_template_kwargs",
            )
        return switches["add_generation_prompt"], switches["continue_final_message"], kwargs


class TokenizeRequest(BaseModel):
    """POST /tokenize (engine): a prompt, or chat messages rendered by the template."""

    model_config = ConfigDict(extra="allow", strict=True)
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages


class DetokenizeRequest(BaseModel):
    """POST /detokenize (engine): token ids to text."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tokens: list[TokenId]


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest,
)


def openapi_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """An operation's requestBody naming a model of `openapi_components` (FastAPI openapi_extra)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def openapi_components(models: tuple[type[BaseModel], ...] = REQUEST_MODELS) -> dict[str, Any]:
    """JSON schemas of the request models (and what they use), keyed as OpenAPI components."""
    _, top = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    return dict(top.get("$defs", {}))


def openapi_document(
    title: str, operations: list[tuple[str, str, type[BaseModel] | None, str]]
) -> dict[str, Any]:
    """An OpenAPI 3.1 document of (method, path, request model or None, summary) operations.

    For services that are not FastAPI apps (the gateway), so that they can be described
    and fuzzed from the same pydantic models the engine validates with.
    """
    paths: dict[str, dict[str, Any]] = {}
    for method, path, model, summary in operations:
        op: dict[str, Any] = {
            "summary": summary,
            "operationId": f"{method}_{path.strip('/').replace('/', '_') or 'root'}",
            "responses": {
                "200": {"description": "OK"},
                "4XX": {"description": "The client's error, in OpenAI's error format"},
            },
        }
        if model is not None:
            op.update(openapi_request_body(model))
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {"schemas": openapi_components()},
    }


class UsageInfo(BaseModel):
    """Token accounting of a response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


def new_id(prefix: str) -> str:
    """OpenAI-style random id."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    """Unix seconds for `created` fields."""
    return int(time.time())


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event frame."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


class ModelCard(BaseModel):
    """An entry of GET /v1/models."""

    id: str
    object: str = "model"
    created: int = Field(default_factory=now_s)
    owned_by: str = "strata"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model, as vLLM lists it
    max_model_len: int | None = None
