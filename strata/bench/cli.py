"""``strata bench``: replay a trace (or synthetic load) against an OpenAI endpoint.

``strata bench --target URL --trace azure-conv ...`` runs a benchmark;
``strata bench compare A.json B.json`` prints two runs side by side. The root CLI mounts
:data:`app` as its ``bench`` group.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from strata.bench.client import ClientOptions
from strata.bench.prompts import load_bench_tokenizer
from strata.bench.report import compare_table, plot_cdfs, plot_paths, plot_timeline, print_summary
from strata.bench.results import RequestRecord, load_result, save_result
from strata.bench.runner import Hooks, RunOptions, run_benchmark
from strata.bench.workload import WorkloadOptions, parse_window

app = typer.Typer(help="Benchmark an OpenAI-compatible endpoint with real or synthetic traffic.",
                  no_args_is_help=False, add_completion=False)


class _ProgressHooks(Hooks):
    """A rich progress bar for prompt synthesis and for the run itself."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(on_prompts=self._prompts, on_start=self._start, on_done=self._done)
        self.progress = progress
        self.prompt_task: TaskID | None = None
        self.run_task: TaskID | None = None
        self.ok = 0
        self.failed = 0

    def _prompts(self, done: int, total: int) -> None:
        if self.prompt_task is None:
            self.prompt_task = self.progress.add_task("synthesizing prompts", total=total,
                                                      status="")
        if done == total or done % 64 == 0:
            self.progress.update(self.prompt_task, completed=done)

    def _start(self, total: int) -> None:
        self.run_task = self.progress.add_task("requests", total=total, status="")

    def _done(self, record: RequestRecord) -> None:
        if record.status == "ok":
            self.ok += 1
        else:
            self.failed += 1
        if self.run_task is not None:
            self.progress.update(self.run_task, advance=1,
                                 status=f"ok {self.ok} failed {self.failed}")


