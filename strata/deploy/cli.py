"""``strata deploy``: Kubernetes manifests from the cluster file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Deploy a cluster file to Kubernetes.")


@app.callback()
def deploy() -> None:
    """Deploy a cluster file to Kubernetes (a group, so more sub-commands can follow)."""


@app.command()
def render(
    file: Annotated[Path, typer.Option("--file", "-f", help="Cluster file (YAML).")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Directory to write one YAML file per object into; "
                               "default: one multi-document stream on stdout.")] = None,
    image: Annotated[str, typer.Option(help="Container image of every strata pod.")]
        = "strata:latest",
    namespace: Annotated[str, typer.Option(help="Namespace of every object.")] = "strata",
    autoscaler: Annotated[str, typer.Option(
        help="Who scales the autoscaled tiers: strata (the strata controller), hpa "
             "(autoscaling/v2 HPAs + prometheus-adapter rules) or keda (KEDA "
             "ScaledObjects).")] = "strata",
    with_secret: Annotated[bool, typer.Option(
        "--with-secret", help="Also render the strata-internal-token Secret with a fresh "
                              "random value (it changes on every render).")] = False,
    monitoring: Annotated[bool, typer.Option(
        help="Render a prometheus-operator ServiceMonitor (needs its CRD) and the Grafana "
             "dashboard, and let the monitoring namespace scrape /metrics.")] = True,
    monitoring_namespace: Annotated[str, typer.Option(
        help="Namespace of Prometheus and prometheus-adapter: let in to scrape /metrics; "
             "home of the adapter rules.")] = "monitoring",
) -> None:
    """Render the cluster file as Kubernetes YAML (kubectl apply -f DIR takes it).

    Every pod reads the Secret strata-internal-token (key: token). Either pass
    --with-secret, or create it once: kubectl -n strata create secret generic
    strata-internal-token --from-literal=token=$(python -c 'import secrets;
    print(secrets.token_urlsafe(32))').
    """
    from strata.config import ClusterConfigError
    from strata.deploy.render import RenderError, file_name, to_yaml
    from strata.deploy.render import render as render_objects

    try:
        data = yaml.safe_load(file.read_text())
        objects = render_objects(data, namespace=namespace, image=image,
                                 autoscaler=autoscaler, with_secret=with_secret,
                                 monitoring=monitoring,
                                 monitoring_namespace=monitoring_namespace)
    except (OSError, yaml.YAMLError, ClusterConfigError, RenderError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if output is None:
        typer.echo(to_yaml(objects), nl=False)
        return
    output.mkdir(parents=True, exist_ok=True)
    for i, obj in enumerate(objects):
        (output / file_name(obj, i)).write_text(to_yaml([obj]))
    typer.echo(f"wrote {len(objects)} objects to {output}", err=True)


@app.command()
def dashboard(
    file: Annotated[Path, typer.Option("--file", "-f", help="Cluster file (YAML).")],
    namespace: Annotated[str | None, typer.Option(
        help="Namespace the dashboard opens on; default: the file's platform.namespace.")]
        = None,
) -> None:
    """Print the cluster's Grafana dashboard (JSON model: import it in Grafana)."""
    import json

    from strata.config import ClusterConfigError, parse_cluster_config
    from strata.deploy.dashboard import dashboard as dashboard_model

    try:
        config = parse_cluster_config(yaml.safe_load(file.read_text()), str(file))
    except (OSError, yaml.YAMLError, ClusterConfigError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(json.dumps(dashboard_model(config, namespace), indent=2))
