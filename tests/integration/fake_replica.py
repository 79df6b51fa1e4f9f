"""A replica process with the engine's control surface (/health, /load, /drain) and no model.

Used to test the local platform's process handling in a fraction of a second per start:
``python fake_replica.py --port P [--crash-file F] [--startup-s S] [--ignore-sigterm]
[--busy-ratio R]`` (R: report a stage replica's busy ratio on /load).
``POST /v1/completions`` with ``{"sleep_s": 2}`` holds a request that long; ``GET /env``
shows the thread variables the platform set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from strata.internal_auth import ENV_VAR, admin_denial, load_token
from strata.load import LoadReport

state: dict[str, Any] = {"running": 0, "draining": False, "busy_ratio": None}


async def health(request: Request) -> JSONResponse:
    if state["draining"]:
        return JSONResponse({"status": "draining"}, 503)
    return JSONResponse({"status": "ok"})


async def load(request: Request) -> JSONResponse:
    return JSONResponse(LoadReport(
        model="fake", running=int(state["running"]), waiting=0, waiting_prompt_tokens=0,
        free_kv_blocks=100 - int(state["running"]), total_kv_blocks=100, block_size=16,
        max_num_seqs=8, max_num_batched_tokens=512, prefix_hit_rate=0.0,
        prompt_tokens_per_s=0.0, generation_tokens_per_s=0.0, decode_step_s=0.0,
        prefill_token_s=0.0, draining=bool(state["draining"])).to_dict()
        # a stage replica's signals (strata.stages.worker), with --busy-ratio
        | ({"busy_ratio": state["busy_ratio"], "queued_frames": 0}
           if state["busy_ratio"] is not None else {}))


async def drain(request: Request) -> JSONResponse:
    # The engine's admin check, with the token the platform hands its children.
    denied = admin_denial(request, load_token(None, os.environ.get(ENV_VAR)))
    if denied is not None:
        return denied
    state["draining"] = True
    return JSONResponse({"status": "draining", "unfinished": state["running"]})


async def env(request: Request) -> JSONResponse:
    return JSONResponse({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
                        | {"pid": os.getpid()})


async def completions(request: Request) -> JSONResponse:
    if state["draining"]:
        return JSONResponse({"error": {"message": "draining", "type": "server_error",
                                       "param": None, "code": 503}}, 503)
    body = await request.json()
    state["running"] += 1
    try:
        await asyncio.sleep(float(body.get("sleep_s", 0)))
    finally:
        state["running"] -= 1
    return JSONResponse({"id": "x", "object": "text_completion", "pid": os.getpid(),
                         "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]})


class _NoSignalHandlers(uvicorn.Server):
    """uvicorn that leaves SIGTERM ignored (a replica that will not stop politely)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--crash-file", type=Path)
    p.add_argument("--startup-s", type=float, default=0.0)
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--busy-ratio", type=float, help="report a stage replica's busy ratio")
    args = p.parse_args()
    state["busy_ratio"] = args.busy_ratio
    if args.crash_file is not None and args.crash_file.exists():
        args.crash_file.unlink()
        print("crashing on purpose", flush=True)
        sys.exit(3)
    time.sleep(args.startup_s)
    app = Starlette(routes=[Route("/health", health), Route("/load", load),
                            Route("/drain", drain, methods=["POST"]), Route("/env", env),
                            Route("/v1/completions", completions, methods=["POST"])])
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server: uvicorn.Server = _NoSignalHandlers(config)
    else:
        server = uvicorn.Server(config)
    server.run()


if __name__ == "__main__":
    main()
