"""The `strata` command line: one Typer app for every service and tool."""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup


class _LazyGroup(TyperGroup):
    """Loads the heavier sub-commands (bench pulls in matplotlib) only when they are used,
    so `strata engine`, which the platform starts for every replica, starts fast."""

    lazy = {
        "bench": ("strata.bench.cli", "app"),
        "gateway": ("strata.gateway.cli", "gateway_command"),
        "stage": ("strata.stages.cli", "stage_command"),
        "simulate": ("strata.sim.cli", "app"),
        "deploy": ("strata.deploy.cli", "app"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        module, attr = self.lazy[name]
        obj = getattr(importlib.import_module(module), attr)
        if isinstance(obj, typer.Typer):
            cmd = typer.main.get_command(obj)
        else:
            sub = typer.Typer(add_completion=False)
            sub.command(name=name)(obj)
            cmd = typer.main.get_command(sub)
        cmd.name = name
        return cmd


app = typer.Typer(
    cls=_LazyGroup,
    name="strata",
    help="Cloud-native LLM inference serving: engines, gateway, stages, autoscaling, benchmarks.",
    no_args_is_help=True,
    add_completion=False,
)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _cache_dir() -> Path | None:
    """The model cache: STRATA_CACHE_DIR if set (read here, at the edge, only)."""
    value = os.environ.get("STRATA_CACHE_DIR")
    return Path(value) if value else None


def _internal_token(path: Path | None) -> str | None:
    """The cluster's internal token: the file, else STRATA_INTERNAL_TOKEN (read here, at the edge)."""
    from strata.internal_auth import ENV_VAR, load_token

    try:
        return load_token(path, os.environ.get(ENV_VAR))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--internal-token-file") from e


def _cli_type(annotation: Any) -> Any:
    """The type a CLI option of this field parses (choices and sizes stay text: the model
    validates them, with its own messages)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return annotation  # a repeatable flag
    if typing.get_origin(annotation) is typing.Literal or str in args:
        return str
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return typing.Optional[inner]  # noqa: UP045 - typer reads Optional, not X | None
    return annotation


def _with_engine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one CLI option per ``EngineOptions`` field (its name, type, default and description)
    to a command, which gets them as ``options=EngineOptions(...)``: the flags are declared
    once, in the model the cluster file also uses."""
    from pydantic import ValidationError

    from strata.engine.options import EngineOptions, option_errors

    own = list(inspect.signature(command, eval_str=True).parameters.values())
    fields = EngineOptions.model_fields
    generated = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                          annotation=Annotated[_cli_type(field.annotation),
                                               typer.Option(help=field.description)])
        for name, field in fields.items()
    ]
    at = next((i for i, p in enumerate(own) if p.name == "options"), None)
    if at is None:
        raise TypeError(f"{command.__name__} must take an `options` parameter")
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    params[at:at + 1] = generated

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        try:
            options = EngineOptions(**{name: kwargs.pop(name) for name in fields})
        except ValidationError as e:
            raise typer.BadParameter(option_errors(e)) from None
        return command(options=options, **kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


ModelOpt = Annotated[
    str | None,
    typer.Option(help="Model: a .gguf file, a Hugging Face directory, or gemma3-270m (fetched); default: bundled SmolLM2-135M-Instruct."),
]


@app.command()
@_with_engine_options
def engine(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="Model name the API reports.")] = None,
    options: Any = None,  # one flag per EngineOptions field (strata.engine.options)
    internal_token_file: Annotated[Path | None, typer.Option(help="File holding the cluster's internal token, which admin endpoints (/drain) require; default: $STRATA_INTERNAL_TOKEN, else loopback clients only.")] = None,
    max_body_bytes: Annotated[str, typer.Option(help="Largest request body (413 beyond, counted while reading).")] = "8MiB",
    max_seqs_per_request: Annotated[int, typer.Option(help="Most sequences one request may create (prompts x n; 400 beyond).")] = 256,
    drain_timeout_s: Annotated[float, typer.Option(help="On SIGTERM (or from POST /drain): how long in-flight requests get before they are ended with a 503; at least the longest request you allow.")] = 120.0,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Serve one model replica over the OpenAI API (plus /health, /metrics, /load)."""
    import uvicorn

    from strata.engine.engine import AsyncEngine, build_engine_core
    from strata.engine.options import EngineConfig, parse_bytes
    from strata.engine.server import Drainer, build_app
    from strata.engine.tool_calls import ToolConfig
    from strata.protocol import RequestLimits

    _setup_logging(log_level)
    cfg = EngineConfig(**options.model_dump(), model=model,
                       served_model_name=served_model_name, cache_dir=_cache_dir())
    try:
        limits = RequestLimits(max_body_bytes=parse_bytes(max_body_bytes),
                               max_seqs_per_request=max_seqs_per_request)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    token = _internal_token(internal_token_file)
    core = build_engine_core(cfg)
    eng = AsyncEngine(core)
    try:
        drainer = Drainer(eng, drain_timeout_s)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--drain-timeout-s") from e
    try:
        tools = ToolConfig.from_options(cfg.tool_call_parser, cfg.enable_auto_tool_choice,
                                        cfg.chat_template)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"cannot read the chat template: {e}",
                                 param_hint="--chat-template") from e
    app = build_app(eng, limits=limits, internal_token=token, drainer=drainer, tools=tools)
    _serve_engine(eng, uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                      timeout_graceful_shutdown=5), drainer)


def _serve_engine(eng: Any, config: Any, drainer: Any = None) -> None:
    """HTTP in a second thread, the engine loop in this (main) thread; SIGINT/SIGTERM stop both.

    The engine loop stays in the thread that built the model so that only one OpenMP worker
    pool exists (see `AsyncEngine.run`). With a ``drainer`` the first signal is a graceful
    stop: new requests get 503 + Retry-After, in-flight ones finish within its timeout (the
    rest are ended with an error), then the process exits 0; a second signal stops at once.
    """
    import signal
    import threading

    import uvicorn

    server = uvicorn.Server(config)
    failed: list[BaseException] = []

    def serve_http() -> None:
        try:
            server.run()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            failed.append(e)
        finally:
            eng.stop()  # the HTTP side ended (shutdown or bind error): end the loop too

    draining: list[threading.Thread] = []

    def drain_then_exit() -> None:
        drainer.run()
        server.should_exit = True  # uvicorn flushes the last responses, then the loop ends

    def on_signal(_signum: int, _frame: Any) -> None:
        if drainer is not None and not draining and server.started:
            logging.getLogger("strata.server").warning(
                "signal received: draining (up to %g s)", drainer.timeout_s)
            draining.append(threading.Thread(target=drain_then_exit, name="strata-drain", daemon=True))
            draining[0].start()
            return
        server.should_exit = True
        eng.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    http = threading.Thread(target=serve_http, name="strata-http", daemon=True)
    http.start()
    eng.run()
    if eng.dead is not None and not server.should_exit:
        # The loop died: keep answering /health (503) and errors until we are told to stop.
        while http.is_alive():
            http.join(timeout=1.0)
    server.should_exit = True
    http.join(timeout=15)
    if failed:
        raise failed[0]
    if not server.started:
        raise typer.Exit(1)


@app.command()
def serve(
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Cluster file (YAML); default: built-in defaults.")
    ] = None,
    model: ModelOpt = None,
    host: Annotated[str | None, typer.Option(help="Gateway bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Gateway port (default 8000).")] = None,
) -> None:
    """Run the local cluster: gateway, engine replicas and autoscaler (the embedded default)."""
    from strata.cluster import serve_cluster
    from strata.config import ClusterConfigError

    try:
        serve_cluster(file, host=host, port=port, model=model)
    except ClusterConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e


@app.command()
def controller(
    file: Annotated[
        Path, typer.Option("--file", "-f", help="Cluster file (YAML) with platform.kind: kubernetes.")
    ],
    gateway_url: Annotated[
        str | None,
        typer.Option(help="The gateway's URL, read for tier signals (arrivals, queue, TTFT) when prometheus.url is unset."),
    ] = None,
    internal_token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the cluster's internal token, sent with POST /drain; default: $STRATA_INTERNAL_TOKEN."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve the autoscaler's Prometheus series on /metrics at this port; default: not served."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the autoscaler in-cluster against each tier's Kubernetes Deployment (no gateway)."""
    from strata.config import ClusterConfigError, load_cluster_config
    from strata.platform.controller import serve_controller

    _setup_logging(log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /load read otherwise
    try:
        config = load_cluster_config(file)
    except ClusterConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if config.platform.kind != "kubernetes":
        typer.echo("error: platform.kind must be kubernetes for strata controller "
                   "(strata serve runs local replicas)", err=True)
        raise typer.Exit(2)
    serve_controller(config, gateway_url=gateway_url,
                     internal_token=_internal_token(internal_token_file), metrics_port=metrics_port)


@app.command()
def status(
    url: Annotated[str, typer.Option(help="The cluster's gateway URL.")] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="STRATA_API_KEY", help="API key if the gateway needs one.")
    ] = None,
) -> None:
    """Print tiers, replicas, their load and the last scaling decisions of a running cluster."""
    from strata.cluster import print_status

    raise typer.Exit(print_status(url, api_key))


if __name__ == "__main__":
    app()
