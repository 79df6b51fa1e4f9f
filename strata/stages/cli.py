"""`strata stage`: run one layer-range stage of a model as a service.

`--layers 0:b` starts the head (OpenAI API, scheduler, embedding, layers [0, b));
any other range starts a downstream stage that holds only those layers and their KV
cache (the last one also the final norm, the LM head and sampling).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger("strata.stages")


def stage_command(
    layers: Annotated[str, typer.Option(help="Layer range a:b this stage holds; 0:b is the head.")],
    model: Annotated[str | None, typer.Option(help="Model: a .gguf file or HF directory; default: bundled SmolLM2-135M-Instruct.")] = None,
    host: Annotated[str, typer.Option(help="Bind address (HTTP and frames).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (OpenAI API on the head; /health, /load, /info on stages).")] = 8000,
    data_port: Annotated[int, typer.Option(help="Downstream stages: TCP port for hidden-state frames; 0: any free port (reported at /info).")] = 0,
    stages: Annotated[str | None, typer.Option(help="Head: the whole split, e.g. 0:10,10:20,20:30; default: --layers and the rest.")] = None,
    replica: Annotated[list[str] | None, typer.Option(help="Head: URL of a downstream stage replica to connect (repeat).")] = None,
    join: Annotated[str | None, typer.Option(help="Downstream stage: the head's URL to register with (and re-register after it restarts).")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model name the API reports (head).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16; use the same on every stage.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="Torch threads; default: all cores.")] = None,
    kv_cache: Annotated[str | None, typer.Option(help="Head: KV bytes of its layers (sets the pipeline's block count; default 1GiB). Stage: the most KV bytes it accepts (default: what the head asks).")] = None,
    num_kv_blocks: Annotated[int | None, typer.Option(help="Head: KV blocks of the pipeline (overrides --kv-cache).")] = None,
    block_size: Annotated[int, typer.Option(help="Head: tokens per KV block.")] = 16,
    max_num_seqs: Annotated[int, typer.Option(help="Head: max sequences running.")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Head: token budget per micro-batch.")] = 2048,
    max_model_len: Annotated[int | None, typer.Option(help="Head: context length cap.")] = None,
    no_prefix_caching: Annotated[bool, typer.Option(help="Head: disable automatic prefix caching.")] = False,
    max_inflight: Annotated[int | None, typer.Option(help="Head: micro-batches in flight per pipeline path; default: the number of stages.")] = None,
    step_timeout: Annotated[float, typer.Option(help="Head: seconds a micro-batch may take before its sequences fail.")] = 60.0,
    internal_token_file: Annotated[Path | None, typer.Option(help="File holding the cluster's internal token (frame links and admin endpoints need it); default: $STRATA_INTERNAL_TOKEN, else loopback peers only.")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Serve one layer-range stage of a model (the head serves the OpenAI API)."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cache = os.environ.get("STRATA_CACHE_DIR")
    cache_dir = Path(cache) if cache else None
    from strata.internal_auth import ENV_VAR, load_token
    from strata.stages.plan import parse_layers

    try:
        token = load_token(internal_token_file, os.environ.get(ENV_VAR))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--internal-token-file") from e
    if token is None:
        log.warning("no internal token: frame links and admin endpoints accept loopback peers only")

    start, end = parse_layers(layers)
    if start == 0:
        _run_head(
            layers=(start, end), stages=stages, model=model, host=host, port=port,
            replicas=tuple(replica or ()), served_model_name=served_model_name, dtype=dtype,
            device=device, threads=threads, kv_cache=kv_cache, num_kv_blocks=num_kv_blocks,
            block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            prefix_caching=not no_prefix_caching, max_inflight=max_inflight,
            step_timeout=step_timeout, cache_dir=cache_dir, token=token,
        )
        return
    if stages or replica:
        raise typer.BadParameter("--stages and --replica belong to the head (--layers 0:b)")
    _run_stage(layers, model, host, port, data_port, join, dtype, device, threads, kv_cache,
               cache_dir, token)


def _run_head(
    *, layers: tuple[int, int], stages: str | None, model: str | None, host: str, port: int,
    replicas: tuple[str, ...], served_model_name: str | None, dtype: str, device: str,
    threads: int | None, kv_cache: str | None, num_kv_blocks: int | None, block_size: int,
    max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int | None,
    prefix_caching: bool, max_inflight: int | None, step_timeout: float, cache_dir: Path | None,
    token: str | None,
) -> None:
    import uvicorn
    from pydantic import ValidationError

    from strata.engine.options import option_errors
    from strata.engine.weights import load_config, resolve_model
    from strata.stages.head_server import HeadConfig, build_head, build_head_app, connect_initial
    from strata.stages.plan import parse_stages

    if stages:
        split = parse_stages(stages)
        if split[0] != layers:
            raise typer.BadParameter(f"--stages must begin with the head's --layers {layers[0]}:{layers[1]}")
    else:
        n = load_config(resolve_model(model, cache_dir=cache_dir)).num_hidden_layers
        split = (layers, (layers[1], n))
    sized = {"kv_cache": kv_cache} if kv_cache is not None else {}  # None: the default
    try:
        cfg = HeadConfig(
            stages=split, model=model, served_model_name=served_model_name, dtype=dtype,
            device=device, threads=threads, block_size=block_size, **sized,
            num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            prefix_caching=prefix_caching, max_inflight=max_inflight,
            step_timeout_s=step_timeout, replicas=replicas, cache_dir=cache_dir,
            internal_token=token,
        )
    except ValidationError as e:
        raise typer.BadParameter(option_errors(e)) from None
    engine = build_head(cfg)
    engine.start()
    connect_initial(engine, replicas)
    try:
        uvicorn.run(build_head_app(engine), host=host, port=port, log_level="warning",
                    access_log=False)
    finally:
        engine.stop()


def _run_stage(
    layers: str, model: str | None, host: str, port: int, data_port: int, join: str | None,
    dtype: str, device: str, threads: int | None, kv_cache: str | None, cache_dir: Path | None,
    token: str | None,
) -> None:
    import torch
    import uvicorn

    from strata.engine.engine import default_model_name, pick_device, pick_dtype
    from strata.engine.options import parse_bytes
    from strata.engine.weights import resolve_model
    from strata.stages.runtime import build_runtime
    from strata.stages.worker import StageWorker, build_worker_app

    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    path = resolve_model(model, cache_dir=cache_dir)
    cap = parse_bytes(kv_cache) if kv_cache else 1 << 62
    rt = build_runtime(path, layers, dt, dev, cap)
    log.info("stage %s of %s: %s on %s, %d threads", rt.name, path.name, dt, dev,
             torch.get_num_threads())

    async def main() -> None:
        worker = StageWorker(rt, default_model_name(path), host, data_port,
                             f"http://{host}:{port}", join=join.rstrip("/") if join else None,
                             token=token)
        await worker.start()
        server = uvicorn.Server(uvicorn.Config(build_worker_app(worker), host=host, port=port,
                                               log_level="warning", access_log=False))
        try:
            await server.serve()
        finally:
            await worker.stop()

    asyncio.run(main())


def main() -> None:
    """`python -m strata.stages.cli`: the same command without the root app."""
    typer.run(stage_command)


if __name__ == "__main__":
    main()
