"""Presenting results: the terminal summary, the side-by-side comparison and PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: benchmarks run headless

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from strata.bench.results import BenchResult, LatencyStats  # noqa: E402

_LATENCIES = ("ttft", "tpot", "itl", "e2e")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summary_table(result: BenchResult) -> Table:
    """The run's headline numbers and latency percentiles as a rich table."""
    s, c = result.summary, result.config
    table = Table(title=f"strata bench: {c.trace} -> {c.target} ({c.mode})")
    table.add_column("metric")
    for col in ("mean", "p50", "p90", "p99", "max"):
        table.add_column(col, justify="right")
    for name in (*_LATENCIES, "schedule_lag"):
        st: LatencyStats = getattr(s, name)
        table.add_row(f"{name} (ms)", _fmt(st.mean_ms), _fmt(st.p50_ms), _fmt(st.p90_ms),
                      _fmt(st.p99_ms), _fmt(st.max_ms))
    table.add_section()
    rows = [
        ("requests ok / sent", f"{s.completed} / {s.requests}"),
        ("duration (s)", _fmt(s.duration_s, 2)),
        ("throughput (req/s)", _fmt(s.request_throughput, 2)),
        ("output tokens/s", _fmt(s.output_token_throughput, 1)),
        ("prompt tokens/s", _fmt(s.input_token_throughput, 1)),
        (f"goodput (req/s, TTFT<={s.slo_ttft_ms:g}ms, TPOT<={s.slo_tpot_ms:g}ms)",
         _fmt(s.goodput, 2)),
        ("SLO attainment", f"{s.slo_attainment:.1%}"),
        ("length factor", f"{c.length_factor:g} ({c.clipped_requests} clipped)"),
    ]
    for label, value in rows:
        table.add_row(label, value, "", "", "", "")
    return table


def warnings(result: BenchResult) -> list[str]:
    """Things the reader must know before trusting the numbers."""
    s, out = result.summary, list(result.notes)
    if s.fell_behind:
        out.append(f"client fell behind schedule: p99 lag {_fmt(s.schedule_lag.p99_ms)} ms, "
                   f"max {_fmt(s.schedule_lag.max_ms)} ms (> {s.lag_threshold_ms:g} ms); "
                   "the offered load was lower than asked")
    if s.ignore_eos_ignored:
        out.append(f"target ignored ignore_eos: {s.ignore_eos_ignored} request(s) stopped "
                   "early (finish_reason=stop); output lengths do not follow the trace")
    if s.failed:
        out.append(f"{s.failed} request(s) failed: {s.errors}")
    if s.prompt_token_mismatches:
        out.append(f"{s.prompt_token_mismatches} request(s) had usage.prompt_tokens differ "
                   "from the synthesized length (BOS, chat template or another tokenizer)")
    return out


def print_summary(result: BenchResult, console: Console | None = None) -> None:
    """Print the summary table and any warnings."""
    console = console or Console()
    console.print(summary_table(result))
    for line in warnings(result):
        console.print(f"[yellow]warning:[/yellow] {line}")


def _compare_rows(a: BenchResult, b: BenchResult) -> list[tuple[str, float | None,
                                                                float | None]]:
    sa, sb = a.summary, b.summary
    rows: list[tuple[str, float | None, float | None]] = [
        ("throughput (req/s)", sa.request_throughput, sb.request_throughput),
        ("output tokens/s", sa.output_token_throughput, sb.output_token_throughput),
        ("goodput (req/s)", sa.goodput, sb.goodput),
        ("SLO attainment", sa.slo_attainment, sb.slo_attainment),
        ("completed", float(sa.completed), float(sb.completed)),
        ("failed", float(sa.failed), float(sb.failed)),
    ]
    for name in _LATENCIES:
        for pct in ("p50", "p90", "p99"):
            rows.append((f"{name} {pct} (ms)", getattr(getattr(sa, name), f"{pct}_ms"),
                         getattr(getattr(sb, name), f"{pct}_ms")))
    return rows


