"""The benchmark's result file: config, per-request records, summary and time series.

Pydantic models, so a result written by one version is validated when read back by
``strata bench compare`` and by docs tooling, rather than trusted as a loose dict.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

RESULT_SCHEMA_VERSION = 1


class RequestRecord(BaseModel):
    """What happened to one request, times in seconds from the run's start."""

    model_config = ConfigDict(frozen=True)

    index: int
    scheduled_s: float
    sent_s: float
    status: str = Field(description="ok | error | timeout")
    http_status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = Field(None, description="(e2e - ttft) / (output_tokens - 1)")
    itl_s: list[float] = Field(default_factory=list, description="gaps between chunks")
    prompt_tokens: int = Field(description="tokens the client synthesized")
    server_prompt_tokens: int | None = Field(None, description="usage.prompt_tokens")
    output_tokens: int = 0
    max_tokens: int = 0
    finish_reason: str | None = None
    prefix_blocks: int = 0

    @property
    def lag_s(self) -> float:
        """How late the client sent this request relative to its schedule."""
        return self.sent_s - self.scheduled_s


class LatencyStats(BaseModel):
    """Distribution summary of one latency, in milliseconds."""

    model_config = ConfigDict(frozen=True)

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None


class Summary(BaseModel):
    """Headline numbers of a run."""

    model_config = ConfigDict(frozen=True)

    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float = Field(description="completed requests/s")
    output_token_throughput: float = Field(description="output tokens/s")
    input_token_throughput: float = Field(description="prompt tokens/s of completed requests")
    goodput: float = Field(description="requests/s meeting both the TTFT and TPOT SLOs")
    slo_attainment: float = Field(description="fraction of all requests meeting both SLOs")
    slo_ttft_ms: float
    slo_tpot_ms: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    schedule_lag: LatencyStats
    fell_behind: bool = Field(description="p99 schedule lag above the threshold")
    lag_threshold_ms: float
    ignore_eos_sent: bool
    ignore_eos_ignored: int = Field(
        description="requests that stopped early with finish_reason=stop despite ignore_eos")
    prompt_token_mismatches: int = Field(
        description="requests whose usage.prompt_tokens differed from the synthesized count")
    errors: dict[str, int] = Field(default_factory=dict)


class BenchConfig(BaseModel):
    """Everything needed to say what was run, and to run it again."""

    model_config = ConfigDict(frozen=True)

    target: str
    api: str
    model: str
    trace: str
    arrivals: str
    mode: str = Field(description="open-loop | closed-loop")
    concurrency: int | None = None
    rate: float | None = None
    burstiness: float | None = None
    rate_scale: float = 1.0
    time_scale: float = 1.0
    window: str | None = None
    max_requests: int | None = None
    seed: int = 0
    length_factor: float = 1.0
    max_context: int = 8192
    block_tokens: int | None = None
    clipped_requests: int = 0
    bad_rows_skipped: int = 0
    transforms: list[str] = Field(default_factory=list)
    prompt_format: str = "text"
    tokenizer: str | None = None
    prompts_verified: int = 0
    ignore_eos: bool = True
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 200.0
    started_at: str = ""


class Sample(BaseModel):
    """One scraped metric value at a time (s from the run's start)."""

    model_config = ConfigDict(frozen=True)

    t_s: float
    value: float


class BenchResult(BaseModel):
    """The whole result file."""

    schema_version: int = RESULT_SCHEMA_VERSION
    config: BenchConfig
    summary: Summary
    requests: list[RequestRecord]
    timeseries: dict[str, list[Sample]] = Field(
        default_factory=dict, description="scraped /metrics series, keyed name{labels}")
    metrics_scrape_errors: int = 0
    notes: list[str] = Field(default_factory=list)


def save_result(result: BenchResult, path: Path) -> None:
    """Write a result file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.model_dump_json(indent=1))


def load_result(path: Path) -> BenchResult:
    """Read and validate a result file written by :func:`save_result`."""
    if not path.is_file():
        raise FileNotFoundError(f"no result file at {path}")
    return BenchResult.model_validate_json(path.read_text())
