"""Shared parts of the reliability benchmarks (faults.py, overload.py, soak.py).

A cluster is always the real thing: ``strata serve`` on a generated cluster file, as a
child process, with its replicas as grandchildren. The load driver classifies how every
request ended, because the figures these benchmarks exist for are about endings, not
speed: a request either succeeds, fails with a clear error (an HTTP error in the OpenAI
format, or an SSE ``error`` event on a stream), is cut off by a connection reset, ends
without a clear ending (a stream closed without ``[DONE]`` or an error), or hangs until
the client gives up. The last two are "lost": a client cannot tell what happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "reliability"
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather and the keeper's thoughts.")

OK, HTTP_ERROR, SSE_ERROR, RESET, TRUNCATED, HUNG = (
    "ok", "http_error", "sse_error", "reset", "truncated", "hung")
LOST = (TRUNCATED, HUNG)


# -- the machine ---------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """CPU model, cores and load average now: every figure is read against these."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = " ".join(line.partition(":")[2].split())
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "commit": git_commit(), "time_utc": time.strftime("%Y-%m-%d %H:%M:%S",
                                                              time.gmtime())}


def git_commit() -> str:
    """The commit the benchmark ran on (with '+dirty' when the tree had local changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, result: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """``results/reliability/<name>.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (what the scripts print and docs/results.md quotes)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -- processes -----------------------------------------------------------------------------

def proc_sample(pid: int) -> dict[str, int] | None:
    """RSS bytes and open file descriptors of one process (None once it is gone)."""
    try:
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return {"rss": rss, "fds": fds}
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


class Cluster:
    """``strata serve -f <file>`` as a child process, and what its /admin/status says."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str) -> None:
        """Writes the cluster file into ``workdir``; nothing runs before ``start``."""
        self.config = config
        self.workdir = workdir
        self.name = name
        self.url = f"http://127.0.0.1:{config['gateway']['port']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.path = workdir / f"{name}.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self) -> None:
        """Start the process (returns at once)."""
        log = (self.workdir / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "strata.cli", "serve", "-f", str(self.path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    def start(self, ready: dict[str, int], timeout_s: float = 300) -> float:
        """Launch and wait until each named tier has that many ready replicas; seconds taken."""
        t0 = time.monotonic()
        self.launch()
        try:
            self.wait_ready(ready, timeout_s)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - t0

    def wait_ready(self, ready: dict[str, int], timeout_s: float) -> None:
        """Wait for the ready counts (and, for pipelines, every stage joined to the head)."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"strata serve exited with {self.proc.returncode}; see "
                                   f"{self.workdir / (self.name + '.log')}")
            try:
                st = self.status()
                counts = {t["name"]: t["ready"] for t in st["tiers"]}
                joined = all(r.get("head_state", "live") == "live" for t in st["tiers"]
                             for r in t["replicas"] if t["kind"] == "stage")
                if all(counts.get(k, 0) >= v for k, v in ready.items()) and joined:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster {self.name} not ready within {timeout_s} s")
            time.sleep(0.3)

    def status(self) -> dict[str, Any]:
        """GET /admin/status."""
        return httpx.get(self.url + "/admin/status", timeout=5).json()

    def replicas(self) -> list[dict[str, Any]]:
        """Every replica of every tier, with its tier's name under ``tier``."""
        return [{**r, "tier": t["name"]} for t in self.status()["tiers"] for r in t["replicas"]]

    def pids(self) -> dict[str, int]:
        """``{"gateway": pid, "<replica id>": pid, ...}`` of every live process."""
        out = {"gateway": self.pid}
        try:
            for r in self.replicas():
                if r.get("pid"):
                    out[r["id"]] = r["pid"]
        except (httpx.HTTPError, ValueError):
            pass
        return out

    def stop(self) -> int | None:
        """SIGINT (as Ctrl-C), then SIGKILL after 60 s; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def engine_block(model_threads: int = 1, **extra: Any) -> dict[str, Any]:
    """Engine options shared by the experiments: one torch thread, a small KV cache."""
    return {"threads": model_threads, "kv_cache": "64MiB", "max_num_seqs": 16,
            "max_model_len": 1024, **extra}


# -- the load driver -----------------------------------------------------------------------

@dataclass
class Outcome:
    """How one request ended (times in seconds from the run's clock)."""

    index: int
    stream: bool
    start_s: float
    end_s: float = 0.0
    kind: str = HUNG
    status: int | None = None
    retry_after: str | None = None
    ttft_s: float | None = None
    tokens: int = 0
    replica: str | None = None
    error: str | None = None


@dataclass
class LoadStats:
    """Outcomes of one run plus the in-flight requests (streams started but not ended)."""

    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: dict[int, Outcome] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        c = {k: 0 for k in (OK, HTTP_ERROR, SSE_ERROR, RESET, TRUNCATED, HUNG)}
        for o in self.outcomes:
            c[o.kind] += 1
        c["sent"] = len(self.outcomes)
        return c


def _error_text(raw: bytes) -> str:
    try:
        err = json.loads(raw)["error"]
        return f"{err.get('code') or err.get('type')}: {str(err.get('message'))[:200]}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw.decode(errors="replace")[:200]


async def send(session: aiohttp.ClientSession, url: str, index: int, t0: float, *,
               stream: bool, max_tokens: int, model: str = "default", prompt: str = PROMPT,
               timeout_s: float = 60.0, stats: LoadStats | None = None) -> Outcome:
    """One /v1/completions request, classified; ``timeout_s`` bounds the whole request."""
    o = Outcome(index, stream, time.perf_counter() - t0)
    if stats is not None:
        stats.in_flight[index] = o
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url + "/v1/completions", json=body) as resp:
                o.status = resp.status
                o.retry_after = resp.headers.get("retry-after")
                o.replica = resp.headers.get("x-strata-replica")
                if resp.status >= 400:
                    o.kind, o.error = HTTP_ERROR, _error_text(await resp.read())
                elif not stream:
                    data = json.loads(await resp.read())
                    o.tokens = int(data["usage"]["completion_tokens"])
                    o.kind = OK  # no TTFT: the whole answer comes at once
                else:
                    o.kind = await _read_stream(resp, o, t0)
    except TimeoutError:
        o.kind, o.error = HUNG, f"no ending within {timeout_s:g} s"
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError, ConnectionError) as err:
        o.kind, o.error = RESET, f"{type(err).__name__}: {err}"[:200]
    except aiohttp.ClientConnectorError as err:
        o.kind, o.error = RESET, f"connect: {err}"[:200]
    except (ValueError, KeyError) as err:
        o.kind, o.error = TRUNCATED, f"unreadable body: {err}"[:200]
    o.end_s = time.perf_counter() - t0
    if stats is not None:
        stats.in_flight.pop(index, None)
        stats.outcomes.append(o)
    return o


