"""Hostile input at the unit level: the request models, SamplingParams, and the engine core's
isolation of one failing sequence (the tiny random-weight model, real sampler and detokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from strata.engine.core import EngineCore, RequestError, SequenceFailed
from strata.engine.engine import EngineConfig, build_engine_core
from strata.engine.sampling import SamplingParams
from strata.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    RequestLimits,
    openapi_components,
    openapi_document,
    parse_json_body,
    validation_error,
)


def _refused(model: type, body: dict) -> OpenAIError:
    """The 400 a body gets, whether from field validation or a model-level refusal."""
    try:
        model.model_validate(body)
    except ValidationError as e:
        return validation_error(e)
    except OpenAIError as e:
        return e
    raise AssertionError(f"accepted: {body}")


HOSTILE_COMPLETIONS = [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n"),
    ({"n": 10**6}, "n"),
    ({"n": True}, "n"),
    ({"best_of": 2**70}, "best_of"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": 10**20}, "prompt_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 4.5}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"logit_bias": {"-1": 1}}, "logit_bias.-1"),
    ({"logit_bias": {"1e3": 1}}, "logit_bias.1e3"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 65}, "stop"),
    ({"stop": "x" * 1025}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
    ({"stop_token_ids": [2**40]}, "stop_token_ids.0"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": [1, -5]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [2**40]}, "prompt"),
    ({"priority": 2**40}, "priority"),
    ({"suffix": "x"}, "suffix"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize(("fields", "param"), HOSTILE_COMPLETIONS)
def test_completion_fields_are_range_checked_with_a_param(fields: dict, param: str) -> None:
    err = _refused(CompletionRequest, {"prompt": "hi", **fields})
    assert err.status_code == 400
    assert err.param == param, err.message
    assert err.body()["error"]["param"] == param


def test_bounds_are_inclusive_where_vllm_accepts() -> None:
    req = CompletionRequest.model_validate({
        "prompt": [0, 2**31 - 1], "seed": 2**63 - 1, "top_k": -1, "n": 128, "logprobs": 20,
        "logit_bias": {"0": -100, "49151": 100}, "stop": ["x"] * 64, "temperature": 0,
    })
    assert req.seed == 2**63 - 1 and req.n == 128
    assert CompletionRequest.model_validate({"prompt": "x", "seed": -(2**63)}).seed == -(2**63)


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"chat_template_kwargs": {f"k{i}": 1 for i in range(65)}}, "chat_template_kwargs"),
])
def test_chat_fields_are_range_checked_with_a_param(fields: dict, param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    err = _refused(ChatCompletionRequest, body)
    assert err.status_code == 400 and err.param == param, err.message


def test_chat_template_kwargs_switches_are_honoured_and_reserved_names_refused() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]}
    req = ChatCompletionRequest.model_validate(
        {**base, "chat_template_kwargs": {"add_generation_prompt": True, "enable_thinking": False}})
    assert req.template_kwargs() == (True, False, {"enable_thinking": False})
    req = ChatCompletionRequest.model_validate(
        {**base, "chat_template_kwargs": {"add_generation_prompt": False,
                                          "continue_final_message": True}})
    assert req.template_kwargs()[:2] == (False, True)
    for bad in ({"messages": []}, {"self": 1}, {"_private": 1}, {"not an identifier": 1},
                {"add_generation_prompt": "yes"}, {"continue_final_message": True}):
        req = ChatCompletionRequest.model_validate({**base, "chat_template_kwargs": bad})
        with pytest.raises(OpenAIError) as exc:
            req.template_kwargs()
        assert exc.value.status_code == 400 and exc.value.param.startswith("chat_template_kwargs")


@pytest.mark.parametrize(("body", "fragment"), [
    (b'{"prompt": "hi", "temperature": NaN}', "NaN"),
    (b'{"prompt": "hi", "temperature": -Infinity}', "Infinity"),
    (b'{"prompt": "\\ud800"}', "surrogate"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "surrogate"),
    (b'{"\\ud800": 1}', "surrogate"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "deeper"),
    (b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}", "deeper"),
    (b'{"prompt": "hi"', "invalid JSON"),
    (b"\xff\xfe", "invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"n": 1' + b"0" * 5000 + b"}", "invalid JSON"),
])
def test_parser_refuses_what_python_json_lets_through(body: bytes, fragment: str) -> None:
    with pytest.raises(OpenAIError) as exc:
        parse_json_body(body, max_depth=32)
    assert exc.value.status_code == 400 and fragment in exc.value.message


def test_parser_passes_ordinary_unicode() -> None:
    data = parse_json_body(json.dumps({"prompt": "héllo 😀 \u4e2d"}).encode())
    assert data["prompt"] == "héllo 😀 中"


@pytest.mark.parametrize("kwargs", [
    {"seed": 2**64}, {"seed": -(2**63) - 1}, {"top_k": 2**63}, {"temperature": float("nan")},
    {"top_p": float("inf")}, {"max_tokens": 2**40}, {"stop_token_ids": (-1,)},
    {"logit_bias": {5: float("nan")}}, {"logit_bias": {-3: 1.0}}, {"repetition_penalty": float("inf")},
])
def test_sampling_params_refuse_what_torch_cannot_take(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_request_limits_validate() -> None:
    with pytest.raises(ValueError):
        RequestLimits(max_seqs_per_request=0)


def test_openapi_components_name_every_request_model() -> None:
    comps = openapi_components()
    assert {"CompletionRequest", "ChatCompletionRequest", "ChatMessage"} <= set(comps)
    assert comps["CompletionRequest"]["properties"]["seed"]["anyOf"][0]["maximum"] == 2**63 - 1
    doc = openapi_document("t", [("POST", "/v1/completions", CompletionRequest, "c")])
    ref = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert ref["schema"]["$ref"] == "#/components/schemas/CompletionRequest"
    assert "$defs" not in json.dumps(doc)  # every reference resolves inside components


# -- the engine core: one failing sequence fails alone ---------------------------------------


@pytest.fixture(scope="module")
def core(tiny_hf_dir: Path) -> EngineCore:
    return build_engine_core(EngineConfig(
        model=str(tiny_hf_dir), dtype="float32", threads=1, num_kv_blocks=64, max_model_len=256))


def _run(core: EngineCore, max_steps: int = 200) -> tuple[dict[int, list], dict[int, BaseException]]:
    outs: dict[int, list] = {}
    failures: dict[int, BaseException] = {}
    for _ in range(max_steps):
        if not core.has_work:
            break
        for o in core.step():
            outs.setdefault(o.seq_id, []).append(o)
        failures.update(core.take_failures())
    assert not core.has_work
    return outs, failures


def _assert_no_leak(core: EngineCore) -> None:
    assert core.blocks.num_free_blocks == core.blocks.num_blocks
    assert not core.states and core.scheduler.num_unfinished == 0


def test_a_sampler_fault_fails_its_sequence_alone(core: EngineCore) -> None:
    ids = core.tokenizer.encode("The quick brown fox")
    good = SamplingParams(max_tokens=6, temperature=0.8, seed=1, top_k=5)
    bad = SamplingParams(max_tokens=6, temperature=0.8, top_k=5)
    core.add(1, ids, good, 0.0)
    core.add(2, ids, bad, 0.0)
    # A logit_bias id that slipped past every check: the real sampler's indexing raises.
    object.__setattr__(bad, "logit_bias", {10**9: 1.0})
    core.add(3, ids, SamplingParams(max_tokens=6, temperature=0), 0.0)
    outs, failures = _run(core)
    assert set(failures) == {2} and isinstance(failures[2], SequenceFailed)
    for sid in (1, 3):
        assert outs[sid][-1].finished and sum(len(o.token_ids) for o in outs[sid]) == 6
    assert 2 not in outs
    _assert_no_leak(core)


def test_a_detokenizer_fault_fails_its_sequence_alone(core: EngineCore) -> None:
    ids = core.tokenizer.encode("Once upon a time")
    for sid in (10, 11, 12):
        core.add(sid, ids, SamplingParams(max_tokens=8, temperature=0), 0.0)

    def explode(token_id: int) -> str:
        raise RuntimeError("detokenizer fault injected by the test")

    core.step()  # prefill all three and sample their first tokens
    core.states[11].detok.add = explode  # type: ignore[method-assign]
    outs, failures = _run(core)
    assert set(failures) == {11} and "injected" in str(failures[11])
    assert all(outs[sid][-1].finished for sid in (10, 12))
    _assert_no_leak(core)


def test_a_request_error_in_the_step_stays_a_request_error(core: EngineCore) -> None:
    ids = core.tokenizer.encode("Hello")
    core.add(20, ids, SamplingParams(max_tokens=4, temperature=0), 0.0)
    core.add(21, ids, SamplingParams(max_tokens=4, temperature=0), 0.0)

    def refuse(token_id: int) -> str:
        raise RequestError("this sequence's input cannot be decoded", "prompt")

    core.states[21].detok.add = refuse  # type: ignore[method-assign]
    outs, failures = _run(core)
    assert isinstance(failures[21], RequestError) and failures[21].param == "prompt"
    assert outs[20][-1].finished
    _assert_no_leak(core)


def test_a_failed_add_leaves_nothing_behind(core: EngineCore) -> None:
    ids = core.tokenizer.encode("Hello")
    with pytest.raises(RequestError) as exc:
        core.add(30, ids + [10**9], SamplingParams(max_tokens=4), 0.0)
    assert exc.value.param == "prompt"
    with pytest.raises(RequestError) as exc:
        core.add(31, ids, SamplingParams(max_tokens=4, stop_token_ids=(10**9,)), 0.0)
    assert exc.value.param == "stop_token_ids"
    with pytest.raises(RequestError) as exc:
        core.add(32, ids, SamplingParams(max_tokens=10_000), 0.0)
    assert exc.value.param == "max_tokens"
    _assert_no_leak(core)
    # Seeds at both ends of int64 (and a top_k past the vocabulary) are served.
    core.add(33, ids, SamplingParams(max_tokens=3, seed=2**63 - 1, top_k=2**31 - 1), 0.0)
    core.add(34, ids, SamplingParams(max_tokens=3, seed=-(2**63)), 0.0)
    outs, failures = _run(core)
    assert not failures and outs[33][-1].finished and outs[34][-1].finished
    _assert_no_leak(core)
