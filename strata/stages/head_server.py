"""Build the head stage (model part, KV namespace, engine) and its HTTP face.

The head serves the same OpenAI API as an engine (the engine's own app, unchanged),
plus `/stages` to see and change the downstream replica sets: replicas join with
`POST /stages/replicas` (a stage started with `--join` does it itself) and leave
with `POST /stages/replicas/drain` (or their own `POST /drain`). Those two, like
`/drain`, are admin endpoints: they want the cluster's internal token
(`strata.internal_auth`), or a loopback client when the head runs without one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import torch
from fastapi import FastAPI, Request
from pydantic import Field, model_validator

from strata.engine.engine import default_model_name, pick_device, pick_dtype
from strata.engine.options import EngineConfig
from strata.engine.runner import ModelRunner, kv_bytes_per_block
from strata.engine.scheduler import SchedulerConfig
from strata.engine.tokenizer import load_tokenizer
from strata.engine.weights import load_config, resolve_model
from strata.internal_auth import admin_denial
from strata.protocol import OpenAIError
from strata.stages.head import HeadCore
from strata.stages.head_engine import HeadEngine
from strata.stages.plan import check_split
from strata.stages.runtime import load_stage_model

log = logging.getLogger("strata.stages.head")


class HeadConfig(EngineConfig):
    """How to build the head stage of a pipeline: the engine's options plus the split.

    ``kv_cache`` sizes the head's own layers and so sets the pipeline's block count.
    """

    stages: tuple[tuple[int, int], ...]  # the whole split, the head's range first
    max_inflight: int | None = None  # micro-batches in flight per path; None: one per stage
    step_timeout_s: float = 60.0
    replicas: tuple[str, ...] = ()  # downstream replica URLs to connect at start
    internal_token: str | None = Field(default=None, repr=False)  # never in logs or reprs

    @model_validator(mode="after")
    def _head_kv(self) -> HeadConfig:
        if self.kv_cache_dtype != "auto":
            raise ValueError("kv_cache_dtype: a pipeline keeps its KV cache in the model's "
                             "dtype; leave it auto")
        return self


def build_head(cfg: HeadConfig) -> HeadEngine:
    """Load the head's layers (with the embedding), size the KV namespace, build the engine."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    path = resolve_model(cfg.model, cache_dir=cfg.cache_dir)
    config = load_config(path)
    stages = list(cfg.stages)
    check_split(stages, config.num_hidden_layers)
    start, end = stages[0]
    model = load_stage_model(path, config, start, end, True, dtype, device)
    tokenizer = load_tokenizer(path, cache_dir=cfg.cache_dir)
    per_block = kv_bytes_per_block(model, cfg.block_size, dtype)
    num_blocks = cfg.kv_blocks(per_block)
    max_len = min(cfg.max_model_len or config.max_position_embeddings,
                  config.max_position_embeddings)
    runner = ModelRunner(model, num_blocks, cfg.block_size, dtype, device)
    name = cfg.served_model_name or default_model_name(path)
    sched = SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, max_len)
    inflight = cfg.max_inflight or len(stages)
    core = HeadCore(runner, tokenizer, sched, name, cfg.prefix_caching,
                    stages[1:], inflight, cfg.step_timeout_s)
    log.info("head stage %d:%d of %s: %s on %s, %d threads, %d KV blocks of %d tokens, "
             "%d micro-batches in flight per path", start, end, name, dtype, device,
             torch.get_num_threads(), num_blocks, cfg.block_size, inflight)
    return HeadEngine(core, cfg.internal_token)


def connect_initial(engine: HeadEngine, urls: tuple[str, ...], timeout_s: float = 600.0) -> threading.Thread:
    """Connect the replicas named at start-up, retrying while they load (background thread)."""

    def run() -> None:
        pending = list(urls)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for url in list(pending):
                try:
                    engine.add_replica(url).result(timeout=90)
                    pending.remove(url)
                except Exception as e:  # noqa: BLE001 - retried until the deadline, then logged
                    log.debug("replica %s not ready yet: %s", url, e)
            if pending:
                time.sleep(1.0)
        for url in pending:
            log.error("could not connect stage replica %s within %.0f s", url, timeout_s)

    t = threading.Thread(target=run, name="strata-stage-connect", daemon=True)
    t.start()
    return t


def build_head_app(engine: HeadEngine) -> FastAPI:
    """The engine's OpenAI app plus the /stages routes."""
    from strata.engine.server import build_app

    core = engine.core
    token = engine.net.token
    app = build_app(engine, ready=core.pipeline_ready, internal_token=token)

    @app.get("/stages")
    async def stages() -> dict[str, Any]:
        views = core.replica_views()
        out = []
        for i in range(len(core.replicas.stages)):
            name = core.replicas.name(i)
            out.append({
                "layers": name,
                "replicas": [
                    {"addr": v.addr, "url": v.url, "state": v.state, "pinned": v.pinned,
                     "inflight": v.inflight, "used_kv_blocks": v.used_kv_blocks, "steps": v.steps}
                    for v in views if v.stage == name
                ],
            })
        return {
            "head": {"layers": core.stage_name, "max_inflight": core.max_inflight,
                     "kv_blocks": core.runner.num_blocks, "timing": core.timing_summary(),
                     "timing_totals": dict(core.timing_totals)},
            "stages": out,
        }

    async def _url(request: Request) -> str:
        try:
            body = await request.json()
        except ValueError as e:
            raise OpenAIError(f"invalid JSON body: {e}") from e
        url = body.get("url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url.startswith("http"):
            raise OpenAIError("send {\"url\": \"http://host:port\"} of a stage replica", param="url")
        return url.rstrip("/")

    @app.post("/stages/replicas")
    async def add(request: Request) -> Any:
        denied = admin_denial(request, token)
        if denied is not None:
            return denied
        url = await _url(request)
        try:
            info = await asyncio.wrap_future(engine.add_replica(url))
        except ValueError as e:
            raise OpenAIError(str(e), param="url") from e
        except Exception as e:  # noqa: BLE001 - unreachable replica: a 502 naming it
            raise OpenAIError(f"could not connect {url}: {e}", 502, "BadGateway", "url") from e
        return {"status": "joined", "stage": f"{info['layers'][0]}:{info['layers'][1]}",
                "addr": info["data_addr"]}

    @app.post("/stages/replicas/drain")
    async def drain(request: Request) -> Any:
        denied = admin_denial(request, token)
        if denied is not None:
            return denied
        url = await _url(request)
        for v in core.replica_views():
            if v.url == url:
                engine.remove_replica(v.addr)
                return {"status": "draining", "addr": v.addr, "pinned": v.pinned}
        raise OpenAIError(f"no stage replica has url {url}", 404, "NotFoundError", "url")

    return app
