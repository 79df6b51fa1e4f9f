"""Stage pipelines in one process, on the real bundled model, against the single engine.

The head core, the stage runtimes and the frames are the real ones (every frame goes
through the wire encoding); only the sockets are replaced by a FIFO per step, so the
scheduling with several micro-batches in flight is deterministic and fast to test.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
import torch

from strata.engine.core import EngineCore
from strata.engine.model import LlamaModel
from strata.engine.runner import ModelRunner
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import SchedulerConfig
from strata.engine.tokenizer import load_tokenizer
from strata.engine.weights import load_config, load_state_dict
from strata.stages.head import HeadCore, StageUnavailable
from strata.stages.protocol import StepMessage, StepResult
from strata.stages.runtime import StageRuntime
from strata.stages.transport import Frame, decode_frame, encode_frame

pytestmark = pytest.mark.slow

NUM_BLOCKS = 96
SCHED = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48, max_model_len=2048)


class Parts:
    """Model parts built once from one read of the weights."""

    def __init__(self, path: Path) -> None:
        torch.set_num_threads(1)
        self.config = load_config(path)
        self.state = load_state_dict(path, self.config, dtype=torch.float32)
        self.tokenizer = load_tokenizer(path)
        self._parts: dict[tuple[int, int], LlamaModel] = {}

    def part(self, a: int, b: int) -> LlamaModel:
        if (a, b) not in self._parts:
            n = self.config.num_hidden_layers
            m = LlamaModel(self.config, a, b, has_embed=a == 0, has_head=b == n)
            m.load_weights(self.state)
            self._parts[(a, b)] = m.eval()
        return self._parts[(a, b)]


@pytest.fixture(scope="module")
def parts(bundled_gguf: Path) -> Parts:
    return Parts(bundled_gguf)


def _wire(frame: Frame) -> Frame:
    body = b"".join(bytes(p) for p in encode_frame(frame))[8:]
    return decode_frame(bytearray(body))


class Pipeline:
    """A head core and stage runtimes wired by in-memory frames (replicas share weights)."""

    def __init__(self, parts: Parts, split: list[tuple[int, int]], replicas: dict[int, int],
                 inflight: int, prefix: bool = True) -> None:
        head = parts.part(*split[0])
        runner = ModelRunner(head, NUM_BLOCKS, 16, torch.float32)
        self.core = HeadCore(runner, parts.tokenizer, SCHED, "m", prefix, split[1:], inflight)
        self.stages: dict[str, StageRuntime] = {}
        for i, (a, b) in enumerate(split[1:]):
            for r in range(replicas.get(i, 1)):
                addr = f"stage{i}-{r}:1"
                rt = StageRuntime(parts.part(a, b), torch.float32, torch.device("cpu"), 1 << 40)
                rt.attach(NUM_BLOCKS, 16, self.core.eos_token_ids,
                          max_num_tokens=SCHED.max_num_batched_tokens,
                          max_num_seqs=SCHED.max_num_seqs, max_model_len=SCHED.max_model_len)
                self.stages[addr] = rt
                self.core.replicas.add(i, addr, f"http://{addr}")
        self.queue: deque[tuple[int, str, Frame]] = deque()
        self.out: dict[int, list[int]] = {}
        self.cached: dict[int, int] = {}
        self.max_seen_inflight = 0

    def launch(self) -> None:
        empty: set[tuple[str, ...]] = set()
        while True:
            paths = [p for p in self.core.schedulable_paths() if p not in empty]
            if not paths:
                break
            batch = self.core.schedule(paths[0])
            if not batch:
                empty.add(paths[0])
                continue
            self.queue.append(self.core.launch(batch, paths[0]))
        self.max_seen_inflight = max(self.max_seen_inflight, len(self.core.inflight))

    def run_one(self) -> None:
        """Carry the oldest micro-batch through its stages and hand the result to the head."""
        step_id, addr, frame = self.queue.popleft()
        while True:
            msg = StepMessage.from_frame(_wire(frame))
            out = self.stages[addr].run(msg)
            if isinstance(out, StepResult):
                res = StepResult.from_frame(_wire(out.to_frame(step_id)))
                break
            addr, frame = msg.hops[0], out.to_frame(step_id)
        for o in self.core.complete(step_id, res):
            self.out.setdefault(o.seq_id, []).extend(o.token_ids)
            self.cached[o.seq_id] = o.num_cached_tokens
        for raddr, ids in self.core.take_drops().items():
            self.stages[raddr].drop(ids)

    def generate(self, prompts: list[list[int]], params: SamplingParams, base: int = 0) -> list[list[int]]:
        for i, ids in enumerate(prompts):
            self.core.add(base + i, ids, params, 0.0)
        while self.core.has_work:
            self.launch()
            assert self.queue, "work left but nothing schedulable"
            self.run_one()
        return [self.out.pop(base + i) for i in range(len(prompts))]


def engine_generate(parts: Parts, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    runner = ModelRunner(parts.part(0, parts.config.num_hidden_layers), NUM_BLOCKS, 16, torch.float32)
    core = EngineCore(runner, parts.tokenizer, SCHED, "m")
    for i, ids in enumerate(prompts):
        core.add(i, ids, params, 0.0)
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while core.has_work:
        for o in core.step():
            out[o.seq_id] += o.token_ids
    return [out[i] for i in range(len(prompts))]


def _prompts(parts: Parts) -> list[list[int]]:
    tok = parts.tokenizer
    chat = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
            for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    # Longer than the 48-token step budget: prefilled in chunks (gathered context spans).
    long = tok.encode("The history of the Roman empire is long and full of wars. " * 8)
    return [*chat, long, tok.encode("def fibonacci(n):")]


GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(parts: Parts) -> list[list[int]]:
    return engine_generate(parts, _prompts(parts), GREEDY)


@pytest.mark.parametrize(
    ("split", "inflight"),
    [
        ([(0, 15), (15, 30)], 1),
        ([(0, 15), (15, 30)], 2),
        ([(0, 10), (10, 20), (20, 30)], 3),
    ],
)
def test_greedy_equals_single_engine(parts: Parts, reference: list[list[int]],
                                     split: list[tuple[int, int]], inflight: int) -> None:
    pipe = Pipeline(parts, split, {}, inflight)
    got = pipe.generate(_prompts(parts), GREEDY)
    assert got == reference
    assert pipe.max_seen_inflight == inflight  # several micro-batches were really in flight
    core = pipe.core
    assert core.blocks.num_free_blocks == NUM_BLOCKS and not core.inflight and not core.scheduler.in_flight
    assert all(not rt.known and not rt.seqs for rt in pipe.stages.values())


def test_replicated_stage_balances_and_equals_single_engine(parts: Parts, reference: list[list[int]]) -> None:
    pipe = Pipeline(parts, [(0, 10), (10, 20), (20, 30)], {1: 2}, inflight=3)
    prompts = _prompts(parts)
    for i, ids in enumerate(prompts):
        pipe.core.add(i, ids, GREEDY, 0.0)
    pinned = {a: len(r.pinned) for a, r in pipe.core.replicas.replicas.items()}
    assert pinned == {"stage0-0:1": 4, "stage1-0:1": 2, "stage1-1:1": 2}
    while pipe.core.has_work:
        pipe.launch()
        pipe.run_one()
    assert [pipe.out[i] for i in range(len(prompts))] == reference
    assert all(rt.runner is not None for rt in pipe.stages.values())
    steps = {a: r.steps for a, r in pipe.core.replicas.replicas.items()}
    assert steps["stage1-0:1"] > 0 and steps["stage1-1:1"] > 0


def test_prefix_cache_hits_only_on_the_path_that_wrote_the_blocks(parts: Parts) -> None:
    pipe = Pipeline(parts, [(0, 15), (15, 30)], {0: 2}, inflight=2)
    tok = parts.tokenizer
    shared = tok.encode("Once upon a time in a quiet village by the sea there lived " * 4)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ref = engine_generate(parts, [shared], params)[0]
    assert pipe.generate([shared], params, base=0)[0] == ref
    # Sequence 1 goes to the same (now empty) first replica, sequence 2 to the other one.
    pipe.core.add(1, shared, params, 0.0)
    pipe.core.add(2, shared, params, 0.0)
    assert pipe.core.replicas.path_of(1) == ("stage0-0:1",)
    assert pipe.core.replicas.path_of(2) == ("stage0-1:1",)
    while pipe.core.has_work:
        pipe.launch()
        pipe.run_one()
    assert pipe.out[1] == ref and pipe.out[2] == ref
    # Only the sequence on the path that wrote the cached blocks could use them.
    assert pipe.cached[1] >= 16 * (len(shared) // 16) - 16
    assert pipe.cached[2] == 0


def test_seeded_sampling_penalties_and_logprobs_match_engine(parts: Parts) -> None:
    tok = parts.tokenizer
    prompts = [tok.encode("Once upon a time"), tok.encode("List three fruits:")]
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11,
                            frequency_penalty=0.5, repetition_penalty=1.2, logprobs=2,
                            ignore_eos=True)
    ref = engine_generate(parts, prompts, params)
    pipe = Pipeline(parts, [(0, 15), (15, 30)], {}, inflight=2)
    assert pipe.generate(prompts, params) == ref


def test_abort_while_in_flight_is_applied_when_the_step_returns(parts: Parts) -> None:
    pipe = Pipeline(parts, [(0, 15), (15, 30)], {}, inflight=1)
    ids = parts.tokenizer.encode("Hello there, how are you today?")
    pipe.core.add(7, ids, GREEDY, 0.0)
    pipe.launch()
    assert 7 in pipe.core.scheduler.in_flight
    assert pipe.core.abort(7)
    assert pipe.core.blocks.num_free_blocks < NUM_BLOCKS  # still in the pipeline: kept
    pipe.run_one()
    assert 7 not in pipe.out and not pipe.core.has_work
    assert pipe.core.blocks.num_free_blocks == NUM_BLOCKS
    assert pipe.stages["stage0-0:1"].known == set()


def test_lost_replica_fails_its_sequences_and_moves_unstarted_ones(parts: Parts) -> None:
    pipe = Pipeline(parts, [(0, 15), (15, 30)], {0: 2}, inflight=1)
    tok = parts.tokenizer
    pipe.core.add(1, tok.encode("First request"), GREEDY, 0.0)
    pipe.core.add(2, tok.encode("Second request"), GREEDY, 0.0)
    a1, a2 = pipe.core.replicas.path_of(1)[0], pipe.core.replicas.path_of(2)[0]
    assert a1 != a2
    # Sequence 1 is in flight on its replica; sequence 2 has not been scheduled yet.
    path1 = pipe.core.replicas.path_of(1)
    pipe.queue.append(pipe.core.launch(pipe.core.schedule(path1), path1))
    errors = pipe.core.fail_replica(a1, "replica died")
    assert [sid for sid, _ in errors] == [1] and isinstance(errors[0][1], StageUnavailable)
    assert errors[0][1].status_code == 503
    pipe.core.fail_replica(a2, "replica died too")
    # With no live replica left, 2 (never started) had nowhere to go: it failed as well.
    assert not pipe.core.has_work and pipe.core.blocks.num_free_blocks == NUM_BLOCKS
    with pytest.raises(StageUnavailable):
        pipe.core.add(3, tok.encode("x"), GREEDY, 0.0)


def test_a_step_without_answer_times_out_and_a_late_answer_is_ignored(parts: Parts) -> None:
    import time

    pipe = Pipeline(parts, [(0, 15), (15, 30)], {}, inflight=1)
    pipe.core.step_timeout_s = 5.0
    pipe.core.add(1, parts.tokenizer.encode("Hello"), GREEDY, 0.0)
    pipe.launch()
    (step_id,) = pipe.core.inflight
    assert pipe.core.expired_steps(time.perf_counter()) == []
    assert pipe.core.expired_steps(time.perf_counter() + 6.0) == [step_id]
    errors = pipe.core.fail_step(step_id, "no answer")
    assert [sid for sid, _ in errors] == [1] and isinstance(errors[0][1], StageUnavailable)
    assert not pipe.core.has_work and pipe.core.blocks.num_free_blocks == NUM_BLOCKS
    pipe.run_one()  # the stage answers after all: nothing happens
    assert 1 not in pipe.out and not pipe.core.inflight


def test_a_detokenizer_fault_at_the_head_fails_its_sequence_alone(parts: Parts) -> None:
    pipe = Pipeline(parts, [(0, 15), (15, 30)], {}, inflight=2)
    ids = parts.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=6, temperature=0)
    for sid in (1, 2, 3):
        pipe.core.add(sid, ids, params, 0.0)

    def explode(token_id: int) -> str:
        raise RuntimeError("detokenizer fault injected by the test")

    pipe.core.states[2].detok.add = explode  # type: ignore[method-assign]
    failures: dict[int, BaseException] = {}
    while pipe.core.has_work:
        pipe.launch()
        assert pipe.queue, "work left but nothing schedulable"
        pipe.run_one()
        failures.update(pipe.core.take_failures())
    assert set(failures) == {2} and "injected" in str(failures[2])
    assert len(pipe.out[1]) == 6 and len(pipe.out[3]) == 6 and 2 not in pipe.out
    assert pipe.core.blocks.num_free_blocks == NUM_BLOCKS
    assert pipe.stages["stage0-0:1"].known == set()  # the stage dropped its KV too
