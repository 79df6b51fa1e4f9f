"""``strata simulate``: replay a trace through a simulated cluster in virtual time.

``strata simulate -f cluster.yaml --trace azure-conv --hardware a100-80g --model
llama-2-13b`` runs strata's real scheduler, routing and autoscaling policies against a
performance model of the hardware (a file with several tiers: each tier on its share of
the trace, ``--model-share``, see ``strata.sim.tiers``); ``strata simulate profile`` measures strata's engine on
this machine for ``--hardware cpu-local``. The root CLI mounts :data:`app` as ``simulate``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from strata.bench.workload import WorkloadOptions, build_trace, parse_window
from strata.config import ClusterConfigError, load_cluster_config
from strata.sim.hardware import CPU_LOCAL, hardware_names, model_names
from strata.sim.replica_cost import build_replica_model
from strata.sim.report import result_document, save, summary_rows
from strata.sim.scenario import SimOptions, build_setup, describe, simulate
from strata.sim.tiers import model_shares, simulate_tiers, tiers_document

DEFAULT_PROFILE = Path("results") / "sim" / "cpu-local-profile.json"

app = typer.Typer(help="Replay a trace through a simulated cluster (strata's own policies, "
                       "modelled hardware).", no_args_is_help=False, add_completion=False)


@app.callback(invoke_without_command=True)
def simulate_command(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", help="Cluster file (default: one replica, default engine).")] = None,
    trace: Annotated[str, typer.Option(
        help="azure-conv | azure-code | mooncake | a .csv/.jsonl file")] = "azure-conv",
    data_dir: Annotated[Path | None, typer.Option(
        help="Folder of the named traces (default: shared/data beside the repo).")] = None,
    on_bad_rows: Annotated[str, typer.Option(help="error | skip invalid trace rows.")
                           ] = "error",
    window: Annotated[str | None, typer.Option(help="START:END seconds of the trace.")] = None,
    rate_scale: Annotated[float, typer.Option(help="Multiply the request rate.")] = 1.0,
    time_scale: Annotated[float, typer.Option(help="Stretch the timeline.")] = 1.0,
    max_requests: Annotated[int | None, typer.Option(help="First N requests only.")] = None,
    length_factor: Annotated[float | None, typer.Option(
        help="Scale prompt lengths; default fits the context (as strata bench).")] = None,
    max_context: Annotated[int | None, typer.Option(
        help="Context to fit lengths to; default: the model's (or engine max_model_len).")
    ] = None,
    hardware: Annotated[str, typer.Option(help=" | ".join(hardware_names()))] = "a100-80g",
    model: Annotated[str, typer.Option(
        help=f"{' | '.join(model_names())} | a config.json path")] = "llama-2-13b",
    tp: Annotated[int, typer.Option(help="Tensor-parallel GPUs per replica.")] = 1,
    stages: Annotated[int, typer.Option(help="Layer stages per replica (pipeline).")] = 1,
    profile: Annotated[Path, typer.Option(help="cpu-local profile JSON.")] = DEFAULT_PROFILE,
    prefix_caching: Annotated[str, typer.Option(
        help="auto (on when the trace has prefix hash ids) | on | off")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of rate scaling.")] = 0,
    fast_forward: Annotated[bool, typer.Option(
        help="Skip pure-decode runs in closed form (same results, faster).")] = True,
    output: Annotated[Path | None, typer.Option(
        help="Result JSON (default results/sim_<trace>_<time>.json).")] = None,
    save_requests: Annotated[bool, typer.Option(help="Include per-request records.")
                             ] = False,
    model_share: Annotated[list[str], typer.Option(
        help="NAME=WEIGHT (repeatable), a file with several tiers: the share of the trace's "
             "requests sent to the served model NAME (drawn with --seed); default: equal.")
    ] = [],  # noqa: B006
) -> None:
    """Simulate the cluster file's tiers serving a trace; print and save the summary."""
    if ctx.invoked_subcommand is not None:
        return
    console = Console()
    if on_bad_rows not in ("error", "skip"):
        raise typer.BadParameter("must be error or skip", param_hint="--on-bad-rows")
    try:
        cfg = load_cluster_config(file)
        replica = build_replica_model(hardware, model, tp=tp, stages=stages,
                                      profile_path=profile if hardware == CPU_LOCAL else None)
        context = max_context or min(min(
            cfg.engine_for(t).max_model_len or replica.max_model_len for t in cfg.tiers),
            replica.max_model_len)
        workload = WorkloadOptions(
            trace=trace, data_dir=data_dir, skip_bad_rows=on_bad_rows == "skip",
            rate_scale=rate_scale, time_scale=time_scale, window=parse_window(window),
            max_requests=max_requests, length_factor=length_factor, max_context=context,
            seed=seed)
        tr = build_trace(workload)
        options = SimOptions(stages=stages, prefix_caching=prefix_caching,
                             fast_forward=fast_forward)
        if len(cfg.tiers) > 1:
            shares = model_shares(cfg, model_share)
            with console.status(f"simulating {len(tr.records):,} requests over "
                                f"{len(cfg.tiers)} tiers ..."):
                runs = simulate_tiers(cfg, replica, tr, options, shares, seed)
        elif model_share:
            raise ValueError("--model-share needs a cluster file with several tiers")
        else:
            setup = build_setup(cfg, replica, tr, options)
            with console.status(f"simulating {len(tr.records):,} requests ..."):
                cluster, stats = simulate(setup, tr)
    except (ValueError, FileNotFoundError, ClusterConfigError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    extra = {"cluster_file": str(file) if file else None, "seed": seed}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = output or Path("results") / f"sim_{Path(tr.name).stem}_{stamp}.json"
    if len(cfg.tiers) > 1:
        doc = tiers_document(runs, extra, with_requests=save_requests)
        save(doc, path)
        for run in runs:
            table = Table(title=f"tier {run.tier} (model {run.model}): {tr.name} on "
                                f"{hardware} / {replica.model_name}", show_header=False)
            for label, value in summary_rows(doc["tiers"][run.tier]["summary"]):
                table.add_row(label, value)
            console.print(table)
        total = doc["summary"]
        console.print(f"all tiers: {total['completed']:,} of {total['requests']:,} requests "
                      f"completed, SLO attainment {total['slo_attainment']:.1%}, "
                      f"{total['provisioned_gpu_hours']:.2f} GPU-hours provisioned")
        console.print(f"results: {path}")
        return
    doc = result_document(cluster, stats, describe(setup, tr, extra), with_requests=save_requests)
    save(doc, path)
    table = Table(title=f"strata simulate: {tr.name} on {hardware} / {replica.model_name}",
                  show_header=False)
    for label, value in summary_rows(doc["summary"]):
        table.add_row(label, value)
    console.print(table)
    console.print(f"results: {path}")


@app.command("profile")
def profile_command(
    output: Annotated[Path, typer.Option(help="Where to write the profile JSON.")
                      ] = DEFAULT_PROFILE,
    model: Annotated[str | None, typer.Option(help="Model (default: the bundled one).")
                     ] = None,
    threads: Annotated[int, typer.Option(help="Torch threads, as the engines run.")] = 1,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 (fixed, not auto).")
                     ] = "float32",
    block_size: Annotated[int, typer.Option(help="Tokens per KV block.")] = 16,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget per step.")
                                      ] = 2048,
    max_num_seqs: Annotated[int, typer.Option(help="Max sequences per batch.")] = 64,
    repeats: Annotated[int, typer.Option(help="Passes over the measurement sweep.")] = 2,
) -> None:
    """Measure strata's engine as served on this machine; fit the cpu-local model."""
    from strata.sim.cpu_profile import ProfileOptions, run_profile

    console = Console()
    opts = ProfileOptions(model=model, threads=threads, dtype=dtype, block_size=block_size,
                          max_num_batched_tokens=max_num_batched_tokens,
                          max_num_seqs=max_num_seqs, repeats=repeats)
    try:
        prof = run_profile(opts, log=console.print)
    except (RuntimeError, TimeoutError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(prof.to_json())
    table = Table(title=f"cpu-local profile ({prof.cpu}, {prof.threads} thread(s), "
                        f"{prof.dtype})")
    table.add_column("coefficient")
    table.add_column("value", justify="right")
    for name, value in prof.coefficients.items():
        table.add_row(name, f"{value:.3e}")
    table.add_row("request overhead ms", f"{prof.request_overhead_s * 1000:.1f}")
    table.add_row("R^2", f"{prof.r2:.3f}")
    table.add_row("start-up s", f"{prof.startup_s:.1f}")
    console.print(table)
    console.print(f"profile: {output}")