@app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    target: Annotated[str | None, typer.Option(help="Base URL of the OpenAI endpoint.")] = None,
    trace: Annotated[str, typer.Option(
        help="azure-conv | azure-code | mooncake | a .csv/.jsonl file | synthetic")
    ] = "synthetic",
    data_dir: Annotated[Path | None, typer.Option(
        help="Folder of the named traces (default: shared/data beside the repo).")] = None,
    on_bad_rows: Annotated[str, typer.Option(help="error | skip invalid trace rows.")
                           ] = "error",
    arrivals: Annotated[str | None, typer.Option(
        help="trace | poisson | gamma | constant (default: trace, or poisson for synthetic).")] = None,
    rate: Annotated[float | None, typer.Option(
        help="Requests/s for poisson/gamma/constant arrivals.")] = None,
    burstiness: Annotated[float, typer.Option(
        help="Gamma coefficient of variation (1 = Poisson, >1 burstier).")] = 1.0,
    duration: Annotated[float | None, typer.Option(help="Seconds of synthetic arrivals.")
                        ] = None,
    input_tokens: Annotated[int, typer.Option(help="Prompt length for --trace synthetic.")
                            ] = 256,
    output_tokens: Annotated[int, typer.Option(help="Output length for --trace synthetic.")
                             ] = 128,
    rate_scale: Annotated[float, typer.Option(
        help="Multiply the request rate, same timeline (thin or replicate requests).")] = 1.0,
    time_scale: Annotated[float, typer.Option(
        help="Stretch the timeline (0.1 = ten times faster and shorter).")] = 1.0,
    window: Annotated[str | None, typer.Option(help="START:END seconds of the trace.")] = None,
    max_requests: Annotated[int | None, typer.Option(help="Send at most N requests.")] = None,
    length_factor: Annotated[float | None, typer.Option(
        help="Scale prompt lengths (and prefix blocks) by this; default fits the context.")
    ] = None,
    max_context: Annotated[int, typer.Option(help="Target model's context, for clipping.")
                           ] = 8192,
    concurrency: Annotated[int | None, typer.Option(
        help="Closed loop with this many requests in flight (default: open loop).")] = None,
    api: Annotated[str, typer.Option(help="completions | chat")] = "completions",
    model: Annotated[str, typer.Option(help="Model name to send; auto asks /v1/models.")
                     ] = "auto",
    prompt_format: Annotated[str, typer.Option(help="text | ids (token-id prompts).")
                             ] = "text",
    tokenizer: Annotated[str | None, typer.Option(
        help="Target model (spec or path, or a tokenizer.json); default: bundled model.")
    ] = None,
    ignore_eos: Annotated[bool, typer.Option(
        help="Send ignore_eos so outputs follow the trace's lengths.")] = True,
    slo_ttft_ms: Annotated[float, typer.Option(help="TTFT objective for goodput.")] = 2000.0,
    slo_tpot_ms: Annotated[float, typer.Option(help="TPOT objective for goodput.")] = 200.0,
    lag_threshold_ms: Annotated[float, typer.Option(
        help="Flag the run when the client's p99 send lag exceeds this.")] = 50.0,
    timeout_s: Annotated[float, typer.Option(help="Per-request timeout.")] = 600.0,
    scrape_interval_s: Annotated[float, typer.Option(help="Period of /metrics scrapes.")
                                 ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of sampling, arrivals and prompts.")] = 0,
    output: Annotated[Path | None, typer.Option(
        help="Result JSON path (default results/bench_<trace>_<time>.json).")] = None,
    plots: Annotated[bool, typer.Option(help="Write PNG plots beside the JSON.")] = True,
) -> None:
    """Replay a trace or synthetic arrivals against TARGET and report latency and SLOs."""
    if ctx.invoked_subcommand is not None:
        return
    console = Console()
    if target is None:
        raise typer.BadParameter("--target URL is required to run a benchmark",
                                 param_hint="--target")
    if on_bad_rows not in ("error", "skip"):
        raise typer.BadParameter("must be error or skip", param_hint="--on-bad-rows")
    if api not in ("completions", "chat"):
        raise typer.BadParameter("must be completions or chat", param_hint="--api")
    try:
        workload = WorkloadOptions(
            trace=trace, data_dir=data_dir, skip_bad_rows=on_bad_rows == "skip",
            arrivals=arrivals or ("poisson" if trace == "synthetic" else "trace"),
            rate=rate, burstiness=burstiness, duration_s=duration, input_tokens=input_tokens,
            output_tokens=output_tokens, rate_scale=rate_scale, time_scale=time_scale,
            window=parse_window(window), max_requests=max_requests,
            length_factor=length_factor, max_context=max_context, seed=seed)
        client = ClientOptions(target=target, api=api, model=model, ignore_eos=ignore_eos,
                               timeout_s=timeout_s, scrape_interval_s=scrape_interval_s)
        run = RunOptions(concurrency=concurrency, prompt_format=prompt_format,
                         tokenizer_name=tokenizer or "bundled", slo_ttft_ms=slo_ttft_ms,
                         slo_tpot_ms=slo_tpot_ms, lag_threshold_ms=lag_threshold_ms)
        tok = load_bench_tokenizer(tokenizer)
        progress = Progress(TextColumn("{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[status]}"), console=console)
        with progress:
            result = run_benchmark(workload, client, run, tok, _ProgressHooks(progress))
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = output or Path("results") / f"bench_{Path(result.config.trace).stem}_{stamp}.json"
    save_result(result, path)
    print_summary(result, console)
    console.print(f"results: {path}")
    if plots:
        cdf_png, timeline_png = plot_paths(path)
        plot_cdfs(result, cdf_png)
        plot_timeline(result, timeline_png)
        console.print(f"plots: {cdf_png} {timeline_png}")


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="Baseline result JSON.")],
    b: Annotated[Path, typer.Argument(help="Result JSON to compare with the baseline.")],
) -> None:
    """Print two runs side by side with the ratio B/A of each headline number."""
    console = Console()
    try:
        result_a, result_b = load_result(a), load_result(b)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    name_a, name_b = (a.stem, b.stem) if a.stem != b.stem else (str(a), str(b))
    console.print(compare_table(result_a, result_b, f"A: {name_a}", f"B: {name_b}"))
