"""``strata gateway``: run the OpenAI-compatible gateway in front of replicas.

The root CLI mounts ``gateway_command``; ``python -m strata.gateway.cli`` runs it alone.
Secrets come from the environment or a file, never from flags that show up in ``ps``:
``STRATA_API_KEYS`` (comma-separated client keys), ``STRATA_UPSTREAM_API_KEY`` and the
cluster's internal token (``--internal-token-file`` or ``STRATA_INTERNAL_TOKEN``), which the
replicas' prefix reports want.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn

from strata.gateway.app import Gateway, GatewayConfig, create_app
from strata.gateway.auth import ApiKeys
from strata.gateway.proxy import ProxyConfig
from strata.gateway.ratelimit import Limits
from strata.gateway.replica_record import ReplicaSetConfig
from strata.gateway.tiers import TierRoute
from strata.internal_auth import ENV_VAR as INTERNAL_TOKEN_ENV
from strata.internal_auth import load_token
from strata.routing.prompt import PromptEstimator
from strata.routing.registry import DEFAULT_POLICY, make_policy, policy_names


def parse_policy_params(items: list[str]) -> dict[str, Any]:
    """``["load_factor=1.5", "key_chunks=3"]`` -> typed keyword arguments."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--policy-param {item!r} must look like name=value")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def parse_tier_models(items: list[str]) -> tuple[TierRoute, ...]:
    """``["chat=smol", "code=coder"]`` -> one TierRoute per tier, in order."""
    routes: dict[str, list[str]] = {}
    for item in items:
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise typer.BadParameter(f"--tier-model {item!r} must look like tier=model")
        routes.setdefault(name, []).append(model)
    return tuple(TierRoute(name, tuple(models)) for name, models in routes.items())


