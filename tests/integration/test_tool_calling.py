"""Tool calling through the official openai client, against a real engine and a gateway.

The client code is the openai SDK's tool-calling example as users write it. The bundled
135M model rarely decides to call a tool by itself, so the "auto" tests also give it a
guided_regex that spells a Hermes call: the server's parser (not the test) must then turn
that text into tool_calls, whole and streamed alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.integration.conftest import free_port, stop, wait_healthy

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}},
                       "required": ["tz"], "additionalProperties": False}}},
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris", '
               r'"unit": "celsius"\}\}\n</tool_call>')


@pytest.fixture(scope="module")
def gateway(engine_url: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "strata.gateway.cli", "--replica", engine_url,
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 60)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module", params=["engine", "gateway"])
def client(request: pytest.FixtureRequest, engine_url: str) -> openai.OpenAI:
    url = engine_url if request.param == "engine" else request.getfixturevalue("gateway")
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _streamed(client: openai.OpenAI, **kw: Any) -> tuple[str, list[dict[str, str]], str | None]:
    """The openai docs' way of reassembling streamed tool_calls deltas."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                if tc.function is not None:
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], finish


def _whole_calls(message: Any) -> list[dict[str, str]]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in message.tool_calls or []]


def _same_calls(a: list[dict[str, str]], b: list[dict[str, str]]) -> bool:
    return [(c["name"], json.loads(c["arguments"])) for c in a] == \
        [(c["name"], json.loads(c["arguments"])) for c in b]


def test_required_and_named_choices_give_calls_that_match_the_schemas(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=80, temperature=0)
    r = client.chat.completions.create(tool_choice="required", **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    content, calls, finish = _streamed(client, tool_choice="required", **kw)
    assert finish == "tool_calls" and not content and _same_calls(calls, _whole_calls(choice.message))

    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(tool_choice=named, **kw)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and call.id
    jsonschema.validate(json.loads(call.function.arguments), schemas["get_time"])
    _, calls, _ = _streamed(client, tool_choice=named, **kw)
    assert _same_calls(calls, _whole_calls(r.choices[0].message))


def test_auto_parses_hermes_calls_whole_and_streamed(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=60, temperature=0,
              extra_body={"guided_regex": "Checking\\.\\n" + HERMES_CALL})
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking.\n"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    content, calls, finish = _streamed(client, **kw)
    assert content == "Checking.\n" and finish == "tool_calls"
    assert _same_calls(calls, _whole_calls(choice.message)) and calls[0]["id"].startswith("chatcmpl-tool-")


def test_none_and_plain_auto_answer_in_text(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=12, temperature=0)
    for choice in ("none", "auto"):
        r = client.chat.completions.create(tool_choice=choice, **kw)
        assert r.choices[0].message.content and not r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "length"


def test_the_conversation_goes_on_with_the_tool_result(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, tools=TOOLS, max_tokens=30, temperature=0)
    first = client.chat.completions.create(messages=MESSAGES, tool_choice="required", **kw)
    msg = first.choices[0].message
    history = [*MESSAGES, msg.model_dump(exclude_none=True)]
    for call in msg.tool_calls:
        history.append({"role": "tool", "tool_call_id": call.id,
                        "content": json.dumps({"temperature": 21, "unit": "celsius"})})
    r = client.chat.completions.create(messages=history, **kw)
    assert r.choices[0].message.content


def test_tool_errors_are_400s_naming_the_field(client: openai.OpenAI) -> None:
    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
         "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "no-such-type"}}}], tool_choice="required"),
         "tools.0.function.parameters"),
        (dict(tools=TOOLS, tool_choice="required",
              response_format={"type": "json_object"}), "response_format"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, **extra)
        assert e.value.body["param"] == param, e.value.body
