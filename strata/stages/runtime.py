"""A stage's compute: its layers, their KV cache, and (on the tail) sampling.

Synchronous and free of sockets: the worker service feeds it STEP messages and ships
what it returns. The KV tensors are sized by the head when it connects (the head's
block namespace addresses them), so a stage's memory is its layers' weights plus
its layers' share of the pipeline's KV cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from strata.engine.model import LlamaModel
from strata.engine.model_config import LlamaConfig
from strata.engine.runner import ModelRunner, kv_bytes_per_block
from strata.engine.sampler import Sampler, SampleRequest
from strata.engine.sampling import SamplingParams
from strata.engine.weights import load_config, load_state_dict
from strata.stages.bounds import StepLimits, check_step
from strata.stages.plan import parse_layers
from strata.stages.protocol import StepMessage, StepResult

log = logging.getLogger("strata.stages")


@dataclass
class _TailSeq:
    """Sampling state of one sequence on the tail (the head owns everything else)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None


def load_stage_model(
    path: Path, config: LlamaConfig, start: int, end: int, has_embed: bool,
    dtype: torch.dtype, device: torch.device,
) -> LlamaModel:
    """Build layers [start, end) (embedding on the head, norm + head on the tail), reading only them."""
    has_head = end == config.num_hidden_layers
    state = load_state_dict(
        path, config, layers=range(start, end), include_embed=has_embed,
        include_head=has_head, dtype=torch.float32,
    )
    model = LlamaModel(config, start, end, has_embed=has_embed, has_head=has_head)
    model.load_weights(state)
    del state
    return model.to(device=device, dtype=dtype).eval()


