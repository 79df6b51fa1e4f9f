"""Tool-call parsing (Hermes, Llama 3 JSON), its streaming, the forced-choice grammars, and
the shipped Hermes template."""

from __future__ import annotations

import json

import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.engine.sampling import GuidedDecoding
from strata.engine.tokenizer import _compile_template
from strata.engine.tool_calls import (
    ChoiceTools,
    ToolCallStream,
    ToolConfig,
    ToolMode,
    forced_decoding,
    parse_hermes,
    parse_llama3_json,
    parser_for,
    shipped_template,
    template_for,
)
from strata.protocol import ChatCompletionRequest, OpenAIError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
HERMES_OUT = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
              '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
              '\n</tool_call>')


def _calls(calls: list) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_parses_content_and_calls() -> None:
    content, calls = parse_hermes(HERMES_OUT)
    assert content == "Let me look.\n"
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert len({c.id for c in calls}) == 2
    # Unterminated last block (the model stopped at EOS): still a call.
    _, calls = parse_hermes('<tool_call>\n{"name": "f", "arguments": {}}')
    assert _calls(calls) == [("f", {})]
    # Not JSON: all of it is content, as vLLM's parser leaves it.
    assert parse_hermes("<tool_call>\n{oops</tool_call>") == ("<tool_call>\n{oops</tool_call>", [])
    assert parse_hermes("plain text") == ("plain text", [])


def test_llama3_json_parses_calls_separated_by_semicolons() -> None:
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    content, calls = parse_llama3_json(text)
    assert content is None and _calls(calls) == [("a", {"x": 1}), ("b", {})]
    assert parse_llama3_json("Hello {not a call}") == ("Hello {not a call}", [])


def _stream(parser: str, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]]]:
    tools = ChoiceTools(ToolMode("auto", parser=parser))
    pieces, last = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        pieces.append(text[last:cut])
        last = cut
    deltas = [d for p in pieces for d in tools.feed(p)]
    final, finish = tools.finish("stop")
    deltas += final
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            c["name"] += tc.get("function", {}).get("name", "")
            c["arguments"] += tc.get("function", {}).get("arguments", "")
    assert finish == ("tool_calls" if calls else "stop")
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([
    ("hermes", HERMES_OUT), ("hermes", "no calls at all, just < and <tool"),
    ("hermes", "<tool_call>\n{broken</tool_call>"),
    ("llama3_json", '{"name": "a", "parameters": {"x": "y"}}'),
    ("llama3_json", "  plain {text}"),
]), st.lists(st.integers(0, 200), max_size=8))
def test_streamed_deltas_reassemble_to_the_whole_parse(case: tuple[str, str], cuts: list[int]) -> None:
    parser, text = case
    content, calls = _stream(parser, text, [c for c in cuts if c < len(text)])
    msg, _ = ChoiceTools(ToolMode("auto", parser=parser)).message(text, "stop")
    whole = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls", [])]
    assert calls == whole
    assert content == (msg["content"] or "")


def test_parallel_tool_calls_false_keeps_the_first_call_whole_and_streamed() -> None:
    mode = ToolMode("auto", parser="hermes", parallel=False)
    msg, finish = ChoiceTools(mode).message(HERMES_OUT, "stop")
    assert finish == "tool_calls" and len(msg["tool_calls"]) == 1
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    tools = ChoiceTools(mode)
    deltas = tools.feed(HERMES_OUT) + tools.finish("stop")[0]
    assert {tc["index"] for d in deltas for tc in d.get("tool_calls", [])} == {0}


def _req(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], **kw})


def test_forced_choices_compile_to_grammars_and_refuse_bad_schemas() -> None:
    assert forced_decoding(_req()) is None
    assert forced_decoding(_req(tool_choice="required")).param == "tools"
    named = forced_decoding(_req(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named.param == "tools.0.function.parameters"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}

    def check(guided: GuidedDecoding) -> None:
        if llguidance.LLMatcher.validate_grammar(guided.grammar):
            raise OpenAIError("unusable", param=guided.param)

    with pytest.raises(OpenAIError) as e:
        forced_decoding(_req(tools=[WEATHER, bad], tool_choice="required"), check)
    assert e.value.param == "tools.1.function.parameters"
    assert forced_decoding(_req(tool_choice="required"), check) is not None


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "guided_json": {"type": "object"}}, "guided_json"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
])
def test_request_refusals_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as e:
        _req(**body)
    assert e.value.param == param


def test_template_and_parser_choice() -> None:
    chatml = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    assert template_for(ToolConfig(), chatml, True) == shipped_template()
    assert template_for(ToolConfig(), chatml, False) is None
    assert template_for(ToolConfig(), "{{ tools }}<|im_start|>", True) is None
    with pytest.raises(OpenAIError):
        template_for(ToolConfig(), "[INST]{{ messages }}", True)
    assert parser_for(ToolConfig(), chatml) == "hermes"
    assert parser_for(ToolConfig(), "<|eot_id|>") == "llama3_json"
    assert parser_for(ToolConfig(parser="llama3_json"), chatml) == "llama3_json"
    assert parser_for(ToolConfig(), "[INST]") is None


def test_shipped_template_renders_tools_calls_and_results() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
    ]
    text = _compile_template(shipped_template()).render(
        messages=messages, tools=[WEATHER], add_generation_prompt=True)
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_stream_holds_back_a_possible_opening_tag() -> None:
    s = ToolCallStream("hermes")
    assert s.feed("Hi <tool") == ("Hi ", [])
    assert s.feed("bar") == ("<toolbar", [])
