"""The LoRA API of one engine over real HTTP: /v1/models, requests by adapter, load/unload."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from strata.engine.engine import AsyncEngine, EngineConfig, build_engine_core
from strata.engine.server import build_app
from strata.internal_auth import HEADER
from tests.engine.lora_adapters import make_adapter
from tests.gateway.servers import serve

TOKEN = "lora-test-token"


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-loras")
    return {"one": make_adapter(tiny_hf_dir, root / "one", seed=1),
            "two": make_adapter(tiny_hf_dir, root / "two", seed=2, targets=("q_proj", "v_proj"))}


@asynccontextmanager
async def lora_engine(model: Path, modules: list[str], token: str | None = None,
                      max_loras: int = 2) -> AsyncIterator[str]:
    """A real engine with LoRA enabled serving HTTP on loopback; yields its base URL."""
    core = build_engine_core(EngineConfig(
        model=str(model), dtype="float32", device="cpu", threads=1, num_kv_blocks=64,
        block_size=16, max_model_len=256, max_num_seqs=8, enable_lora=True, max_loras=max_loras,
        max_lora_rank=8, lora_modules=modules))
    engine = AsyncEngine(core)
    engine.start()
    try:
        async with serve(build_app(engine, internal_token=token), lifespan="off") as url:
            yield url
    finally:
        engine.stop()


def _completion(model: str) -> dict:
    return {"model": model, "prompt": "hello there", "max_tokens": 4, "temperature": 0}


async def test_models_requests_and_runtime_loading(tiny_hf_dir: Path,
                                                   tiny_adapters: dict[str, Path]) -> None:
    async with lora_engine(tiny_hf_dir, [f"one={tiny_adapters['one']}"], token=TOKEN) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as c:
        cards = (await c.get("/v1/models")).json()["data"]
        base = cards[0]["id"]
        assert [(m["id"], m.get("parent")) for m in cards] == [(base, None), ("one", base)]
        texts = {}
        for model in (base, "one"):
            r = await c.post("/v1/completions", json=_completion(model))
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model  # vLLM answers with the adapter's name
            texts[model] = r.json()["choices"][0]["text"]
        missing = await c.post("/v1/completions", json=_completion("two"))
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"

        body = {"lora_name": "two", "lora_path": str(tiny_adapters["two"])}
        assert (await c.post("/v1/load_lora_adapter", json=body)).status_code == 401
        auth = {HEADER: TOKEN}
        bad = await c.post("/v1/load_lora_adapter", headers=auth,
                           json={"lora_name": "two", "lora_path": str(tiny_hf_dir / "nope")})
        assert bad.status_code == 400 and "not a directory" in bad.json()["error"]["message"]
        ok = await c.post("/v1/load_lora_adapter", headers=auth, json=body)
        assert ok.status_code == 200, ok.text
        again = await c.post("/v1/load_lora_adapter", headers=auth, json=body)
        assert again.status_code == 400 and "already been loaded" in again.text
        full = await c.post("/v1/load_lora_adapter", headers=auth,
                            json={"lora_name": "three", "lora_path": str(tiny_adapters["one"])})
        assert full.status_code == 400 and "--max-loras" in full.text
        assert "two" in {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
        assert (await c.get("/load")).json()["lora_adapters"] == ["one", "two"]
        r = await c.post("/v1/chat/completions", json={
            "model": "two", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text

        assert (await c.post("/v1/unload_lora_adapter", json={"lora_name": "two"})).status_code == 401
        gone = await c.post("/v1/unload_lora_adapter", headers=auth, json={"lora_name": "ghost"})
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "NotFoundError"
        ok = await c.post("/v1/unload_lora_adapter", headers=auth, json={"lora_name": "two"})
        assert ok.status_code == 200, ok.text
        assert (await c.post("/v1/completions", json=_completion("two"))).status_code == 404
        # The unloaded slot is free again; the still-loaded adapter answers as before.
        r = await c.post("/v1/completions", json=_completion("one"))
        assert r.json()["choices"][0]["text"] == texts["one"]


async def test_without_lora_the_endpoints_do_not_exist(tiny_hf_dir: Path) -> None:
    from tests.engine.test_metrics import serve_engine

    async with serve_engine(tiny_hf_dir) as (url, _), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/"})
        assert r.status_code == 404
