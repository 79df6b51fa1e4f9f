"""How long an engine iteration takes on given hardware: the simulator's only stand-in.

The simulator runs strata's real scheduler, routers and autoscalers; what it cannot run is
the forward pass. This module replaces it with a cost per iteration, from the batch's
*features* (prefill tokens, their attention span, decode count and context, sampled rows):

**GPU roofline** (``RooflineCost``). For a batch on a replica holding layers ``[a, b)`` of
the model with tensor-parallel degree ``tp``::

    flops = 2 * P_layer * L * T + 4 * L * H_q * d * A + 2 * V * h * S      (/ tp)
    bytes = W + L * kv_tok * (C + Pctx) + L * kv_tok * T                   (/ tp)
    step  = max(flops / (F * mfu), bytes / (BW * bw_eff)) + overhead + allreduce

with ``T`` tokens run, ``A`` query-key pairs attended (decode: its context; prefill chunk of
``n`` tokens at ``start``: ``n * start + n (n + 1) / 2``), ``S`` sampled rows (the LM head
runs only for them), ``C`` decode context, ``Pctx`` cached prefix that prefill chunks read,
``W`` the weights held, ``kv_tok`` K+V bytes per token per layer. ``allreduce`` is two ring
all-reduces of ``T x h`` activations per layer over the TP link.

**Stage pipelines** (``PipelineCost``): layers split evenly over ``S`` stages, each on its own
GPU(s); one micro-batch's iteration is the sum of the stages' rooflines plus ``S - 1``
hidden-state transfers (``T x h`` bf16 over a 100 Gb/s link, 100 us each). The simulator
runs ``S`` virtual engines per pipeline (as vLLM's pipeline parallelism does), each with
its own scheduler and ``1/S`` of the KV cache, and assumes their micro-batches interleave
perfectly on the stages (contention between them is not modelled: optimistic when the
virtual engines' batches are uneven).

**Start-up** of a replica: image pull (60 s) + weights / 2 GB/s per GPU + warm-up (20 s,
CUDA graphs and profiling); 93 s for LLaMA-2-13B on one A100.

The efficiency factors are documented defaults, not fits: ``mfu`` 0.6 (large bf16 GEMMs
reach 60-75 % of peak on A100/H100; attention and small batches less), ``bw_eff`` 0.8
(STREAM-like reads reach ~80-90 % of HBM peak), ``overhead_s`` 2 ms per iteration (the
framework's scheduling, sampling and launch time; vLLM-class engines measure 1-3 ms).

**cpu-local** (``LinearCost``): a least-squares fit of measured iteration times of strata's
own engine *as served* on this machine (``strata simulate profile``) to the same features:
``step = c0 + c_t T + c_a A + c_d D + c_c C + c_p D * Cmax + c_s S`` (non-negative; ``Cmax``
the longest decode context, which padded batched attention pays for every decode).

Both are linear in the step index over a run of pure-decode steps (the context grows by one
token per sequence per step), which the replica uses to skip through such runs in closed
form (``decode_piece``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from strata.engine.scheduler import Batch
from strata.sim.hardware import (
    GpuSpec,
    ModelCosts,
)

# -- batch features -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepFeatures:
    """The facts of one iteration a cost model needs (see the module docstring)."""

    prefill_tokens: int = 0
    prefill_pairs: float = 0.0  # query-key pairs of the prefill chunks
    prefill_ctx: int = 0  # cached tokens the prefill chunks attend to (read from the cache)
    decodes: int = 0
    decode_ctx: int = 0  # sum of decode contexts (tokens attended, the new one included)
    sampled: int = 0  # rows that go through the LM head
    decode_max_ctx: int = 0  # longest decode context (padded batched attention pays this)

    @property
    def tokens(self) -> int:
        """Tokens run through the layers."""
        return self.prefill_tokens + self.decodes

    @classmethod
    def of(cls, batch: Batch) -> StepFeatures:
        """Features of a scheduler batch."""
        p_tok = 0
        pairs = 0.0
        p_ctx = 0
        sampled = 0
        for e in batch.prefills:
            n, s = e.num_tokens, e.start
            p_tok += n
            pairs += n * s + n * (n + 1) / 2
            p_ctx += s
            if s + n == e.seq.num_tokens:
                sampled += 1
        d_ctx = 0
        d_max = 0
        for e in batch.decodes:
            d_ctx += e.start + 1
            if e.start >= d_max:
                d_max = e.start + 1
        n_dec = len(batch.decodes)
        return cls(p_tok, pairs, p_ctx, n_dec, d_ctx, sampled + n_dec, d_max)


# -- cost models --------------------------------------------------------------------------


class IterationCost(Protocol):
    """Seconds per iteration, and the linear form of a run of pure-decode steps."""

    name: str

    def step_s(self, f: StepFeatures) -> float:
        """Wall time of one iteration with these features."""
        ...

    def decode_piece(self, decodes: int, ctx: int, max_steps: int,
                     max_ctx: int = 0) -> tuple[float, float, int]:
        """``(a, b, k)``: steps i < k of a pure-decode run starting at total context
        ``ctx`` (longest ``max_ctx``) take ``a + b * i`` seconds; ``k`` <= ``max_steps``."""
        ...


def _dominant(lines: list[tuple[float, float]], max_steps: int) -> tuple[float, float, int]:
    """The largest of several lines at i = 0 and how long it stays the largest."""
    a, b = max(lines)  # (a, b) pairs compare as the tuples they are: largest a, then b
    k = max_steps
    for a2, b2 in lines:
        if b2 > b:
            cross = math.ceil((a - a2) / (b2 - b))  # first i where the other line is larger
            k = min(k, max(1, cross))
    return a, b, k


@dataclass(frozen=True)
class RooflineCost:
    """The GPU roofline for one replica or one stage (layers [first, last)) of a model."""

    gpu: GpuSpec
    model: ModelCosts
    tp: int = 1
    first: int = 0
    last: int = -1  # -1: all layers
    dtype_bytes: float = 2.0
    name: str = "roofline"

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tensor-parallel degree must be >= 1, got {self.tp}")
        if self.last == -1:
            object.__setattr__(self, "last", self.model.layers)
        if not 0 <= self.first < self.last <= self.model.layers:
            raise ValueError(f"layer range [{self.first}, {self.last}) is outside the model's "
                             f"{self.model.layers} layers")

    @property
    def num_layers(self) -> int:
        """Layers this part runs."""
        return self.last - self.first

    @property
    def has_head(self) -> bool:
        """Whether this part runs the LM head (the last stage)."""
        return self.last == self.model.layers

    @property
    def weight_bytes(self) -> float:
        """Weight bytes across the part's GPUs."""
        return self.model.weight_params(self.first, self.last) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """KV bytes one token occupies in this part, across its GPUs."""
        return self.model.kv_bytes_per_token(self.num_layers, self.dtype_bytes)

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache that fit beside the weights (vLLM's memory profiling, roughly)."""
        budget = self.tp * (self.gpu.mem_bytes * self.gpu.gpu_memory_utilization
                            - self.gpu.activation_reserve_bytes) - self.weight_bytes
        if budget <= 0:
            raise ValueError(f"{self.weight_bytes / 1e9:.1f} GB of weights do not fit on "
                             f"{self.tp} x {self.gpu.name}; raise --tp or --stages")
        return int(budget // self.kv_bytes_per_token)

    def startup_s(self) -> float:
        """Image pull + weight load (each GPU loads its shard in parallel) + warm-up."""
        g = self.gpu
        return g.image_pull_s + self.weight_bytes / self.tp / g.weight_load_bw + g.warmup_s

    def _allreduce_s(self, tokens: int) -> float:
        if self.tp == 1:
            return 0.0
        size = tokens * self.model.hidden * self.dtype_bytes
        per = 2 * (self.tp - 1) / self.tp * size / self.gpu.link_bw + self.gpu.link_latency_s
        return 2 * self.num_layers * per

    def _coeffs(self) -> tuple[float, float, float, float, float]:
        # Constant per part: computed once (every step and decode run asks for them).
        c = self.__dict__.get("_coeffs_value")
        if c is None:
            c = self.__dict__["_coeffs_value"] = self._compute_coeffs()
        return c

    def _compute_coeffs(self) -> tuple[float, float, float, float, float]:
        m, L = self.model, self.num_layers
        flops_tok = 2.0 * m.layer_params * L
        flops_pair = 4.0 * L * m.q_dim
        flops_sample = 2.0 * m.head_params if self.has_head else 0.0
        kv_layer_tok = 2.0 * m.kv_dim * self.dtype_bytes * L
        return flops_tok, flops_pair, flops_sample, kv_layer_tok, self.weight_bytes

    def step_s(self, f: StepFeatures) -> float:
        """Roofline time of one iteration."""
        flops_tok, flops_pair, flops_sample, kv_tok, weights = self._coeffs()
        t = f.tokens
        flops = flops_tok * t + flops_pair * (f.prefill_pairs + f.decode_ctx) \
            + flops_sample * f.sampled
        nbytes = weights + kv_tok * (f.decode_ctx + f.prefill_ctx + t)
        g = self.gpu
        compute = flops / self.tp / (g.flops * g.mfu)
        memory = nbytes / self.tp / (g.mem_bw * g.bw_eff)
        return max(compute, memory) + g.overhead_s + self._allreduce_s(t)

    def decode_lines(self, decodes: int, ctx: int) -> list[tuple[float, float]]:
        """Compute and memory time of step i of a decode run as lines ``a + b i``."""
        flops_tok, flops_pair, flops_sample, kv_tok, weights = self._coeffs()
        g = self.gpu
        fc = 1.0 / (self.tp * g.flops * g.mfu)
        fm = 1.0 / (self.tp * g.mem_bw * g.bw_eff)
        const = g.overhead_s + self._allreduce_s(decodes)
        a_c = (flops_tok * decodes + flops_pair * ctx + flops_sample * decodes) * fc + const
        b_c = flops_pair * decodes * fc
        a_m = (weights + kv_tok * (ctx + decodes)) * fm + const
        b_m = kv_tok * decodes * fm
        return [(a_c, b_c), (a_m, b_m)]

    def decode_piece(self, decodes: int, ctx: int, max_steps: int,
                     max_ctx: int = 0) -> tuple[float, float, int]:
        """See :class:`IterationCost` (paged attention: the longest context does not matter)."""
        return _dominant(self.decode_lines(decodes, ctx), max_steps)


@dataclass(frozen=True)
class PipelineCost:
    """A model split into layer-range stages on separate GPUs, one micro-batch in flight.

    One iteration of a batch runs the stages in turn, with a hidden-state transfer between
    consecutive stages; each stage's GPU is busy only for its own part.
    """

    stages: tuple[RooflineCost, ...]
    link_bw: float = 12.5e9  # stage-to-stage bytes/s (100 Gb/s between pods)
    link_latency_s: float = 100e-6
    name: str = "pipeline"

    def transfer_s(self, tokens: int) -> float:
        """Send ``tokens`` hidden states (bf16) from one stage to the next."""
        st = self.stages[0]
        return tokens * st.model.hidden * st.dtype_bytes / self.link_bw + self.link_latency_s

    def stage_s(self, f: StepFeatures) -> list[float]:
        """Each stage's compute time for the batch (what its GPU is busy for)."""
        return [s.step_s(f) for s in self.stages]

    def step_s(self, f: StepFeatures) -> float:
        """All stages plus the transfers between them."""
        return sum(self.stage_s(f)) + (len(self.stages) - 1) * self.transfer_s(f.tokens)

    def decode_piece(self, decodes: int, ctx: int, max_steps: int,
                     max_ctx: int = 0) -> tuple[float, float, int]:
        """Sum of the stages' dominant lines, valid until any stage's dominance changes."""
        a = b = 0.0
        k = max_steps
        for s in self.stages:
            sa, sb, sk = _dominant(s.decode_lines(decodes, ctx), max_steps)
            a, b, k = a + sa, b + sb, min(k, sk)
        return a + (len(self.stages) - 1) * self.transfer_s(decodes), b, k


# -- cpu-local ----------------------------------------------------------------------------

FEATURES = ("const", "prefill_tokens", "prefill_pairs", "decodes", "decode_ctx",
            "decode_padded", "sampled")


def feature_row(f: StepFeatures) -> list[float]:
    """The regressors of the cpu-local fit, in ``FEATURES`` order."""
    return [1.0, float(f.prefill_tokens), f.prefill_pairs, float(f.decodes),
            float(f.decode_ctx), float(f.decodes * f.decode_max_ctx), float(f.sampled)]


@dataclass(frozen=True)
class LinearCost:
    """Iteration time as the cpu-local profile's linear fit."""

    coefficients: dict[str, float]
    name: str = "cpu-local"

    def step_s(self, f: StepFeatures) -> float:
        """The fitted time of one iteration."""
        c = self.coefficients
        return (c["const"] + c["prefill_tokens"] * f.prefill_tokens
                + c["prefill_pairs"] * f.prefill_pairs + c["decodes"] * f.decodes
                + c["decode_ctx"] * f.decode_ctx
                + c["decode_padded"] * f.decodes * f.decode_max_ctx + c["sampled"] * f.sampled)

    def decode_piece(self, decodes: int, ctx: int, max_steps: int,
                     max_ctx: int = 0) -> tuple[float, float, int]:
        """Exactly linear: the context term grows by ``decodes`` tokens a step."""
        c = self.coefficients
        a = c["const"] + (c["decodes"] + c["sampled"]) * decodes + c["decode_ctx"] * ctx \
            + c["decode_padded"] * decodes * max_ctx
        return a, (c["decode_ctx"] + c["decode_padded"]) * decodes, max_steps


# -- one deployment unit ------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaModel:
    """Everything the simulator needs about one replica: cost, GPUs, KV size, start-up."""

    cost: IterationCost
    gpus: int  # GPUs a replica holds (tp x stages); 0 for cpu-local
    kv_tokens: int | None  # KV-cache capacity in tokens; None: from the engine's kv_cache bytes
    kv_bytes_per_token: float
    startup_s: float
    request_overhead_s: float  # client-visible latency outside the engine (HTTP, tokenizer)
    model_name: str
    max_model_len: int
    hardware: str

    def busy_gpu_s(self, f: StepFeatures, step_s: float) -> float:
        """GPU-seconds an iteration occupies (a pipeline's stages are busy only for their part)."""
        if isinstance(self.cost, PipelineCost):
            per_stage = self.gpus // len(self.cost.stages)
            return per_stage * sum(self.cost.stage_s(f))
        return max(self.gpus, 1) * step_s
