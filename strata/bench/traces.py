"""Production request traces: loading with row-level validation, windows and scaling.

A trace is a list of requests with an arrival time, a prompt length and an output length
(and, for Mooncake, the hash ids of the prompt's prefix blocks). Everything after loading is
a pure function from one :class:`Trace` to another, so a benchmark states exactly what it
replayed: which window, how much faster or denser, and by what factor lengths were scaled.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

# The traces bundled with the project in ../shared/data, by short name.
NAMED_TRACES: dict[str, str] = {
    "azure-conv": "azure_conv_2023.csv",
    "azure-code": "azure_code_2023.csv",
    "mooncake": "mooncake_conversation.jsonl",
}
MOONCAKE_BLOCK_TOKENS = 512
_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def default_data_dir() -> Path:
    """The ``shared/data`` folder beside the repository, where the traces live."""
    return Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace; ``line`` is its line number in the source file."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    line: int = 0


@dataclass(frozen=True)
class BadRow:
    """A row that failed validation, with the reason."""

    line: int
    reason: str


@dataclass(frozen=True)
class Trace:
    """A request trace plus the provenance a result must report."""

    name: str
    records: tuple[TraceRecord, ...]
    block_tokens: int | None = None
    bad_rows: tuple[BadRow, ...] = ()
    length_factor: float = 1.0
    clipped_requests: int = 0
    transforms: tuple[str, ...] = field(default=())

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival."""
        if not self.records:
            return 0.0
        return self.records[-1].arrival_s - self.records[0].arrival_s


class TraceError(ValueError):
    """A trace file with invalid rows; the message lists them with line numbers."""

    def __init__(self, path: Path, bad_rows: list[BadRow]) -> None:
        shown = "\n".join(f"  line {b.line}: {b.reason}" for b in bad_rows[:20])
        more = f"\n  ... and {len(bad_rows) - 20} more" if len(bad_rows) > 20 else ""
        super().__init__(
            f"{path}: {len(bad_rows)} invalid row(s):\n{shown}{more}\n"
            "Fix the file, or pass --on-bad-rows skip to drop them (the count is recorded).")
        self.bad_rows = bad_rows


def resolve_trace_path(spec: str, data_dir: Path | None = None) -> Path:
    """Map a trace name (azure-conv, azure-code, mooncake) or a file path to a path."""
    if spec in NAMED_TRACES:
        path = (data_dir or default_data_dir()) / NAMED_TRACES[spec]
        if not path.is_file():
            raise FileNotFoundError(
                f"trace {spec!r} expected at {path}; pass --data-dir pointing at shared/data")
        return path
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"--trace {spec!r} is neither one of {sorted(NAMED_TRACES)} nor an existing file")
    return path


def load_trace(spec: str, data_dir: Path | None = None, skip_bad_rows: bool = False) -> Trace:
    """Load and validate a trace; bad rows raise :class:`TraceError` unless skipped."""
    path = resolve_trace_path(spec, data_dir)
    if path.suffix == ".csv":
        records, bad = _read_azure(path)
        block_tokens = None
    elif path.suffix in (".jsonl", ".json"):
        records, bad = _read_mooncake(path)
        block_tokens = MOONCAKE_BLOCK_TOKENS
    else:
        raise ValueError(f"{path}: unknown trace format; use .csv (Azure) or .jsonl (Mooncake)")
    if bad and not skip_bad_rows:
        raise TraceError(path, bad)
    if not records:
        raise ValueError(f"{path}: no valid rows")
    t0 = records[0].arrival_s
    rebased = tuple(replace(r, arrival_s=r.arrival_s - t0) for r in records)
    name = spec if spec in NAMED_TRACES else path.name
    return Trace(name=name, records=rebased, block_tokens=block_tokens, bad_rows=tuple(bad))


def _positive_int(value: object, column: str) -> int:
    number = int(str(value)) if not isinstance(value, int) else value
    if isinstance(value, bool) or number < 1:
        raise ValueError(f"{column} must be a positive integer, got {value!r}")
    return number


def _parse_azure_time(text: str) -> float:
    # Azure writes 7 fractional digits, one more than datetime parses; split it off.
    whole, _, frac = text.strip().partition(".")
    stamp = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()
    return stamp + (float("0." + frac) if frac else 0.0)


def _read_azure(path: Path) -> tuple[list[TraceRecord], list[BadRow]]:
    records: list[TraceRecord] = []
    bad: list[BadRow] = []
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != _AZURE_COLUMNS:
            raise ValueError(f"{path}: line 1 must be the header {','.join(_AZURE_COLUMNS)}, "
                             f"got {header!r}")
        last = -math.inf
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            try:
                if len(row) != 3:
                    raise ValueError(f"expected 3 columns, got {len(row)}")
                arrival = _parse_azure_time(row[0])
                record = TraceRecord(arrival, _positive_int(row[1], "ContextTokens"),
                                     _positive_int(row[2], "GeneratedTokens"), line=line)
                if arrival < last:
                    raise ValueError("TIMESTAMP earlier than the previous row")
            except ValueError as err:
                bad.append(BadRow(line, str(err)))
                continue
            last = arrival
            records.append(record)
    return records, bad


