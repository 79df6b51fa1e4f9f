"""Per-stage replica sets and sequence pinning: which replica of each stage holds a sequence's KV.

Pure bookkeeping (no sockets, no clock, no torch): the head calls it under its lock.
A sequence is pinned, per downstream stage, to one live replica that is not draining;
the choice is the replica with the most free KV blocks, then the shortest queue (fewest
pinned sequences). A draining replica keeps its pinned sequences until they finish,
which is what lets a stage's replica set scale down without losing anyone's KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

StageReplicaPhase = Literal["live", "draining", "down"]
Path = tuple[str, ...]  # one data address per downstream stage, in pipeline order


class NoReplicaError(RuntimeError):
    """A stage has no replica that can take a new sequence."""


@dataclass
class StageReplica:
    """One replica of one downstream stage, as the head sees it."""

    stage: int  # index among the downstream stages (0 = the one right after the head)
    addr: str  # host:port of its frame listener
    url: str  # http://host:port of its HTTP face
    state: StageReplicaPhase = "live"
    pinned: set[int] = field(default_factory=set)
    inflight: int = 0  # micro-batches sent through it and not answered
    steps: int = 0


@dataclass(frozen=True)
class ReplicaView:
    """A replica's state for /stages and load reports."""

    stage: str
    addr: str
    url: str
    state: StageReplicaPhase
    pinned: int
    inflight: int
    used_kv_blocks: int
    steps: int


class ReplicaSets:
    """The replicas of every downstream stage and the path each sequence is pinned to."""

    def __init__(self, stages: list[tuple[int, int]], num_blocks: int) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage after the head")
        self.stages = list(stages)
        self.num_blocks = num_blocks
        self.replicas: dict[str, StageReplica] = {}
        self.paths: dict[int, Path] = {}

    def stage_index(self, layers: tuple[int, int]) -> int:
        """Which downstream stage holds exactly `layers`; ValueError names the expected ranges."""
        try:
            return self.stages.index(tuple(layers))  # type: ignore[arg-type]
        except ValueError:
            want = ", ".join(f"{a}:{b}" for a, b in self.stages)
            raise ValueError(
                f"layers {layers[0]}:{layers[1]} are not a stage of this pipeline ({want})"
            ) from None

    def add(self, stage: int, addr: str, url: str) -> StageReplica:
        """Register a live replica (again, if it had left)."""
        rep = StageReplica(stage, addr, url)
        old = self.replicas.get(addr)
        if old is not None and old.state != "down":
            raise ValueError(f"replica {addr} is already part of stage {self.name(stage)}")
        self.replicas[addr] = rep
        return rep

    def name(self, stage: int) -> str:
        """'a:b' of a downstream stage."""
        a, b = self.stages[stage]
        return f"{a}:{b}"

    def of_stage(self, stage: int) -> list[StageReplica]:
        """The stage's replicas in every state."""
        return [r for r in self.replicas.values() if r.stage == stage]

    def ready(self) -> bool:
        """Every stage has a live replica (the pipeline can take sequences)."""
        return all(
            any(r.state == "live" for r in self.of_stage(i)) for i in range(len(self.stages))
        )

    def pin(self, seq_id: int, used_blocks: dict[str, int]) -> Path:
        """Choose one replica per stage for a new sequence (most free KV, then shortest queue)."""
        path: list[str] = []
        for i in range(len(self.stages)):
            live = [r for r in self.of_stage(i) if r.state == "live"]
            if not live:
                raise NoReplicaError(
                    f"stage {self.name(i)} has no live replica that takes new sequences"
                )
            best = min(
                live,
                key=lambda r: (-(self.num_blocks - used_blocks.get(r.addr, 0)), len(r.pinned), r.addr),
            )
            path.append(best.addr)
        for addr in path:
            self.replicas[addr].pinned.add(seq_id)
        self.paths[seq_id] = tuple(path)
        return tuple(path)

    def unpin(self, seq_id: int) -> Path | None:
        """Forget a finished sequence; returns the path it was pinned to."""
        path = self.paths.pop(seq_id, None)
        for addr in path or ():
            rep = self.replicas.get(addr)
            if rep is not None:
                rep.pinned.discard(seq_id)
        return path

    def path_of(self, seq_id: int) -> Path | None:
        """The sequence's path, None when it is not pinned."""
        return self.paths.get(seq_id)

    def set_state(self, addr: str, state: StageReplicaPhase) -> StageReplica | None:
        """Mark a replica draining (no new pins) or down (lost)."""
        rep = self.replicas.get(addr)
        if rep is not None:
            rep.state = state
        return rep

    def remove_if_drained(self, addr: str) -> bool:
        """Drop a draining or down replica once nothing is pinned to or in flight through it."""
        rep = self.replicas.get(addr)
        if rep is None or rep.state == "live" or rep.pinned or rep.inflight:
            return False
        del self.replicas[addr]
        return True

    def views(self, used_blocks: dict[str, int]) -> list[ReplicaView]:
        """Every replica's state, stage by stage."""
        return [
            ReplicaView(self.name(r.stage), r.addr, r.url, r.state, len(r.pinned), r.inflight,
                        used_blocks.get(r.addr, 0), r.steps)
            for r in sorted(self.replicas.values(), key=lambda r: (r.stage, r.addr))
        ]
