"""The head's two loops: the engine thread (schedule, head layers, results) and the network thread.

The engine thread owns the scheduler, as in `AsyncEngine`; it never blocks on a socket.
The network thread runs an asyncio loop that holds one frame link to every downstream
replica: it writes the STEP frames the engine thread hands it (FIFO per link) and turns
what comes back (RESULT, ERROR, a drain notice, a closed link) into events for the
engine thread. A closed link fails the sequences of that replica at once, so a stage
that dies becomes an error for its clients, not a hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from strata.engine.core import RequestError, SeqOutput
from strata.engine.engine import AsyncEngine
from strata.stages.head import HeadCore, StageUnavailable
from strata.stages.links import connect
from strata.stages.protocol import CONTROL, StepResult, control_frame
from strata.stages.transport import ERROR, HELLO, RESULT, Connection, Frame, split_addr

log = logging.getLogger("strata.stages.head")


@dataclass(frozen=True)
class NetEvent:
    """Something the network thread saw, for the engine thread."""

    kind: str  # result | error | lost | draining
    addr: str = ""
    step_id: int = 0
    result: StepResult | None = None
    message: str = ""


class _Link:
    """One replica's frame link with an ordered writer."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.outbox: asyncio.Queue[Frame] = asyncio.Queue()
        self.tasks: list[asyncio.Task[Any]] = []