def compare_table(a: BenchResult, b: BenchResult, name_a: str, name_b: str) -> Table:
    """Two runs side by side with the ratio B/A of every headline number."""
    table = Table(title="strata bench compare")
    table.add_column("metric")
    table.add_column(name_a, justify="right")
    table.add_column(name_b, justify="right")
    table.add_column("B/A", justify="right")
    for label, va, vb in _compare_rows(a, b):
        ratio = "-" if va in (None, 0) or vb is None else f"{vb / va:.2f}x"
        digits = 0 if label in ("completed", "failed") else 2
        table.add_row(label, _fmt(va, digits), _fmt(vb, digits), ratio)
    return table


def _cdf(ax: plt.Axes, values_ms: list[float], label: str, slo_ms: float | None,
         unit: str = "requests") -> None:
    if values_ms:
        xs = np.sort(np.asarray(values_ms))
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    if slo_ms is not None:
        ax.axvline(slo_ms, color="red", linestyle="--", linewidth=1, label="SLO")
    ax.set_xlabel(f"{label} (ms)")
    ax.set_ylabel(f"fraction of {unit}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")


def plot_cdfs(result: BenchResult, path: Path) -> None:
    """CDFs of TTFT, TPOT, inter-token latency and E2E latency in one PNG."""
    ok = [r for r in result.requests if r.status == "ok"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    s = result.summary
    _cdf(axes[0][0], [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], "TTFT",
         s.slo_ttft_ms)
    _cdf(axes[0][1], [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None], "TPOT",
         s.slo_tpot_ms)
    _cdf(axes[1][0], [g * 1e3 for r in ok for g in r.itl_s], "ITL", None, unit="token gaps")
    _cdf(axes[1][1], [r.e2e_s * 1e3 for r in ok if r.e2e_s is not None], "E2E", None)
    fig.suptitle(f"latency CDFs: {result.config.trace} -> {result.config.target}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_timeline(result: BenchResult, path: Path) -> None:
    """Request rate, replicas per tier (scraped) and TTFT over the run, one x axis."""
    fig, (ax_rate, ax_rep, ax_ttft) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    sent = np.asarray([r.sent_s for r in result.requests])
    end = max(result.summary.duration_s, float(sent.max()) if len(sent) else 1.0)
    width = max(0.1, end / 60.0)  # about 60 bins whatever the run's length
    bins = np.arange(0.0, end + width, width)
    if len(sent):
        counts, edges = np.histogram(sent, bins=bins)
        ax_rate.step(edges[:-1], counts / width, where="post", label="sent")
        done = [r.sent_s + r.e2e_s for r in result.requests if r.status == "ok" and r.e2e_s]
        if done:
            c_done, _ = np.histogram(done, bins=bins)
            ax_rate.step(edges[:-1], c_done / width, where="post", label="completed")
    ax_rate.set_ylabel("requests/s")
    ax_rate.legend(loc="upper right")
    plotted = False
    for key, samples in sorted(result.timeseries.items()):
        if "replicas" in key:
            ax_rep.step([p.t_s for p in samples], [p.value for p in samples], where="post",
                        label=key)
            plotted = True
    if plotted:
        ax_rep.legend(loc="upper right", fontsize=8)
    else:
        ax_rep.text(0.5, 0.5, "target exported no replica gauge", ha="center",
                    transform=ax_rep.transAxes)
    ax_rep.set_ylabel("replicas")
    ok = [r for r in result.requests if r.status == "ok" and r.ttft_s is not None]
    ax_ttft.scatter([r.sent_s for r in ok], [(r.ttft_s or 0.0) * 1e3 for r in ok], s=4,
                    alpha=0.5, label="TTFT")
    ax_ttft.axhline(result.summary.slo_ttft_ms, color="red", linestyle="--", linewidth=1,
                    label="SLO")
    ax_ttft.set_ylabel("TTFT (ms)")
    ax_ttft.set_xlabel("time since start (s)")
    ax_ttft.legend(loc="upper right")
    for ax in (ax_rate, ax_rep, ax_ttft):
        ax.grid(alpha=0.3)
    fig.suptitle(f"over time: {result.config.trace} -> {result.config.target}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_paths(json_path: Path) -> tuple[Path, Path]:
    """Where the CDF and timeline PNGs of a result file go: beside it."""
    stem = json_path.with_suffix("")
    return Path(f"{stem}_cdf.png"), Path(f"{stem}_timeline.png")