class StageRuntime:
    """Layers [a, b) of a model without the embedding; samples when it holds the head."""

    def __init__(
        self, model: LlamaModel, dtype: torch.dtype, device: torch.device, max_kv_bytes: int
    ) -> None:
        if model.has_embed:
            raise ValueError("a downstream stage holds no embedding; the head stage does")
        self.model = model
        self.dtype = dtype
        self.device = device
        self.max_kv_bytes = max_kv_bytes
        self.name = f"{model.layer_start}:{model.layer_end}"
        self.is_tail = model.has_head
        self.runner: ModelRunner | None = None
        self.sampler = Sampler()
        self.eos_token_ids: tuple[int, ...] = ()
        self.seqs: dict[int, _TailSeq] = {}  # tail only
        self.known: set[int] = set()  # sequences seen and not yet dropped
        self.limits: StepLimits | None = None  # set by attach: what a STEP may address

    @property
    def num_blocks(self) -> int:
        """KV blocks allocated (0 before a head connected)."""
        return 0 if self.runner is None else self.runner.num_blocks

    def attach(
        self, num_blocks: int, block_size: int, eos_token_ids: tuple[int, ...], *,
        max_num_tokens: int, max_num_seqs: int, max_model_len: int,
    ) -> None:
        """Size the KV cache for a head's block namespace (reused when unchanged).

        The head's batch limits bound what its STEP frames may carry; positions also
        stay below this stage's own RoPE table, whatever the head says.
        """
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size),
                        ("max_num_tokens", max_num_tokens), ("max_num_seqs", max_num_seqs),
                        ("max_model_len", max_model_len)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 40:
                raise ValueError(f"the head's {name} {v!r} must be a positive integer")
        if block_size > 4096:
            raise ValueError(f"the head's block_size {block_size} is above 4096")
        need = num_blocks * kv_bytes_per_block(self.model, block_size, self.dtype)
        if need > self.max_kv_bytes:
            raise ValueError(
                f"stage {self.name}: the head's {num_blocks} KV blocks of {block_size} tokens "
                f"need {need / 2**20:.0f} MiB here, above --kv-cache "
                f"{self.max_kv_bytes / 2**20:.0f} MiB; raise --kv-cache or give the head fewer blocks"
            )
        r = self.runner
        if r is None or r.num_blocks != num_blocks or r.block_size != block_size:
            self.runner = None  # free the old cache before allocating the new one
            self.runner = ModelRunner(self.model, num_blocks, block_size, self.dtype, self.device)
            self.runner.warm_up(max(max_num_tokens, max_num_seqs))  # as an engine does
            log.info("stage %s: KV cache of %d blocks x %d tokens (%.0f MiB)",
                     self.name, num_blocks, block_size, need / 2**20)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.limits = StepLimits(
            num_blocks=num_blocks, block_size=block_size,
            max_model_len=min(max_model_len, self.model.config.max_position_embeddings),
            hidden_size=self.model.config.hidden_size, max_num_tokens=max_num_tokens,
            max_num_seqs=max_num_seqs,
        )
        self.seqs.clear()
        self.known.clear()

    def drop(self, seq_ids: list[int]) -> None:
        """Forget finished or aborted sequences."""
        for sid in seq_ids:
            self.seqs.pop(sid, None)
            self.known.discard(sid)

    def run(self, msg: StepMessage) -> StepMessage | StepResult:
        """Run this stage's layers on one micro-batch; the tail also samples."""
        if self.runner is None or self.limits is None:
            raise RuntimeError(f"stage {self.name} has no KV cache: no head has connected")
        t0 = time.perf_counter()
        runner = self.runner
        check_step(msg, self.limits)  # before anything indexes the cache or a native kernel runs
        self.known.update(msg.seq_ids)
        inputs = msg.step_inputs(self.device, runner.native_attention, runner.cos_sin)
        hidden_in = msg.hidden.to(device=self.device, dtype=self.dtype)
        hidden = runner.forward(inputs, hidden_in=hidden_in)
        if not self.is_tail:
            return msg.forwarded(hidden.cpu(), self.name, time.perf_counter() - t0)
        return self._sample(msg, hidden, t0)

    def _sample(self, msg: StepMessage, hidden: torch.Tensor, t0: float) -> StepResult:
        assert self.runner is not None
        for sid, new in msg.new_seqs.items():
            gen = None
            if new.params.seed is not None:
                gen = torch.Generator().manual_seed(new.params.seed)
            self.seqs[sid] = _TailSeq(new.params, new.prompt_token_ids, list(new.output_token_ids), gen)
        rows = list(msg.sample_rows) + list(msg.extra_rows)
        logits = self.runner.logits(hidden, rows) if rows else None
        reqs = []
        for sid in msg.sample_seq_ids:
            st = self.seqs.get(sid)
            if st is None:
                raise RuntimeError(
                    f"stage {self.name} has no sampling state for sequence {sid}; "
                    "the head must announce new sequences"
                )
            reqs.append(
                SampleRequest(st.params, st.prompt_token_ids, st.output_token_ids,
                              self.eos_token_ids, st.generator)
            )
        n = len(msg.sample_rows)
        tokens, lps = ([], [])
        if reqs:
            assert logits is not None
            tokens, lps = self.sampler(logits[:n], reqs)
        for sid, tok in zip(msg.sample_seq_ids, tokens, strict=True):
            self.seqs[sid].output_token_ids.append(tok)
        prompt_logits = logits[n:].contiguous() if msg.extra_rows and logits is not None else None
        stage_s = {**msg.stage_s, self.name: time.perf_counter() - t0}
        return StepResult(tokens, lps, prompt_logits, stage_s)


def build_runtime(
    model: Path, layers: str, dtype: torch.dtype, device: torch.device, max_kv_bytes: int,
) -> StageRuntime:
    """Load a downstream stage (layers a:b with a > 0) of the model at `model`."""
    config = load_config(model)
    start, end = parse_layers(layers, config.num_hidden_layers)
    if start == 0:
        raise ValueError("layers 0:b is the head stage (embedding, scheduler); run it with --stages")
    part = load_stage_model(model, config, start, end, False, dtype, device)
    return StageRuntime(part, dtype, device, max_kv_bytes)