async def _read_stream(resp: aiohttp.ClientResponse, o: Outcome, t0: float) -> str:
    pending = b""
    async for data in resp.content.iter_any():
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return OK
            event = json.loads(payload)
            if "error" in event:
                o.error = _error_text(payload)
                return SSE_ERROR
            if event.get("choices") and event["choices"][0].get("text"):
                if o.ttft_s is None:
                    o.ttft_s = time.perf_counter() - t0 - o.start_s
                o.tokens += 1
    o.error = "the stream ended without [DONE] or an error event"
    return TRUNCATED


def client_session(limit: int = 0) -> aiohttp.ClientSession:
    """No connection cap (each request its own connection when needed); no client timeout
    here: ``send`` bounds each request itself."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))


async def closed_loop(url: str, workers: int, stop: asyncio.Event, stats: LoadStats, t0: float,
                      *, max_tokens: int, model: str = "default", timeout_s: float = 60.0,
                      pause_s: float = 0.0) -> None:
    """``workers`` clients each sending one request after another until ``stop``.

    Even workers stream and odd ones do not, so both kinds are in flight at any time.
    """
    counter = iter(range(1 << 30))
    async with client_session() as session:
        async def worker(w: int) -> None:
            while not stop.is_set():
                o = await send(session, url, next(counter), t0, stream=w % 2 == 0,
                               max_tokens=max_tokens, model=model, timeout_s=timeout_s,
                               stats=stats)
                # A client that failed waits a little, as any retrying client would,
                # rather than spinning on a refused connection.
                if pause_s or o.kind != OK:
                    await asyncio.sleep(pause_s if o.kind == OK else 0.25)
        await asyncio.gather(*(worker(w) for w in range(workers)))


async def probe_until_served(url: str, since_s: float, t0: float, timeout_s: float,
                             model: str = "default") -> float | None:
    """Seconds from ``since_s`` until a new small request succeeds (None: not within)."""
    async with client_session() as session:
        deadline = time.perf_counter() + timeout_s
        i = 0
        while time.perf_counter() < deadline:
            i += 1
            o = await send(session, url, -i, t0, stream=False, max_tokens=2, model=model,
                           timeout_s=min(30.0, timeout_s))
            if o.kind == OK:
                return o.end_s - since_s
            await asyncio.sleep(0.2)
    return None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def outcome_dicts(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """JSON-ready outcomes."""
    return [asdict(o) for o in outcomes]