class HeadNet:
    """The head's network thread: links to every downstream replica."""

    def __init__(
        self,
        hello: dict[str, Any],
        on_event: Callable[[NetEvent], None],
        check: Callable[[dict[str, Any]], int],
        register: Callable[[dict[str, Any], str], int],
        token: str | None = None,
    ) -> None:
        self.hello = hello
        self.token = token  # the cluster's internal token: links and the replicas' /info
        self.on_event = on_event
        self.check = check  # raises ValueError unless a replica's /info fits a stage here
        self.register = register  # makes a connected replica available for pinning
        self.loop = asyncio.new_event_loop()
        self.links: dict[str, _Link] = {}
        self.sent_bytes = 0
        self._thread = threading.Thread(target=self._run, name="strata-stage-net", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        """Start the network thread."""
        self._thread.start()

    def stop(self) -> None:
        """Close every link and stop the thread."""
        if not self.loop.is_running():
            return

        async def _close() -> None:
            for link in list(self.links.values()):
                for t in link.tasks:
                    t.cancel()
                link.conn.close()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(_close(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    # -- replicas ---------------------------------------------------------------
    def add_replica(self, url: str) -> concurrent.futures.Future[dict[str, Any]]:
        """Connect a stage replica by its HTTP URL (thread-safe); resolves to its /info."""
        return asyncio.run_coroutine_threadsafe(self._add(url.rstrip("/")), self.loop)

    async def _add(self, url: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{url}/info")
            r.raise_for_status()
            info = r.json()
        addr = str(info["data_addr"])
        old = self.links.get(addr)
        if old is not None and not old.conn.is_closed:
            raise ValueError(f"replica {url} ({addr}) is already connected")
        self.check(info)
        conn = await connect(*split_addr(addr), token=self.token, role="head")
        try:
            await conn.send(Frame(HELLO, 0, self.hello))
            reply = await asyncio.wait_for(conn.recv(), timeout=60)
        except BaseException:
            conn.close()
            raise
        if reply is None or reply.kind != HELLO or not reply.meta.get("ok"):
            conn.close()
            why = "closed the link" if reply is None else reply.meta.get("error", "refused")
            raise ValueError(f"replica {url} refused this head: {why}")
        link = _Link(conn)
        self.links[addr] = link
        link.tasks = [
            self.loop.create_task(self._writer(addr, link)),
            self.loop.create_task(self._reader(addr, link)),
        ]
        try:
            self.register(info, url)  # only now: sequences pinned to it can be sent
        except ValueError:
            for t in link.tasks:
                t.cancel()
            conn.close()
            del self.links[addr]
            raise
        if reply.meta.get("draining"):
            self.on_event(NetEvent("draining", addr))
        return {**info, "url": url}

    async def _writer(self, addr: str, link: _Link) -> None:
        while True:
            frame = await link.outbox.get()
            try:
                await link.conn.send(frame)
                self.sent_bytes += frame.nbytes
            except (ConnectionError, OSError) as e:
                link.conn.close()
                if frame.kind != CONTROL:
                    self.on_event(NetEvent("error", addr, frame.step_id, message=f"send to {addr} failed: {e}"))
                return

    async def _reader(self, addr: str, link: _Link) -> None:
        reason = "the link closed"
        try:
            while True:
                frame = await link.conn.recv()
                if frame is None:
                    exc = link.conn.closed.result() if link.conn.closed.done() else None
                    reason = f"the link closed ({exc})" if exc else "the link closed"
                    break
                if frame.kind == RESULT:
                    try:
                        res = StepResult.from_frame(frame)
                    except (KeyError, ValueError, TypeError) as e:
                        self.on_event(NetEvent("error", addr, frame.step_id, message=f"bad result: {e}"))
                        continue
                    self.on_event(NetEvent("result", addr, frame.step_id, res))
                elif frame.kind == ERROR:
                    m = frame.meta
                    msg = f"stage {m.get('stage', '?')} at {m.get('replica', addr)}: {m.get('message', '')}"
                    self.on_event(NetEvent("error", addr, frame.step_id, message=msg))
                elif frame.kind == CONTROL and frame.meta.get("draining"):
                    self.on_event(NetEvent("draining", addr))
        finally:
            for t in link.tasks:
                if t is not asyncio.current_task():
                    t.cancel()
            if self.links.get(addr) is link:
                del self.links[addr]
            self.on_event(NetEvent("lost", addr, message=f"stage replica {addr}: {reason}"))

    # -- sending ----------------------------------------------------------------
    def send(self, addr: str, frame: Frame) -> None:
        """Queue a frame for a replica (thread-safe, FIFO per replica)."""
        self.loop.call_soon_threadsafe(self._enqueue, addr, frame)

    def _enqueue(self, addr: str, frame: Frame) -> None:
        link = self.links.get(addr)
        if link is None or link.conn.is_closed:
            if frame.kind != CONTROL:
                self.on_event(NetEvent("error", addr, frame.step_id,
                                       message=f"no link to stage replica {addr}"))
            return
        link.outbox.put_nowait(frame)


class HeadEngine(AsyncEngine):
    """`AsyncEngine` whose loop pipelines micro-batches through the downstream stages."""

    _request_errors = (RequestError, StageUnavailable)
    _loop_name = "head engine loop"
    _log = log

    def __init__(self, core: HeadCore, token: str | None = None) -> None:
        super().__init__(core)
        self.core: HeadCore = core
        self.events: queue.SimpleQueue[NetEvent] = queue.SimpleQueue()
        hello = {
            "role": "head",
            "num_blocks": core.runner.num_blocks,
            "block_size": core.runner.block_size,
            "eos_token_ids": list(core.eos_token_ids),
            "model": core.model_name,
            # What a STEP may carry: each stage bounds frames and indices by these.
            "max_num_batched_tokens": core.config.max_num_batched_tokens,
            "max_num_seqs": core.config.max_num_seqs,
            "max_model_len": core.config.max_model_len,
        }
        self.net = HeadNet(hello, self._on_event, self._check, self._register, token)

    def _on_event(self, ev: NetEvent) -> None:
        self.events.put(ev)
        self._wake.set()

    def _check(self, info: dict[str, Any]) -> int:
        with self.core.lock:
            return self.core.replicas.stage_index(tuple(info["layers"]))  # type: ignore[arg-type]

    def _register(self, info: dict[str, Any], url: str) -> int:
        core = self.core
        with core.lock:
            stage = core.replicas.stage_index(tuple(info["layers"]))  # type: ignore[arg-type]
            core.replicas.add(stage, str(info["data_addr"]), url)
        log.info("stage %s: replica %s (%s) joined", core.replicas.name(stage), url, info["data_addr"])
        return stage

    def start(self) -> None:
        """Start the network thread, then the engine thread."""
        self.net.start()
        super().start()

    def stop(self) -> None:
        """Stop both threads."""
        super().stop()
        self.net.stop()

    def add_replica(self, url: str) -> concurrent.futures.Future[dict[str, Any]]:
        """Connect a downstream replica (thread-safe)."""
        return self.net.add_replica(url)

    def remove_replica(self, addr: str) -> None:
        """Stop pinning to a replica; it leaves once its sequences finished (drain)."""
        self.events.put(NetEvent("draining", addr))
        self._wake.set()

    # -- the loop ---------------------------------------------------------------
    def _advance(self, received: bool, errors: list[tuple[int, BaseException]]) -> None:
        """One turn: apply the network's events, fail expired steps, launch micro-batches,
        deliver; wait only when nothing happened (AsyncEngine's hook)."""
        core = self.core
        progressed = received
        outputs: list[SeqOutput] = []
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                break
            progressed = True
            outputs += self._apply(ev, errors)
        errors += core.take_failures()
        for step_id in core.expired_steps(time.perf_counter()):
            errors += core.fail_step(
                step_id, f"a pipeline step got no answer within {core.step_timeout_s:.0f} s"
            )
        progressed |= self._launch()
        for addr, ids in core.take_drops().items():
            self.net.send(addr, control_frame(drop=ids))
        if outputs or errors:
            self._deliver([(o.seq_id, o) for o in outputs] + list(errors))
        if not progressed:
            self._wake.wait(timeout=0.25 if core.inflight else 1.0)

    def _apply(self, ev: NetEvent, errors: list[tuple[int, BaseException]]) -> list[SeqOutput]:
        core = self.core
        if ev.kind == "result":
            assert ev.result is not None
            return core.complete(ev.step_id, ev.result)
        if ev.kind == "error":
            log.warning("step %d failed: %s", ev.step_id, ev.message)
            errors += core.fail_step(ev.step_id, ev.message)
        elif ev.kind == "lost":
            log.warning("%s", ev.message)
            errors += core.fail_replica(ev.addr, ev.message)
        elif ev.kind == "draining":
            with core.lock:
                if core.replicas.set_state(ev.addr, "draining") is not None:
                    log.info("stage replica %s is draining", ev.addr)
                core.replicas.remove_if_drained(ev.addr)
        return []

    def _launch(self) -> bool:
        """Send micro-batches while some path has room and unscheduled work."""
        core = self.core
        launched = False
        empty: set[tuple[str, ...]] = set()
        while not self._stopped:
            paths = [p for p in core.schedulable_paths() if p not in empty]
            if not paths:
                break
            batch = core.schedule(paths[0])
            if not batch:
                empty.add(paths[0])
                continue
            _, first, frame = core.launch(batch, paths[0])
            self.net.send(first, frame)
            launched = True
        with core.lock:
            for view in core.replicas.views({}):
                if view.state != "live":
                    core.replicas.remove_if_drained(view.addr)
        return launched