def _read_mooncake(path: Path) -> tuple[list[TraceRecord], list[BadRow]]:
    records: list[TraceRecord] = []
    bad: list[BadRow] = []
    last = -math.inf
    with path.open() as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise ValueError("row is not a JSON object")
                stamp = row.get("timestamp")
                if isinstance(stamp, bool) or not isinstance(stamp, int | float) or stamp < 0:
                    raise ValueError(f"timestamp must be non-negative ms, got {stamp!r}")
                n_in = _positive_int(row.get("input_length"), "input_length")
                n_out = _positive_int(row.get("output_length"), "output_length")
                hashes = row.get("hash_ids", [])
                if not isinstance(hashes, list) or not all(
                        isinstance(h, int) and not isinstance(h, bool) and h >= 0
                        for h in hashes):
                    raise ValueError("hash_ids must be a list of non-negative integers")
                if hashes and len(hashes) != math.ceil(n_in / MOONCAKE_BLOCK_TOKENS):
                    raise ValueError(f"{len(hashes)} hash_ids for input_length {n_in}; "
                                     f"expected ceil({n_in}/{MOONCAKE_BLOCK_TOKENS})")
                if stamp < last:
                    raise ValueError("timestamp earlier than the previous row")
            except (ValueError, TypeError) as err:
                bad.append(BadRow(line, str(err)))
                continue
            last = stamp
            records.append(TraceRecord(stamp / 1000.0, n_in, n_out, tuple(hashes), line))
    return records, bad


def window(trace: Trace, start_s: float, end_s: float | None) -> Trace:
    """Keep arrivals in [start_s, end_s) of the trace's own clock, re-based to zero."""
    if start_s < 0 or (end_s is not None and end_s <= start_s):
        raise ValueError(f"--window {start_s}:{end_s} must satisfy 0 <= START < END")
    kept = tuple(replace(r, arrival_s=r.arrival_s - start_s) for r in trace.records
                 if r.arrival_s >= start_s and (end_s is None or r.arrival_s < end_s))
    end = "" if end_s is None else f"{end_s:g}"
    return replace(trace, records=kept,
                   transforms=(*trace.transforms, f"window {start_s:g}:{end}"))


def scale_time(trace: Trace, time_scale: float) -> Trace:
    """Stretch the timeline by ``time_scale`` (0.1 replays an hour in six minutes)."""
    if time_scale <= 0:
        raise ValueError(f"--time-scale must be > 0, got {time_scale}")
    recs = tuple(replace(r, arrival_s=r.arrival_s * time_scale) for r in trace.records)
    return replace(trace, records=recs, transforms=(*trace.transforms, f"time x{time_scale:g}"))


def scale_rate(trace: Trace, rate_scale: float, seed: int) -> Trace:
    """Multiply the request rate on the same timeline, keeping the trace's shape over time.

    Below 1 each request is kept with probability ``rate_scale``; above 1 every request is
    sent ``floor(rate_scale)`` times, plus once more with the fractional probability, the
    copies placed uniformly between that arrival and the next one. Seeded: reproducible.
    """
    if rate_scale <= 0:
        raise ValueError(f"--rate-scale must be > 0, got {rate_scale}")
    rng = random.Random(seed)
    recs = trace.records
    out: list[TraceRecord] = []
    for i, rec in enumerate(recs):
        copies = math.floor(rate_scale) + (1 if rng.random() < rate_scale % 1 else 0)
        gap = (recs[i + 1].arrival_s - rec.arrival_s) if i + 1 < len(recs) else 0.0
        for k in range(copies):
            offset = 0.0 if k == 0 else rng.random() * gap
            out.append(replace(rec, arrival_s=rec.arrival_s + offset))
    out.sort(key=lambda r: r.arrival_s)
    return replace(trace, records=tuple(out),
                   transforms=(*trace.transforms, f"rate x{rate_scale:g}"))


def head(trace: Trace, max_requests: int) -> Trace:
    """Keep the first ``max_requests`` arrivals."""
    if max_requests < 1:
        raise ValueError(f"--max-requests must be >= 1, got {max_requests}")
    return replace(trace, records=trace.records[:max_requests],
                   transforms=(*trace.transforms, f"first {max_requests}"))


def auto_length_factor(trace: Trace, max_context: int) -> float:
    """Largest power of 1/2 that fits the p99 prompt, scaled, plus the p99 output in context."""
    if not trace.records:
        return 1.0
    p99_in = _p99([r.input_tokens for r in trace.records])
    p99_out = _p99([r.output_tokens for r in trace.records])
    factor = 1.0
    while factor > 1 / 1024 and p99_in * factor + p99_out > max_context:
        factor /= 2
    return factor


def _p99(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def fit_lengths(trace: Trace, length_factor: float, max_context: int) -> Trace:
    """Scale prompt lengths (and the prefix block size) by a factor, then clip to the context.

    Output lengths are kept: they set the decode work, which a context limit does not force
    us to change. A request whose scaled prompt plus output would not fit has its prompt
    clipped (and its output too if the output alone does not fit); the count is recorded.
    """
    if not 0 < length_factor <= 1:
        raise ValueError(f"--length-factor must be in (0, 1], got {length_factor}")
    if max_context < 2:
        raise ValueError(f"--max-context must be >= 2, got {max_context}")
    clipped = 0
    out: list[TraceRecord] = []
    for rec in trace.records:
        n_in = max(1, round(rec.input_tokens * length_factor))
        n_out = min(rec.output_tokens, max_context - 1)
        if n_in + n_out > max_context:
            n_in = max_context - n_out
        if n_in != max(1, round(rec.input_tokens * length_factor)) or n_out != rec.output_tokens:
            clipped += 1
        out.append(replace(rec, input_tokens=n_in, output_tokens=n_out))
    block = trace.block_tokens
    if block is not None:
        block = max(1, round(block * length_factor))
    return replace(trace, records=tuple(out), block_tokens=block,
                   length_factor=trace.length_factor * length_factor,
                   clipped_requests=trace.clipped_requests + clipped,
                   transforms=(*trace.transforms, f"lengths x{length_factor:g} "
                               f"clip {max_context}"))
