"""Step messages: params and metadata survive the wire; a stage rebuilds the head's metadata."""

from __future__ import annotations

import pytest
import torch

from strata.engine.kv_cache import BlockManager
from strata.engine.model import LlamaModel
from strata.engine.model_config import LlamaConfig
from strata.engine.runner import ModelRunner
from strata.engine.sampler import TokenLogprobs
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import Scheduler, SchedulerConfig
from strata.engine.sequence import Sequence
from strata.stages.plan import check_split, parse_layers, parse_stages
from strata.stages.protocol import (
    NewSeq,
    StepMessage,
    StepResult,
    params_from_json,
    params_to_json,
    step_message,
)
from strata.stages.transport import decode_frame, encode_frame

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def wire(frame):  # type: ignore[no-untyped-def]
    return decode_frame(bytearray(b"".join(bytes(p) for p in encode_frame(frame))[8:]))


def test_sampling_params_round_trip() -> None:
    p = SamplingParams(max_tokens=9, temperature=0.7, top_k=5, seed=3, stop=("\n", "END"),
                       stop_token_ids=(2, 7), logit_bias={5: -3.5, 11: 2.0}, logprobs=3,
                       repetition_penalty=1.1, min_tokens=2)
    assert params_from_json(params_to_json(p)) == p
    with pytest.raises(ValueError, match="unknown"):
        params_from_json({**params_to_json(p), "evil": 1})
    with pytest.raises(ValueError, match="temperature"):
        params_from_json({**params_to_json(p), "temperature": -1})


def _batch(block_size: int = 4):  # type: ignore[no-untyped-def]
    """A scheduled batch with decodes, a fresh prefill and a chunk with cached context."""
    bm = BlockManager(32, block_size, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=12), bm)
    params = SamplingParams(max_tokens=4)
    sched.add(Sequence(1, list(range(1, 6)), params))
    sched.add(Sequence(2, list(range(10, 13)), params))
    b = sched.step()
    sched.on_step_done(b)
    for e in b.entries:
        if e.samples:
            e.seq.output_token_ids.append(9)
    sched.add(Sequence(3, list(range(20, 40)), params))  # 20 tokens: chunked over two steps
    b2 = sched.step()
    sched.on_step_done(b2)
    for e in b2.entries:
        if e.samples:
            e.seq.output_token_ids.append(9)
    return sched.step()


@pytest.mark.parametrize("native", [False, True])
def test_stage_rebuilds_the_heads_attention_metadata(native: bool) -> None:
    if native:
        from strata.engine.kernels import load_paged_attention

        if not load_paged_attention():
            pytest.skip("native kernels unavailable")
    model = LlamaModel(CFG, 0, 2, has_embed=True, has_head=False)
    runner = ModelRunner(model, 32, 4, torch.float32, native_attention=native)
    batch = _batch()
    assert batch.decodes and any(e.start > 0 for e in batch.prefills)
    inputs = runner.prepare(batch)
    hidden = torch.randn(len(inputs.positions), CFG.hidden_size)
    msg = step_message(batch, inputs, hidden, 4, extra_rows=[1])
    msg.hops = ["x:1"]
    msg.new_seqs = {3: NewSeq(SamplingParams(seed=1), [1, 2], [3])}
    got = StepMessage.from_frame(wire(msg.to_frame(5)))
    assert got.hops == ["x:1"] and got.extra_rows == [1] and got.seq_ids == msg.seq_ids
    assert got.new_seqs[3].params.seed == 1 and got.new_seqs[3].output_token_ids == [3]
    assert torch.equal(got.hidden, hidden)
    rebuilt = got.step_inputs(torch.device("cpu"), native, runner.cos_sin)
    a, b = inputs.meta, rebuilt.meta
    assert torch.equal(rebuilt.positions, inputs.positions)
    assert torch.equal(a.slot_mapping, b.slot_mapping) and a.num_decodes == b.num_decodes
    for name in ("decode_slots", "decode_mask", "decode_block_tables", "decode_lens"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert [(s.start, s.length, s.context_len) for s in a.prefills] == [
        (s.start, s.length, s.context_len) for s in b.prefills
    ]
    for s, t in zip(a.prefills, b.prefills, strict=True):
        assert (s.gather_slots is None and t.gather_slots is None) or torch.equal(s.gather_slots, t.gather_slots)
    # Same layers, same cache contents: the downstream part computes the same output.
    rest = LlamaModel(CFG, 2, 4, has_embed=False, has_head=True)
    r1 = ModelRunner(rest, 32, 4, torch.float32, native_attention=native)
    r2 = ModelRunner(rest, 32, 4, torch.float32, native_attention=native)
    out1 = r1.forward(inputs, hidden_in=hidden)
    out2 = r2.forward(rebuilt, hidden_in=got.hidden)
    assert torch.equal(out1, out2)


def test_result_round_trip() -> None:
    res = StepResult([5, 6], [None, TokenLogprobs(6, -0.5, 2, [(1, -0.1), (6, -0.5)])],
                     torch.randn(2, 10), {"0:10": 0.01})
    got = StepResult.from_frame(wire(res.to_frame(9)))
    assert got.tokens == [5, 6] and got.logprobs == res.logprobs and got.stage_s == res.stage_s
    assert torch.equal(got.prompt_logits, res.prompt_logits)


def test_layer_and_split_parsing_errors_name_the_fix() -> None:
    assert parse_layers("3:7", 30) == (3, 7)
    for bad in ("3-7", "7:3", "a:b", "5:5"):
        with pytest.raises(ValueError, match="a:b"):
            parse_layers(bad)
    with pytest.raises(ValueError, match="30 layers"):
        parse_layers("20:31", 30)
    assert parse_stages("0:10, 10:30") == ((0, 10), (10, 30))
    check_split([(0, 10), (10, 30)], 30)
    with pytest.raises(ValueError, match="start where the previous one ends"):
        check_split([(0, 10), (12, 30)], 30)
    with pytest.raises(ValueError, match="end at layer 30"):
        check_split([(0, 10), (10, 20)], 30)
    with pytest.raises(ValueError, match="strata engine"):
        check_split([(0, 30)], 30)
