"""A downstream stage as a service: frames in, its layers, frames out; HTTP for the platform.

Frames from any upstream link go into one FIFO (so the steps of one pipeline path run
in the order the head sent them, which keeps block reuse safe); one compute thread runs
them while the event loop keeps receiving and sending, so a stage overlaps its
transfers with its compute. Results and errors return to the head over the link the
head opened; a broken next hop becomes an ERROR frame to the head, never silence.

Links are authenticated with the cluster's internal token before their first frame
(`strata.stages.links`); once a head has sized the KV cache, each frame is bounded
by what that head's batch limits allow, the FIFO is bounded (a full one stops reading
the links: TCP backpressure) and every STEP is checked against the cache before it
runs (`check_step`): a bad one is answered with an ERROR frame and the stage serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from strata.internal_auth import admin_denial
from strata.internal_auth import headers as internal_headers
from strata.load import LoadReport
from strata.load_meter import LoadMeter
from strata.stages.links import connect, serve
from strata.stages.protocol import CONTROL, StepMessage, StepResult, control_frame, error_frame
from strata.stages.runtime import StageRuntime
from strata.stages.transport import HELLO, STEP, Connection, Frame, split_addr

log = logging.getLogger("strata.stages.worker")

HELLO_MAX_FRAME_BYTES = 1 << 20  # frames before a head sized the cache (HELLO, CONTROL)


class StageWorker:
    """One replica of a downstream stage: data port for frames, HTTP for health and load."""

    def __init__(
        self, runtime: StageRuntime, model_name: str, host: str, data_port: int,
        http_url: str, join: str | None = None, join_timeout_s: float = 300.0,
        token: str | None = None, max_inbox: int = 64,
    ) -> None:
        self.rt = runtime
        self.model_name = model_name
        self.host = host
        self.data_port = data_port
        self.http_url = http_url
        self.join_url = join
        self.join_timeout_s = join_timeout_s
        self.token = token  # the cluster's internal token; None: loopback peers only
        self.head: Connection | None = None
        self.links: dict[str, Connection] = {}
        self.inbound: set[Connection] = set()
        self.inbox: asyncio.Queue[Frame] = asyncio.Queue(maxsize=max_inbox)
        self.refused_steps = 0
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage-{runtime.name}")
        self.meter = LoadMeter(time.monotonic())
        self.kv_free: int | None = None
        self.draining = False
        self.ready = False
        self.steps = 0
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def data_addr(self) -> str:
        """host:port of the frame listener."""
        return f"{self.host}:{self.data_port}"

    async def start(self) -> None:
        """Listen for frames and start the compute loop (and the join loop)."""
        self._server = await serve(self.host, self.data_port, self._on_connection,
                                   token=self.token, max_frame_bytes=self.max_frame_bytes)
        self.data_port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self._compute_loop()))
        self.ready = True
        if self.join_url:
            self._tasks.append(asyncio.create_task(self._join()))
        log.info("stage %s: frames on %s", self.rt.name, self.data_addr)

    async def stop(self) -> None:
        """Close the listener and every link."""
        for t in self._tasks:
            t.cancel()
        if self._server is not None:
            self._server.close()
        for c in [*self.links.values(), *([self.head] if self.head else [])]:
            c.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def max_frame_bytes(self) -> int:
        """The largest frame a link may bring: what the head's limits allow, once known."""
        lim = self.rt.limits
        return HELLO_MAX_FRAME_BYTES if lim is None else max(HELLO_MAX_FRAME_BYTES, lim.max_frame_bytes())

    # -- links ------------------------------------------------------------------
    async def _on_connection(self, conn: Connection) -> None:
        self.inbound.add(conn)
        try:
            await self._serve_link(conn)
        finally:
            self.inbound.discard(conn)
            conn.close()

    async def _serve_link(self, conn: Connection) -> None:
        hello = await conn.recv()
        if hello is None:
            return
        role = hello.meta.get("role")
        if hello.kind != HELLO or role != conn.peer_role:
            await conn.send(error_frame(0, self.rt.name, self.data_addr,
                                        "a link starts with a HELLO naming its handshake's role"))
            return
        if role == "head":
            m = hello.meta
            try:
                self.rt.attach(
                    int(m["num_blocks"]), int(m["block_size"]), tuple(m.get("eos_token_ids", ())),
                    max_num_tokens=int(m["max_num_batched_tokens"]),
                    max_num_seqs=int(m["max_num_seqs"]), max_model_len=int(m["max_model_len"]),
                )
            except (KeyError, ValueError, TypeError) as e:
                await conn.send(Frame(HELLO, 0, {"ok": False, "error": str(e)}))
                return
            for c in self.inbound:
                c.max_frame_bytes = self.max_frame_bytes()
            if self.head is not None and self.head is not conn:
                self.head.close()
            self.head = conn
            await conn.send(Frame(HELLO, 0, {
                "ok": True, "layers": [self.rt.model.layer_start, self.rt.model.layer_end],
                "draining": self.draining,
            }))
            log.info("stage %s: head connected from %s", self.rt.name, conn.peer)
        elif role != "stage":
            await conn.send(error_frame(0, self.rt.name, self.data_addr, f"unknown role {role!r}"))
            return
        while True:
            frame = await conn.recv()
            if frame is None:
                break
            if frame.kind == STEP:
                await self.inbox.put(frame)  # a full FIFO stops this link's reads
            elif frame.kind == CONTROL and conn is self.head:
                drop = frame.meta.get("drop", [])
                if isinstance(drop, list) and all(isinstance(s, int) for s in drop):
                    self.rt.drop(drop)
        if conn is self.head:
            self.head = None
            log.warning("stage %s: head link closed", self.rt.name)
            if self.join_url:
                self._tasks.append(asyncio.create_task(self._join()))

    async def _next(self, addr: str) -> Connection:
        conn = self.links.get(addr)
        if conn is None or conn.is_closed:
            host, port = split_addr(addr)
            conn = await connect(host, port, token=self.token, role="stage")
            await conn.send(Frame(HELLO, 0, {"role": "stage", "from": self.data_addr}))
            self.links[addr] = conn
        return conn

    async def _to_head(self, frame: Frame) -> None:
        if self.head is None:
            log.warning("stage %s: no head link; dropping a %d frame", self.rt.name, frame.kind)
            return
        with contextlib.suppress(ConnectionError):
            await self.head.send(frame)

    async def _join(self) -> None:
        """Register with the head (retrying until it answers), so scale-up needs no wiring."""
        assert self.join_url
        deadline = time.monotonic() + self.join_timeout_s
        async with httpx.AsyncClient(timeout=10) as http:
            while time.monotonic() < deadline:
                try:
                    r = await http.post(f"{self.join_url}/stages/replicas", json={"url": self.http_url},
                                        headers=internal_headers(self.token))
                    if r.status_code == 200:
                        log.info("stage %s: joined %s", self.rt.name, self.join_url)
                        return
                    log.warning("stage %s: join refused: %s", self.rt.name, r.text)
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1.0)
        log.error("stage %s: could not join %s within %.0f s", self.rt.name, self.join_url,
                  self.join_timeout_s)

    # -- compute ----------------------------------------------------------------
    async def _compute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await self.inbox.get()
            t0 = time.perf_counter()
            try:
                msg = StepMessage.from_frame(frame)
                if msg.kv_free:
                    self.kv_free = msg.kv_free.get(self.data_addr, self.kv_free)
                out = await loop.run_in_executor(self.executor, self.rt.run, msg)
            except ValueError as e:  # a frame that does not fit this stage: refused, not run
                self.refused_steps += 1
                log.warning("stage %s: step %d refused: %s", self.rt.name, frame.step_id, e)
                await self._to_head(error_frame(frame.step_id, self.rt.name, self.data_addr, str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - reported to the head as an ERROR frame
                log.exception("stage %s: step %d failed", self.rt.name, frame.step_id)
                await self._to_head(error_frame(frame.step_id, self.rt.name, self.data_addr, str(e)))
                continue
            busy = time.perf_counter() - t0
            n_pre = sum(length for _, length, _ in msg.spans)
            self.meter.record(time.monotonic(), busy, n_pre, n_pre + msg.num_decodes, msg.num_decodes)
            self.steps += 1
            if isinstance(out, StepResult):
                await self._to_head(out.to_frame(frame.step_id))
                continue
            if not msg.hops:
                await self._to_head(error_frame(frame.step_id, self.rt.name, self.data_addr,
                                                "a step reached a non-tail stage with no hops left"))
                continue
            nxt = msg.hops[0]
            try:
                link = await self._next(nxt)
                await link.send(out.to_frame(frame.step_id))
            except (TimeoutError, OSError, ConnectionError) as e:
                self.links.pop(nxt, None)
                await self._to_head(error_frame(
                    frame.step_id, self.rt.name, self.data_addr,
                    f"stage {self.rt.name} could not reach the next stage at {nxt}: {e}",
                ))

    # -- load -------------------------------------------------------------------
    def load_report(self) -> LoadReport:
        """This replica's load, in the one report every replica publishes (stage='a:b')."""
        meter = self.meter
        prefill_rate, decode_rate = meter.rates(time.monotonic())
        total = self.rt.num_blocks
        free = total if self.kv_free is None else min(self.kv_free, total)
        return LoadReport(
            model=self.model_name,
            running=len(self.rt.known),
            waiting=self.inbox.qsize(),
            waiting_prompt_tokens=0,
            free_kv_blocks=free,
            total_kv_blocks=total,
            block_size=self.rt.runner.block_size if self.rt.runner else 0,
            max_num_seqs=0,
            max_num_batched_tokens=0,
            prefix_hit_rate=0.0,
            prompt_tokens_per_s=prefill_rate,
            generation_tokens_per_s=decode_rate,
            decode_step_s=meter.decode_step_s,
            prefill_token_s=meter.prefill_token_s,
            ready=self.ready,
            draining=self.draining,
            stage=self.rt.name,
        )

    def load_body(self) -> dict[str, Any]:
        """GET /load: the report plus the stage signals the autoscaler scales on."""
        busy = self.meter.busy_ratio(time.monotonic())
        body = self.load_report().to_dict()
        body.update(busy_ratio=busy, queued_frames=self.inbox.qsize(), steps=self.steps,
                    busy_s_total=self.meter.total_busy_s)
        return body

    async def drain(self) -> None:
        """Take no new sequences: tell the head, which pins nothing new here."""
        self.draining = True
        if self.head is not None:
            await self._to_head(control_frame(draining=True))


class _StageCollector(Collector):
    def __init__(self, worker: StageWorker) -> None:
        self.w = worker

    def collect(self):  # type: ignore[no-untyped-def]
        body = self.w.load_body()
        labels = ["model_name", "stage"]
        m = [self.w.model_name, self.w.rt.name]
        for name, doc, key in (
            ("strata_stage_busy_ratio", "Fraction of recent wall time spent computing (0-1).", "busy_ratio"),
            ("strata_stage_queued_steps", "Micro-batches waiting for this stage's compute.", "queued_frames"),
            ("strata_num_requests_running", "Sequences with KV on this stage replica.", "running"),
            ("strata_kv_cache_usage_ratio", "Fraction of KV blocks in use (head's view, 0-1).", "kv_usage"),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(m, float(body[key]))
            yield g
        c = CounterMetricFamily("strata_stage_tokens", "Tokens run through this stage's layers.", labels=labels)
        c.add_metric(m, self.w.meter.total_prompt_tokens + self.w.meter.total_generated_tokens)
        yield c


def build_worker_app(worker: StageWorker) -> FastAPI:
    """HTTP face of a stage replica: /health, /load, /info, /drain, /metrics."""
    app = FastAPI(title="strata stage", docs_url=None, redoc_url=None)
    registry = CollectorRegistry()
    registry.register(_StageCollector(worker))

    @app.get("/health")
    async def health() -> Response:
        if worker.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not worker.ready:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/info")
    async def info() -> dict[str, Any]:
        rt = worker.rt
        return {
            "model": worker.model_name,
            "layers": [rt.model.layer_start, rt.model.layer_end],
            "stage": rt.name,
            "is_tail": rt.is_tail,
            "data_addr": worker.data_addr,
            "dtype": str(rt.dtype).removeprefix("torch."),
            "max_kv_bytes": rt.max_kv_bytes,
        }

    @app.get("/load")
    async def load() -> dict[str, Any]:
        return worker.load_body()

    @app.post("/drain")
    async def drain(request: Request) -> Response:
        denied = admin_denial(request, worker.token)
        if denied is not None:
            return denied
        await worker.drain()
        return JSONResponse({"status": "draining", "unfinished": len(worker.rt.known)})

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return app
