"""Where to cut a model into stages: the split balanced by measured per-layer cost.

Pure (no torch, no clock): costs in, layer ranges out, so the cluster, the benchmarks and
the simulator share it. The first stage also pays for the embedding and the scheduler's
per-step work, the last for the final norm, the LM head and sampling (on a small model
the LM head alone weighs as much as several layers); the split minimises the largest
stage cost, since the slowest stage sets a pipeline's throughput.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


@dataclass(frozen=True, slots=True)
class LayerCosts:
    """Seconds per step of each part at a reference batch (only ratios matter)."""

    layer_s: tuple[float, ...]  # one entry per decoder layer
    embed_s: float = 0.0  # embedding lookup and the head stage's per-step work
    head_s: float = 0.0  # final norm, LM head and sampling

    def __post_init__(self) -> None:
        if not self.layer_s:
            raise ValueError("LayerCosts needs at least one layer")
        if min(self.layer_s) < 0 or self.embed_s < 0 or self.head_s < 0:
            raise ValueError("costs must be non-negative")


def parse_layers(text: str, num_layers: int | None = None) -> tuple[int, int]:
    """'a:b' -> (a, b), the half-open layer range [a, b) of one stage."""
    a, sep, b = text.partition(":")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit():
        raise ValueError(f"layers {text!r} must look like a:b (first layer, end), e.g. 0:15")
    start, end = int(a), int(b)
    if start >= end:
        raise ValueError(f"layers {text!r}: the range is empty; write a:b with a < b")
    if num_layers is not None and end > num_layers:
        raise ValueError(f"layers {text!r}: the model has {num_layers} layers (0:{num_layers})")
    return start, end


def parse_stages(text: str) -> tuple[tuple[int, int], ...]:
    """'0:15,15:30' -> ((0, 15), (15, 30))."""
    return tuple(parse_layers(part.strip()) for part in text.split(",") if part.strip())


def check_split(stages: list[tuple[int, int]], num_layers: int) -> None:
    """The stages must tile [0, num_layers) in order; the message names the gap or overlap."""
    if not stages:
        raise ValueError("stages: give at least two layer ranges, e.g. 0:15,15:30")
    if stages[0][0] != 0:
        raise ValueError(f"stages: the first stage must start at layer 0, not {stages[0][0]}")
    for (a0, b0), (a1, b1) in zip(stages, stages[1:], strict=False):
        if a1 != b0:
            raise ValueError(f"stages: {a0}:{b0} is followed by {a1}:{b1}; each stage must "
                             f"start where the previous one ends ({b0})")
    if stages[-1][1] != num_layers:
        raise ValueError(f"stages: the last stage must end at layer {num_layers} (the model's "
                         f"layer count), not {stages[-1][1]}")
    if len(stages) < 2:
        raise ValueError("stages: one stage holding every layer is an engine; run `strata engine`")


def stage_costs(costs: LayerCosts, split: list[tuple[int, int]]) -> list[float]:
    """Each stage's cost under `split` (first stage + embedding, last + LM head)."""
    out = [sum(costs.layer_s[a:b]) for a, b in split]
    out[0] += costs.embed_s
    out[-1] += costs.head_s
    return out


def balanced_split(costs: LayerCosts, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, each non-empty, minimising the most expensive stage (exact DP)."""
    n = len(costs.layer_s)
    if not 1 <= num_stages <= n:
        raise ValueError(f"num_stages must be in [1, {n}] (one layer per stage at least), "
                         f"got {num_stages}")
    prefix = [0.0]
    for c in costs.layer_s:
        prefix.append(prefix[-1] + c)

    def cost(k: int, a: int, b: int) -> float:
        c = prefix[b] - prefix[a]
        if k == 0:
            c += costs.embed_s
        if k == num_stages - 1:
            c += costs.head_s
        return c

    inf = float("inf")
    # best[k][b]: the smallest max cost of stages 0..k covering layers [0, b).
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for b in range(1, n + 1):
        best[0][b] = cost(0, 0, b)
    for k in range(1, num_stages):
        for b in range(k + 1, n + 1):
            for a in range(k, b):
                v = max(best[k - 1][a], cost(k, a, b))
                if v < best[k][b] - 1e-15:
                    best[k][b], cut[k][b] = v, a
    split: list[tuple[int, int]] = []
    b = n
    for k in range(num_stages - 1, 0, -1):
        a = cut[k][b]
        split.append((a, b))
        b = a
    split.append((0, b))
    return split[::-1]


class StageSpec(BaseModel):
    """One stage in the cluster file: its layers and how many replicas it may run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: str
    replicas: int = Field(default=1, ge=1)
    min_replicas: int | None = Field(default=None, ge=1)
    max_replicas: int | None = Field(default=None, ge=1)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str) -> str:
        a, b = parse_layers(v)  # ValueError names the expected form
        return f"{a}:{b}"

    @model_validator(mode="after")
    def _check(self) -> StageSpec:
        lo = self.min_replicas or 1
        hi = self.max_replicas or max(self.replicas, lo)
        if lo > hi:
            raise ValueError(f"stages[{self.layers}]: min_replicas {lo} > max_replicas {hi}")
        return self

    @property
    def range(self) -> tuple[int, int]:
        """(a, b) of 'a:b'."""
        return parse_layers(self.layers)

    @property
    def bounds(self) -> tuple[int, int, int]:
        """(min, max, initial) replicas of this stage's replica set."""
        lo = self.min_replicas or 1
        hi = self.max_replicas or max(self.replicas, lo)
        return lo, hi, min(max(self.replicas, lo), hi)


class StagesConfig(BaseModel):
    """The cluster file's model split: explicit ranges, or `auto` with a stage count.

    ``stages: [{layers: "0:15"}, {layers: "15:30", max_replicas: 3}]`` or
    ``stages: {auto: 2, max_replicas: 3}`` (balanced by measured per-layer cost; the
    replica bounds then apply to every stage after the head).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: list[StageSpec] | None = None
    auto: int | None = Field(default=None, ge=2)
    max_replicas: int = Field(default=1, ge=1)
    split_by: Literal["measured"] = "measured"

    @model_validator(mode="after")
    def _one_way(self) -> StagesConfig:
        if (self.stages is None) == (self.auto is None):
            raise ValueError("stages: give either explicit `stages` (layer ranges) or `auto` "
                             "(a stage count), not both or neither")
        if self.stages is not None:
            if len(self.stages) < 2:
                raise ValueError("stages: a pipeline needs at least two stages")
            if self.stages[0].max_replicas not in (None, 1):
                raise ValueError("stages[0] is the head (the scheduler): it runs one replica per "
                                 "pipeline; replicate later stages, or run more pipelines")
        return self

    def resolve(self, num_layers: int, costs: LayerCosts | None = None) -> list[StageSpec]:
        """Concrete stages: the explicit ones (checked), or the balanced split of `costs`."""
        if self.stages is not None:
            check_split([s.range for s in self.stages], num_layers)
            return list(self.stages)
        assert self.auto is not None
        if costs is None:
            costs = LayerCosts(tuple([1.0] * num_layers))
        if len(costs.layer_s) != num_layers:
            raise ValueError(f"costs cover {len(costs.layer_s)} layers, the model has {num_layers}")
        split = balanced_split(costs, self.auto)
        return [
            StageSpec(layers=f"{a}:{b}", max_replicas=1 if i == 0 else self.max_replicas)
            for i, (a, b) in enumerate(split)
        ]

