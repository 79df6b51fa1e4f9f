"""The gateway routes a LoRA adapter's requests to the replicas that hold it (real engines)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx

from tests.engine.lora_adapters import make_adapter
from tests.engine.test_lora_server import lora_engine

from .servers import completion, gateway, wait_for


async def test_adapter_requests_go_to_the_replicas_holding_the_adapter(
        tiny_hf_dir: Path, tmp_path: Path) -> None:
    one = make_adapter(tiny_hf_dir, tmp_path / "one", seed=1)
    two = make_adapter(tiny_hf_dir, tmp_path / "two", seed=2, targets=("v_proj",), r=2)
    async with lora_engine(tiny_hf_dir, [f"one={one}"]) as ua, \
            lora_engine(tiny_hf_dir, []) as ub, gateway([ua, ub]) as (gw, client):
        await wait_for(lambda: all(r.models for r in gw.replicas.replicas.values()))
        base = (await client.get("/v1/models")).json()["data"][0]["id"]
        listed = {m["id"]: m.get("parent") for m in (await client.get("/v1/models")).json()["data"]}
        assert listed == {base: None, "one": base}

        async def replicas(model: str, n: int = 6) -> Counter:
            got: Counter = Counter()
            for _ in range(n):
                r = await client.post("/v1/completions", json=completion(model=model))
                assert r.status_code == 200, r.text
                got[r.headers["x-strata-replica"]] += 1
            return got

        assert set(await replicas("one")) == {ua}
        ghost = await client.post("/v1/completions", json=completion(model="ghost"))
        assert ghost.status_code == 404 and ghost.json()["error"]["param"] == "model"

        # Loaded at runtime on the second replica (loopback: no token configured), the
        # adapter is routed there once the gateway's next load poll sees it.
        async with httpx.AsyncClient(base_url=ub) as engine_b:
            r = await engine_b.post("/v1/load_lora_adapter",
                                    json={"lora_name": "two", "lora_path": str(two)})
            assert r.status_code == 200, r.text
        await wait_for(lambda: "two" in gw.replicas.replicas[ub].models)
        assert set(await replicas("two")) == {ub}
        assert set(await replicas("one")) == {ua}
