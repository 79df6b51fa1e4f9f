"""Where replicas live, as an interface: ``scale``, ``endpoints``, ``drain``.

The autoscaler and the gateway know replicas only through this protocol, so the same
control loop drives local processes (``strata.platform.local``) and Kubernetes Deployments
(``strata.platform.kubernetes``: scale subresource, EndpointSlices). A platform reports
what it runs as frozen ``Replica`` records; ``endpoints`` are the replicas that passed
their readiness check and are not on their way out, i.e. the only ones that may receive
traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

# starting: process launched, /health not yet ok; ready: serving; unready: was ready, now
# failing its health checks (kept out of traffic, not restarted); draining: refusing new
# requests while in-flight ones finish; stopping: being terminated; backoff: crashed,
# waiting to be restarted.
ReplicaPhase = Literal["starting", "ready", "unready", "draining", "stopping", "backoff"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A replica that may receive traffic now."""

    tier: str
    replica_id: str
    url: str  # http://host:port, no trailing slash


@dataclass(frozen=True, slots=True)
class Replica:
    """One replica as the platform knows it; times are on the platform's monotonic clock."""

    tier: str
    replica_id: str
    phase: ReplicaPhase
    url: str | None  # None while no process runs (backoff)
    started_at: float  # when the current process was launched
    ready_at: float | None = None  # when it last became ready; None: not yet
    restarts: int = 0  # processes started after the first one (crashes, failed starts)
    crash_streak: int = 0  # crashes in a row without a stable run (CrashLoopBackOff when high)
    pid: int | None = None
    last_exit: str = ""  # why the previous process ended, for status and logs
    capacity: float = 1.0  # size relative to the tier's others (Kubernetes: the pod's request)

    @property
    def ready(self) -> bool:
        """Serving and not on its way out."""
        return self.phase == "ready"

    @property
    def terminating(self) -> bool:
        """Draining or being stopped: no longer counts toward the tier."""
        return self.phase in ("draining", "stopping")

    @property
    def startup_s(self) -> float | None:
        """Launch-to-ready time of the current process; None until it is ready."""
        return None if self.ready_at is None else self.ready_at - self.started_at


class Platform(Protocol):
    """Runs each tier's replicas; the only seam between control and where things run."""

    async def scale(self, tier: str, replicas: int) -> None:
        """Ask for ``replicas`` replicas of ``tier``; returns once the change is under way.

        New replicas receive traffic only after their readiness check passes; removed ones
        are drained (no new requests, in-flight ones finish) before they stop.
        """
        ...

    def endpoints(self, tier: str) -> list[Endpoint]:
        """The tier's replicas that may receive traffic now."""
        ...

    async def drain(self, replica_id: str) -> None:
        """Retire one replica gracefully; the tier's count is kept, so it is replaced."""
        ...

    def desired(self, tier: str) -> int:
        """The replica count last asked for (Kubernetes' ``spec.replicas``)."""
        ...

    def replicas(self, tier: str) -> list[Replica]:
        """Every replica of the tier that exists now, in any phase (``status``)."""
        ...

    async def wait_changed(self, timeout_s: float) -> None:
        """Return when any replica changes phase or address, or after ``timeout_s``."""
        ...

    async def close(self) -> None:
        """Stop every replica now and release everything (the cluster is shutting down)."""
        ...
