"""What crosses the simulator's seams: a trace request and its fate, engine settings, and
the callbacks a replica makes to its cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from strata.sim.replica import SimReplica


class SimRequest:
    """One request of the replayed trace and what happened to it (times in virtual s)."""

    __slots__ = ("req_id", "arrival_s", "prompt_tokens", "output_tokens", "hash_ids",
                 "dispatched_s", "first_token_s", "finish_s", "replica", "status",
                 "preemptions", "cached_tokens")

    def __init__(self, req_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int,
                 hash_ids: tuple[int, ...] = ()) -> None:
        self.req_id = req_id
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.hash_ids = hash_ids
        self.dispatched_s = -1.0
        self.first_token_s = -1.0
        self.finish_s = -1.0
        self.replica = ""
        self.status = "pending"  # pending | running | ok | rejected | unfinished
        self.preemptions = 0
        self.cached_tokens = 0


class ReplicaListener(Protocol):
    """What a replica tells its cluster."""

    def on_first_token(self, replica: SimReplica, req: SimRequest, now: float) -> None:
        """A request's first output token left the replica."""
        ...

    def on_finish(self, replica: SimReplica, req: SimRequest, now: float) -> None:
        """A request's last token left the replica."""
        ...

    def on_stopped(self, replica: SimReplica, now: float) -> None:
        """A draining replica has finished its work and released its GPUs."""
        ...


@dataclass(frozen=True)
class EngineSettings:
    """The engine options a simulated replica honours (the cluster file's ``engine``)."""

    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    prefix_caching: bool = True
