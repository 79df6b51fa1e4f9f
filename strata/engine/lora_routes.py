"""The LoRA endpoints of an engine: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter.

They read files from the replica's disk, so they are admin endpoints: with a cluster token
they want it in the ``x-strata-internal-token`` header, without one they answer loopback
clients only (`strata.internal_auth`). vLLM opens them with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``; strata ties them to the token every admin endpoint
already needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from strata.engine.core import EngineCore
from strata.engine.lora import LoraError, read_adapter
from strata.internal_auth import admin_denial
from strata.protocol import ModelCard, error_body

_TYPES = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError"}


def lora_cards(core: EngineCore, base: str) -> list[dict[str, Any]]:
    """/v1/models entries of the loaded adapters: ``parent`` is the base model, as vLLM has it."""
    loras = getattr(core.runner, "loras", None)
    if loras is None:
        return []
    return [ModelCard(id=lo.name, root=str(lo.path), parent=base,
                      max_model_len=core.config.max_model_len).model_dump()
            for lo in loras.loaded()]


def _error(e: LoraError) -> JSONResponse:
    param = "lora_path" if e.status == 400 else "lora_name"
    return JSONResponse(error_body(str(e), _TYPES.get(e.status, "BadRequestError"), param, e.status),
                        e.status)


def _field(data: Any, name: str) -> str:
    if not isinstance(data, dict):
        raise LoraError("the body must be a JSON object with 'lora_name' (and 'lora_path')")
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise LoraError(f"'{name}' must be a non-empty string")
    return value


def add_lora_routes(app: FastAPI, core: EngineCore,
                    read_json: Callable[[Request], Awaitable[dict[str, Any]]],
                    internal_token: str | None) -> None:
    """Add the load and unload endpoints to an engine whose runner holds LoRA slots."""
    loras = core.runner.loras
    assert loras is not None

    async def admin(request: Request, action: Callable[[Any], Awaitable[str]]) -> Response:
        """Run ``action`` on the JSON body of an authorised request; its message, or the error."""
        denied = admin_denial(request, internal_token)
        if denied is not None:
            return denied
        data = await read_json(request)
        try:
            return PlainTextResponse(await action(data))
        except LoraError as e:
            return _error(e)

    async def load(data: Any) -> str:
        name, path = _field(data, "lora_name"), _field(data, "lora_path")
        if name == core.model_name:
            raise LoraError(f"'{name}' is the base model's name; choose another lora_name")
        if loras.resolve(name) is not None:
            raise LoraError(f"The lora adapter '{name}' has already been loaded.")
        # Reading and copying take a while: off the event loop, never in the engine thread.
        weights = await asyncio.to_thread(read_adapter, name, path, core.runner.model.config,
                                          loras.max_rank)
        await asyncio.to_thread(loras.load, weights)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(data: Any) -> str:
        name = _field(data, "lora_name")
        loras.unload(name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request) -> Response:
        return await admin(request, load)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request) -> Response:
        return await admin(request, unload)
