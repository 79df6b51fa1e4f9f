"""Replicas as local processes on free loopback ports, each watched by one supervisor task.

A supervisor owns its replica's process from launch to exit, so nothing else races on it:

* **start**: the command runs in its own process group (``start_new_session``), under
  ``strata.platform.guard`` so it dies with this process; it serves traffic only after its
  ``/health`` answers 200 within ``start_timeout_s``.
* **crash**: an exit it did not ask for, a ``dead`` health status or a start that timed out
  is restarted after ``restart_backoff_s * 2^(streak-1)`` (at most
  ``restart_backoff_max_s``); the streak resets once a process stayed ready
  ``stable_after_s``. Failing health checks only take a live replica out of traffic.
* **drain** (scale-down, ``drain``): out of ``endpoints`` at once, ``POST /drain`` (the
  engine then refuses new requests with 503 so the gateway retries elsewhere), wait until
  ``/load`` reports nothing running or waiting (KV blocks freed; and the spec's ``drained``
  check agrees, e.g. no sequence is pinned to a stage replica) or ``drain_timeout_s``,
  then SIGTERM the group, and SIGKILL it after ``stop_timeout_s``. An engine counts its
  own drain from ``POST /drain`` too, so at that SIGTERM it ends what is left at once.
* **shutdown** (``close``): SIGTERM every group (an engine then drains for up to its
  ``--drain-timeout-s``, which ``engine_spec`` sets to ``drain_timeout_s``), SIGKILL what
  is left ``drain_timeout_s + stop_timeout_s`` later: SIGKILL always comes after the drain;
  an ``atexit`` hook SIGKILLs any group still alive if the event loop never got to ``close``.
  A crashed or never-ready replica gets ``stop_timeout_s`` alone.

With an ``internal_token`` every child gets it in ``STRATA_INTERNAL_TOKEN`` (never on its
command line, which the logs show), ``POST /drain`` carries it, and a copy readable by
this user only (0600) lies in the log directory for an operator's admin calls.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from strata.config import ClusterConfig, PlatformOptions
from strata.internal_auth import ENV_VAR, write_token_file
from strata.internal_auth import headers as internal_headers
from strata.platform.base import Endpoint, Replica, ReplicaPhase
from strata.platform.process import (
    ProcessSpec,
    engine_spec,
    free_port,
    guarded,
    kill_group,
    log_tail,
    pick_victims,
    restart_delay,
)

log = logging.getLogger("strata.platform")

_UNREADY_AFTER_FAILURES = 3


@dataclass(eq=False)
class _Slot:
    """Mutable record of one replica; only its supervisor changes the process fields."""

    tier: str
    replica_id: str
    phase: ReplicaPhase = "starting"
    port: int = 0
    started_at: float = 0.0
    ready_at: float | None = None
    restarts: int = 0
    streak: int = 0
    last_exit: str = ""
    proc: asyncio.subprocess.Process | None = None
    exited: asyncio.Task[int] | None = None
    retiring: bool = False
    graceful: bool = True  # drain before stopping (False on shutdown)
    drain_started: float | None = None  # when POST /drain was sent
    retire: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def view(self, host: str) -> Replica:
        alive = self.proc is not None and self.proc.returncode is None
        return Replica(tier=self.tier, replica_id=self.replica_id, phase=self.phase,
                       url=f"http://{host}:{self.port}" if alive else None,
                       started_at=self.started_at, ready_at=self.ready_at,
                       restarts=self.restarts, crash_streak=self.streak,
                       pid=self.proc.pid if alive and self.proc else None,
                       last_exit=self.last_exit)


class LocalPlatform:
    """The ``Platform`` of one machine: each tier's replicas are child processes."""

    def __init__(self, specs: dict[str, ProcessSpec], options: PlatformOptions | None = None,
                 *, host: str = "127.0.0.1", clock: Callable[[], float] = time.monotonic,
                 internal_token: str | None = None) -> None:
        """``specs`` says how to launch each tier's replicas; nothing runs until ``scale``."""
        self.specs = specs
        self.internal_token = internal_token
        self.options = options or PlatformOptions()
        self.host = host
        self.clock = clock
        self.log_dir = self.options.log_dir or Path(tempfile.mkdtemp(prefix="strata-replicas-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if internal_token is not None:
            write_token_file(self.log_dir, internal_token)
        self._desired = {tier: 0 for tier in specs}
        self._slots: dict[str, list[_Slot]] = {tier: [] for tier in specs}
        self._ids = {tier: itertools.count() for tier in specs}
        self._changed = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        self._closed = False
        atexit.register(self.kill_all_now)

    @classmethod
    def from_config(cls, config: ClusterConfig, internal_token: str | None = None) -> LocalPlatform:
        """Engine processes for every tier of the cluster file."""
        return cls({name: engine_spec(config, name) for name in config.tiers}, config.platform,
                   internal_token=internal_token)

    # -- the Platform interface ------------------------------------------------------------

    async def scale(self, tier: str, replicas: int) -> None:
        """Ask for ``replicas`` replicas; starts or drains in the background."""
        if tier not in self.specs:
            raise KeyError(f"unknown tier {tier!r}; this platform runs {', '.join(self.specs)}")
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        if self._closed:
            raise RuntimeError("the platform is closed")
        if replicas != self._desired[tier]:
            log.info("tier %s: scale %d -> %d", tier, self._desired[tier], replicas)
        self._desired[tier] = replicas
        self._reconcile(tier)

    def endpoints(self, tier: str) -> list[Endpoint]:
        """Ready replicas (health passed, not draining), oldest first."""
        return [Endpoint(tier, s.replica_id, f"http://{self.host}:{s.port}")
                for s in self._slots.get(tier, []) if s.phase == "ready" and not s.retiring]

    async def drain(self, replica_id: str) -> None:
        """Retire one replica gracefully and start its replacement; returns once it is gone."""
        slot = self._find(replica_id)
        self._retire(slot, graceful=True)
        self._reconcile(slot.tier)
        await slot.gone.wait()

    def desired(self, tier: str) -> int:
        """The count last asked for."""
        return self._desired[tier]

    def replicas(self, tier: str) -> list[Replica]:
        """Every replica of ``tier`` in any phase."""
        return [s.view(self.host) for s in self._slots.get(tier, [])]

    def tiers(self) -> list[str]:
        """The tiers this platform runs."""
        return list(self.specs)

    async def wait_changed(self, timeout_s: float) -> None:
        """Return on the next phase or address change, or after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass

    async def close(self) -> None:
        """Stop every replica: SIGTERM (each drains itself), SIGKILL after drain + stop timeouts."""
        self._closed = True
        slots = [s for ss in self._slots.values() for s in ss]
        for s in slots:
            self._retire(s, graceful=False)
        tasks = [s.task for s in slots if s.task is not None]
        if tasks:
            _, pending = await asyncio.wait(
                tasks, timeout=self.options.drain_timeout_s + self.options.stop_timeout_s + 5)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self.kill_all_now()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        atexit.unregister(self.kill_all_now)

    # -- bookkeeping ---------------------------------------------------------------------

    def _find(self, replica_id: str) -> _Slot:
        for slots in self._slots.values():
            for s in slots:
                if s.replica_id == replica_id:
                    return s
        raise KeyError(f"no replica {replica_id!r}")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _reconcile(self, tier: str) -> None:
        live = [s for s in self._slots[tier] if not s.retiring]
        want = self._desired[tier]
        for _ in range(want - len(live)):
            slot = _Slot(tier, f"{tier}-{next(self._ids[tier])}", started_at=self.clock())
            self._slots[tier].append(slot)
            slot.task = asyncio.create_task(self._supervise(slot), name=slot.replica_id)
        if len(live) > want:
            victims = set(pick_victims([s.view(self.host) for s in live], len(live) - want))
            for s in live:
                if s.replica_id in victims:
                    self._retire(s, graceful=True)
        self._notify()

    def _retire(self, slot: _Slot, graceful: bool) -> None:
        slot.graceful = slot.graceful and graceful
        if not slot.retiring:
            slot.retiring = True
            log.info("replica %s: retiring (%s)", slot.replica_id,
                     "drain" if graceful else "stop")
        slot.retire.set()
        self._notify()  # out of endpoints at once

    def kill_all_now(self) -> None:
        """Last resort (atexit, end of close): SIGKILL every group still alive."""
        for slots in self._slots.values():
            for s in slots:
                if s.proc is not None and s.proc.returncode is None:
                    kill_group(s.proc.pid, signal.SIGKILL)

    # -- one replica's life ---------------------------------------------------------------

    async def _supervise(self, slot: _Slot) -> None:
        try:
            launches = 0
            while not slot.retiring:
                if launches:
                    delay = restart_delay(slot.streak, self.options.restart_backoff_s,
                                          self.options.restart_backoff_max_s)
                    self._set_phase(slot, "backoff")
                    await self._pause(slot, delay)
                    if slot.retiring:
                        break
                    slot.restarts += 1
                launches += 1
                try:
                    await self._launch(slot)
                except OSError as err:  # e.g. the command does not exist: a crash, retried
                    slot.streak += 1
                    slot.last_exit = f"could not start: {err}"
                    log.error("replica %s could not start: %s", slot.replica_id, err)
                    continue
                outcome = await self._until_ready(slot)
                if outcome == "ready":
                    slot.ready_at = self.clock()
                    self._set_phase(slot, "ready")
                    log.info("replica %s ready at %s after %.1f s", slot.replica_id,
                             f"{self.host}:{slot.port}", slot.ready_at - slot.started_at)
                    outcome = await self._while_ready(slot)
                    if self.clock() - slot.ready_at >= self.options.stable_after_s:
                        slot.streak = 0
                if outcome == "retire":
                    break
                slot.streak += 1
                await self._crashed(slot, outcome)
            await self._wind_down(slot)
        finally:
            if slot.proc is not None and slot.proc.returncode is None:
                kill_group(slot.proc.pid, signal.SIGKILL)  # cancelled mid-way
            if slot in self._slots[slot.tier]:
                self._slots[slot.tier].remove(slot)
            slot.gone.set()
            self._notify()

    async def _launch(self, slot: _Slot) -> None:
        slot.port = free_port(self.host)
        slot.started_at = self.clock()
        slot.ready_at = None
        spec = self.specs[slot.tier]
        argv = guarded(spec.argv(self.host, slot.port))
        path = self.log_dir / f"{slot.replica_id}.log"
        logf: IO[bytes] = path.open("ab")
        try:
            logf.write(f"\n=== {time.strftime('%F %T')} start: {' '.join(argv)}\n".encode())
            logf.flush()
            slot.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                env=self._environment(spec))
        finally:
            logf.close()  # the child holds its own descriptor
        slot.exited = asyncio.create_task(slot.proc.wait())
        self._set_phase(slot, "starting")
        log.info("replica %s starting on port %d (pid %d, %d thread(s), log %s)",
                 slot.replica_id, slot.port, slot.proc.pid, spec.threads, path)

    def _environment(self, spec: ProcessSpec) -> dict[str, str]:
        env = spec.environment(os.environ)
        if self.internal_token is not None:
            env[ENV_VAR] = self.internal_token
        return env

    async def _pause(self, slot: _Slot, seconds: float) -> None:
        """Sleep up to ``seconds``; wake early on retirement or process exit."""
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(slot.retire.wait())]
        if slot.exited is not None and not slot.exited.done():
            waits.append(slot.exited)  # type: ignore[arg-type]
        try:
            await asyncio.wait(waits, timeout=max(0.0, seconds),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waits[0].cancel()

    def _exited(self, slot: _Slot) -> bool:
        return slot.proc is None or slot.proc.returncode is not None

    async def _until_ready(self, slot: _Slot) -> str:
        deadline = slot.started_at + self.options.start_timeout_s
        while True:
            if slot.retiring:
                return "retire"
            if self._exited(slot):
                return "exit"
            if self.clock() >= deadline:
                return "timeout"
            status = await self._health(slot)
            if status == "ok":
                return "ready"
            if status == "dead":
                return "dead"
            await self._pause(slot, self.options.health_interval_s)

    async def _while_ready(self, slot: _Slot) -> str:
        failures = 0
        while True:
            await self._pause(slot, self.options.health_interval_s)
            if slot.retiring:
                return "retire"
            if self._exited(slot):
                return "exit"
            status = await self._health(slot)
            if status == "dead":
                return "dead"
            failures = 0 if status == "ok" else failures + 1
            if status == "ok" and slot.phase == "unready":
                self._set_phase(slot, "ready")
            elif failures >= _UNREADY_AFTER_FAILURES and slot.phase == "ready":
                log.warning("replica %s failed %d health checks (%s): out of traffic",
                            slot.replica_id, failures, status)
                self._set_phase(slot, "unready")

    async def _crashed(self, slot: _Slot, outcome: str) -> None:
        if outcome == "exit":
            assert slot.proc is not None
            why = f"exited with status {slot.proc.returncode}"
        elif outcome == "dead":
            why = "reported its engine dead"
        else:
            why = f"not ready within {self.options.start_timeout_s:g} s"
        await self._stop(slot)
        slot.last_exit = why
        delay = restart_delay(slot.streak, self.options.restart_backoff_s,
                              self.options.restart_backoff_max_s)
        log.warning("replica %s %s; restarting in %.1f s (crash #%d in a row). Log tail:\n%s",
                    slot.replica_id, why, delay, slot.streak,
                    log_tail(self.log_dir / f"{slot.replica_id}.log"))

    async def _wind_down(self, slot: _Slot) -> None:
        """Retirement: drain if it was serving and a graceful stop was asked, then stop."""
        if slot.graceful and slot.phase == "ready" and not self._exited(slot):
            self._set_phase(slot, "draining")
            await self._drain_requests(slot)
        if not self._exited(slot):
            self._set_phase(slot, "stopping")
        await self._stop(slot, after_drain=True)
        slot.last_exit = "stopped"

    async def _drain_requests(self, slot: _Slot) -> None:
        url = f"http://{self.host}:{slot.port}"
        t0 = slot.drain_started = self.clock()
        http = self._client()
        try:
            resp = await http.post(url + "/drain", headers=internal_headers(self.internal_token))
            if resp.status_code in (401, 403):
                log.warning("replica %s refused POST /drain (%d): %s; stopping it",
                            slot.replica_id, resp.status_code, resp.text[:200])
                return
        except httpx.HTTPError as err:
            log.warning("replica %s: POST /drain failed (%s); stopping it", slot.replica_id, err)
            return
        idle_reads = 0
        last: dict[str, object] = {}
        drained = self.specs[slot.tier].drained
        while self.clock() - t0 < self.options.drain_timeout_s and not self._exited(slot):
            try:
                last = (await http.get(url + "/load")).json()
                idle = last.get("running") == 0 and last.get("waiting") == 0
            except (httpx.HTTPError, ValueError):
                idle = False
            if idle and drained is not None:
                idle = await drained(url)
            idle_reads = idle_reads + 1 if idle else 0
            if idle_reads >= 2:  # two reads apart: nothing was in transit to it either
                log.info("replica %s drained in %.1f s (kv_usage %.2f)", slot.replica_id,
                         self.clock() - t0, float(last.get("kv_usage", 0.0)))  # type: ignore[arg-type]
                return
            await asyncio.sleep(0.25)
        if not self._exited(slot):
            log.warning("replica %s still busy after %.0f s of draining (%s); stopping it",
                        slot.replica_id, self.options.drain_timeout_s, last)

    async def _stop(self, slot: _Slot, after_drain: bool = False) -> None:
        """SIGTERM, then SIGKILL ``stop_timeout_s`` after what is left of its drain.

        ``after_drain``: a retirement, where the replica drains (its own timeout counts
        from ``POST /drain``, or from this SIGTERM when none was sent); otherwise (crash,
        start timeout) ``stop_timeout_s`` alone.
        """
        proc = slot.proc
        if proc is None or proc.returncode is not None:
            return
        grace = self.options.stop_timeout_s
        if after_drain:
            drain = self.options.drain_timeout_s
            if slot.drain_started is not None:
                drain = max(0.0, slot.drain_started + drain - self.clock())
            grace += drain
        kill_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(slot.exited or proc.wait()),  # type: ignore[arg-type]
                                   grace)
        except TimeoutError:
            log.warning("replica %s ignored SIGTERM for %.0f s: SIGKILL", slot.replica_id,
                        grace)
            kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()

    def _set_phase(self, slot: _Slot, phase: ReplicaPhase) -> None:
        if slot.phase != phase:
            slot.phase = phase
            self._notify()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=2.0)
        return self._http

    async def _health(self, slot: _Slot) -> str:
        """``ok``, ``loading``, ``draining``, ``dead`` (its body's status) or ``down``."""
        try:
            resp = await self._client().get(f"http://{self.host}:{slot.port}/health")
        except httpx.HTTPError:
            return "down"
        if resp.status_code == 200:
            return "ok"
        try:
            status = resp.json().get("status")
        except (ValueError, AttributeError):
            status = None
        return status if status in ("loading", "draining", "dead") else "down"
