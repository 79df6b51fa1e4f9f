"""Constrained decoding in the engine core with the real bundled model: the grammar rows are
masked, the others untouched, a finished grammar ends its sequence, and a broken one fails
alone with its KV blocks freed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from strata.engine.core import RequestError
from strata.engine.engine import EngineConfig, build_engine_core
from strata.engine.guided import (
    compile_choice,
    compile_json_schema,
    compile_regex,
    decoding_of,
)
from strata.engine.sampler import Sampler, SampleRequest
from strata.engine.sampling import GuidedDecoding, SamplingParams
from strata.protocol import CompletionRequest, OpenAIError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def core(bundled_gguf: Path):
    return build_engine_core(EngineConfig(model=str(bundled_gguf), dtype="float32", threads=1,
                                          num_kv_blocks=128, max_num_seqs=8,
                                          max_num_batched_tokens=64))


def _run(core, jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], str, str]]:
    """Add every job at once (one batch), step to the end: (tokens, text, finish) of each."""
    base = 5_000
    for i, (ids, params) in enumerate(jobs):
        core.add(base + i, ids, params, 0.0)
    out = {base + i: ([], "", "") for i in range(len(jobs))}
    while core.has_work:
        for o in core.step():
            toks, text, _ = out[o.seq_id]
            out[o.seq_id] = (toks + o.token_ids, text + o.text, o.finish_reason or "")
    assert core.blocks.num_free_blocks == core.blocks.num_blocks
    return [out[base + i] for i in range(len(jobs))]


def test_a_constrained_row_leaves_the_others_greedy_tokens_unchanged(core) -> None:
    tok = core.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
               for q in ("Name a fruit.", "Count to five.", "Say hello.")]
    plain = SamplingParams(max_tokens=12, temperature=0)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    guided = SamplingParams(max_tokens=40, temperature=0,
                            guided=compile_json_schema(schema, "guided_json"))
    core.grammar.validate(guided.guided)
    alone = _run(core, [(p, plain) for p in prompts] + [(prompts[0], plain)])
    beside = _run(core, [(p, plain) for p in prompts] + [(prompts[0], guided)])
    assert [a[0] for a in alone[:3]] == [b[0] for b in beside[:3]]
    _, text, finish = beside[3]
    assert finish == "stop" and 0 <= json.loads(text)["n"] <= 99


def test_grammar_end_finishes_the_sequence_and_n_rows_each_follow_it(core) -> None:
    ids = core.tokenizer.encode("My code is")
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=3,
                            guided=compile_regex(r"[A-Z]{2}-\d{3}", "guided_regex"))
    core.grammar.validate(params.guided)
    for _, text, finish in _run(core, [(ids, params)] * 3):
        assert re.fullmatch(r"[A-Z]{2}-\d{3}", text) and finish == "stop"
    choice = SamplingParams(max_tokens=10, temperature=0,
                            guided=compile_choice(["alpha", "beta"], "guided_choice"))
    (_, text, finish), = _run(core, [(ids, choice)])
    assert text in ("alpha", "beta") and finish == "stop"


def test_an_unusable_grammar_is_refused_at_add_and_leaves_nothing(core) -> None:
    bad = SamplingParams(guided=GuidedDecoding("regex", "guided_regex", "{not a grammar"))
    with pytest.raises(RequestError) as e:
        core.add(9_000, [1, 2, 3], bad, 0.0)
    assert e.value.param == "guided_regex"
    assert 9_000 not in core.states and not core.has_work


def test_sampler_masks_only_the_rows_that_carry_one() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [0.0, 5.0, 1.0, 2.0]])
    banned = torch.tensor([False, True, False, True])
    rows = [SampleRequest(SamplingParams(temperature=0), [1], [], (0,), banned=banned),
            SampleRequest(SamplingParams(temperature=0), [1], [], (0,))]
    tokens, _ = Sampler()(logits, rows)
    assert tokens == [2, 1]
    assert logits[0, 1] == 5.0  # the caller's logits are left as they were


@pytest.mark.parametrize("body, param", [
    ({"guided_json": "[1, 2"}, "guided_json"),
    ({"guided_choice": ["a", ""]}, "guided_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": 3}}, "response_format.json_schema"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"choice": "a"}}, "structured_outputs.choice"),
])
def test_malformed_constraints_name_their_field(body: dict, param: str) -> None:
    req = CompletionRequest.model_validate({"prompt": "x", **body})
    with pytest.raises(OpenAIError) as e:
        decoding_of(req)
    assert e.value.param == param


def test_response_format_text_and_json_object() -> None:
    assert decoding_of(CompletionRequest.model_validate(
        {"prompt": "x", "response_format": {"type": "text"}})) is None
    g = decoding_of(CompletionRequest.model_validate(
        {"prompt": "x", "response_format": {"type": "json_object"}}))
    assert g is not None and g.kind == "json_object" and g.param == "response_format"