def gateway_command(
    replica: Annotated[list[str], typer.Option(
        "--replica", "-r", help="Replica base URL (repeat for several).")] = [],  # noqa: B006
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    policy: Annotated[str, typer.Option(
        help=f"Routing policy: {', '.join(policy_names())}.")] = DEFAULT_POLICY,
    policy_param: Annotated[list[str], typer.Option(
        help="Policy parameter name=value (repeatable), e.g. load_factor=1.5.")] = [],  # noqa: B006
    tier: Annotated[str, typer.Option(help="Tier label of these replicas.")] = "engine",
    tier_model: Annotated[list[str], typer.Option(
        help="tier=model (repeatable): several tiers behind one gateway, each serving its "
             "model; requests are routed by model. With --endpoints-from kubernetes each "
             "tier follows its own Service (--kube-service with {tier}).")] = [],  # noqa: B006
    poll_interval_s: Annotated[float, typer.Option(help="Load polling period.")] = 0.2,
    health_interval_s: Annotated[float, typer.Option(help="Health check period.")] = 1.0,
    connect_timeout_s: Annotated[float, typer.Option(help="Upstream connect timeout.")] = 3.0,
    read_timeout_s: Annotated[float, typer.Option(
        help="Upstream silence (first token included) after which the replica's probes "
             "decide: the request fails only if the replica stopped answering them.")] = 300.0,
    request_timeout_s: Annotated[float | None, typer.Option(
        help="Hard cap on one request's duration (504 past it); unset: none.")] = None,
    drain_timeout_s: Annotated[float, typer.Option(
        help="On SIGTERM: how long in-flight requests get to finish before they are ended "
             "(make it at least the longest request you allow).")] = 120.0,
    served_model_name: Annotated[list[str], typer.Option(
        help="Model name(s) the replicas serve, listed on /v1/models before any replica "
             "is ready (repeatable).")] = [],  # noqa: B006
    max_pending_requests: Annotated[int, typer.Option(
        help="Generation requests held at once; beyond, 503 + Retry-After.")] = 8192,
    max_retries: Annotated[int, typer.Option(
        help="Other replicas to try when one fails before its first token.")] = 2,
    eject_after_failures: Annotated[int, typer.Option(
        help="Consecutive failures that take a replica out.")] = 3,
    api_keys_file: Annotated[Path | None, typer.Option(
        help="File of client API keys (see strata.gateway.auth); also STRATA_API_KEYS.",
        exists=True, dir_okay=False)] = None,
    rate_limit_rpm: Annotated[int, typer.Option(
        help="Default requests/min per key (per client address without keys); 0: off.")] = 0,
    rate_limit_tpm: Annotated[int, typer.Option(
        help="Default tokens/min (prompt estimate + max_tokens); 0: off.")] = 0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 8 << 20,
    max_in_flight_per_model: Annotated[int | None, typer.Option(
        help="Requests proxied at once per model; unset: no limit.")] = None,
    max_queued_per_model: Annotated[int, typer.Option(
        help="Requests waiting per model before 503.")] = 1024,
    queue_timeout_s: Annotated[float, typer.Option(help="Longest wait for a slot.")] = 30.0,
    hold_timeout_s: Annotated[float, typer.Option(
        help="Longest wait for a ready replica (scale from zero).")] = 30.0,
    bytes_per_token: Annotated[float, typer.Option(
        help="Prompt bytes per token for routing estimates.")] = 4.0,
    prefix_chunk_tokens: Annotated[int, typer.Option(
        help="Tokens per prefix-hash chunk.")] = 64,
    replica_header: Annotated[bool, typer.Option(
        help="Name the serving replica in an x-strata-replica response header.")] = True,
    endpoints_from: Annotated[str, typer.Option(
        help="static: the --replica URLs; kubernetes: the ready endpoints of --kube-service's "
             "EndpointSlices, watched in-cluster.")] = "static",
    kube_namespace: Annotated[str, typer.Option(help="Namespace of --kube-service.")] = "default",
    kube_service: Annotated[str, typer.Option(
        help="Service whose EndpointSlices list the replicas; {tier} is replaced.")]
        = "strata-{tier}",
    kube_api_server: Annotated[str | None, typer.Option(
        help="API server URL without credentials (kubectl proxy); default: in-cluster.")]
        = None,
    internal_token_file: Annotated[Path | None, typer.Option(
        help="File holding the cluster's internal token, which the replicas' prefix reports "
             "(/internal/prefix) want; default: $STRATA_INTERNAL_TOKEN, else none (loopback "
             "replicas only).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "warning",
) -> None:
    """Serve the OpenAI API, routing each request to the replica that fits it best."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    params = parse_policy_params(policy_param)
    try:
        make_policy(policy, **params)
        keys = ApiKeys.load(api_keys_file, os.environ.get("STRATA_API_KEYS"))
        internal_token = load_token(internal_token_file, os.environ.get(INTERNAL_TOKEN_ENV))
        tiers = parse_tier_models(tier_model)
        if tiers and replica:
            raise ValueError("--replica goes with one tier; with --tier-model the replicas "
                             "come from --endpoints-from kubernetes")
        config = GatewayConfig(
            tiers=tiers,
            replicas=tuple(replica), tier=tier, policy=policy, policy_params=params,
            replica_set=ReplicaSetConfig(
                poll_interval_s=poll_interval_s, health_interval_s=health_interval_s,
                connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s,
                request_timeout_s=request_timeout_s, eject_after_failures=eject_after_failures,
                upstream_api_key=os.environ.get("STRATA_UPSTREAM_API_KEY") or None,
                internal_token=internal_token),
            proxy=ProxyConfig(max_retries=max_retries, hold_timeout_s=hold_timeout_s,
                              replica_header=replica_header),
            estimator=PromptEstimator(bytes_per_token=bytes_per_token,
                                      chunk_tokens=prefix_chunk_tokens),
            api_keys=keys, default_limits=Limits(rpm=rate_limit_rpm, tpm=rate_limit_tpm),
            max_body_bytes=max_body_bytes, max_in_flight_per_model=max_in_flight_per_model,
            max_queued_per_model=max_queued_per_model, queue_timeout_s=queue_timeout_s,
            served_models=tuple(served_model_name), max_pending_requests=max_pending_requests,
            drain_timeout_s=drain_timeout_s)
        app = create_app(config)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    served: Any = app
    if endpoints_from == "kubernetes":
        services: str | dict[str, str] = kube_service.format(tier=tier)
        if tiers:
            services = {t.name: kube_service.format(tier=t.name) for t in tiers}
        served = _endpointslice_feed(app, kube_namespace, services, kube_api_server)
    elif endpoints_from != "static":
        raise typer.BadParameter("--endpoints-from must be static or kubernetes")
    elif not replica:
        logging.getLogger("strata.gateway").warning(
            "no --replica given: requests wait for replicas added at runtime")
    server = DrainingServer(uvicorn.Config(
        served, host=host, port=port, loop="uvloop", http="httptools",
        log_level=log_level.lower(), access_log=False, lifespan="on", timeout_keep_alive=75,
        timeout_graceful_shutdown=5), app)
    server.run()
    if not server.started:
        raise typer.Exit(1)


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains the gateway before it stops listening.

    The listener stays open while draining, so a request that arrives meanwhile gets a
    503 + Retry-After instead of a refused connection; a second signal ends the drain at
    once. The process then exits 0 (the signal is handled, not re-raised).
    """

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        """``gateway`` is drained; ``config.app`` may wrap it."""
        super().__init__(config)
        self.gateway = gateway
        self._drain: asyncio.Task[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[Any] | None = None) -> None:
        """Serve, remembering the loop a signal handler must reach."""
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """First signal: drain, then exit; later ones: end the drain now."""
        loop = self._loop
        if loop is None or not self.started or self.should_exit:
            super().handle_exit(sig, frame)
            return
        if self._drain is not None:
            loop.call_soon_threadsafe(self.gateway.stop_draining)
            return
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            logging.getLogger("strata.gateway").warning(
                "signal received: draining (up to %g s)", self.gateway.config.drain_timeout_s)
            self._drain = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> int:
        ended = await self.gateway.drain()
        self.should_exit = True
        return ended


def _endpointslice_feed(app: Any, namespace: str, service: str | dict[str, str],
                        api_server: str | None) -> Any:
    """The gateway wrapped so its replicas follow the Service's EndpointSlices."""
    from kubernetes import client

    from strata.config import PlatformOptions
    from strata.platform.endpointslices import EndpointSliceFeed
    from strata.platform.kubernetes import api_client

    options = PlatformOptions(kind="kubernetes", namespace=namespace, api_server=api_server)
    return EndpointSliceFeed(app, client.DiscoveryV1Api(api_client(options)), namespace,
                             service, port_name=options.port_name)


app = typer.Typer(add_completion=False)
app.command("gateway")(gateway_command)

if __name__ == "__main__":
    typer.run(gateway_command)
