"""Cross-check ``strata bench`` against an established client, guidellm, on the same load.

Both clients send the same synthetic load (fixed prompt and output lengths, constant-rate
open-loop arrivals, or a fixed concurrency) to the same server, one after the other, and
the script prints their throughput and TTFT p50 side by side with the ratio. The issue's
bar: agreement within 10%.

guidellm is installed in its own virtual environment, ``peers/bench-venv`` (git-ignored),
never as a strata dependency; the bundled model's tokenizer is exported in Hugging Face
layout for it (no model hub is reachable). By default the server is the fake backend
(``strata.bench.fake_backend``) with realistic delays; ``--target URL`` uses another.

    python benchmarks/bench_crosscheck.py                      # fake backend, 8 req/s
    python benchmarks/bench_crosscheck.py --concurrency 16     # closed loop instead
    python benchmarks/bench_crosscheck.py --target http://127.0.0.1:8000

Writes ``results/bench_crosscheck.json`` (and the strata run's own result file beside it).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from strata.bench.client import ClientOptions
from strata.bench.prompts import load_bench_tokenizer
from strata.bench.results import save_result
from strata.bench.runner import RunOptions, run_benchmark
from strata.bench.workload import WorkloadOptions

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = REPO / "peers" / "bench-venv"
PEER_TOKENIZER = REPO / "peers" / "bench-tokenizer"
GUIDELLM_REQUIREMENT = "guidellm==0.8.1"
TOLERANCE = 0.10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_guidellm(console: Console) -> Path:
    """The guidellm executable in peers/bench-venv, installing it on first use."""
    exe = PEER_VENV / "bin" / "guidellm"
    if exe.exists():
        return exe
    console.print(f"installing {GUIDELLM_REQUIREMENT} into {PEER_VENV} (first run only)")
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(PEER_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    # guidellm requires torch; ask for strata's own range first so pip does not pick a newer,
    # larger build when a matching wheel is already at hand.
    subprocess.run([*pip, "torch>=2.6,<2.14"], check=True)
    subprocess.run([*pip, GUIDELLM_REQUIREMENT], check=True)
    return exe


def export_tokenizer(spec: str | None) -> Path:
    """The target model's tokenizer in HF layout, for guidellm's synthetic prompts."""
    tokenizer = load_bench_tokenizer(spec)
    save = getattr(tokenizer, "save_pretrained", None)
    if save is None:
        raise SystemExit("this tokenizer cannot be exported for guidellm; use the bundled one")
    save(PEER_TOKENIZER)
    return PEER_TOKENIZER


def start_fake_backend(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    """A fake backend process with the chosen delays, once /health answers."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "strata.bench.fake_backend", "--port", str(port),
         "--ttft-ms", str(args.ttft_ms), "--itl-ms", str(args.itl_ms),
         "--output-tokens", str(args.output_tokens)],
        stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("fake backend did not start")


def run_strata(args: argparse.Namespace, target: str, out_dir: Path) -> dict[str, float]:
    """The load through strata bench's own Python API; returns its headline numbers."""
    # A closed loop ignores the schedule, so any rate will do there.
    workload = WorkloadOptions(trace="synthetic", arrivals="constant",
                               rate=args.rate if not args.concurrency else 1e6,
                               max_requests=args.requests, input_tokens=args.prompt_tokens,
                               output_tokens=args.output_tokens, seed=0)
    result = run_benchmark(workload, ClientOptions(target=target, model="auto"),
                           RunOptions(concurrency=args.concurrency, tokenizer_name="bundled"),
                           load_bench_tokenizer(args.tokenizer))
    save_result(result, out_dir / "bench_crosscheck_strata.json")
    s = result.summary
    return {"requests_per_s": s.request_throughput,
            "output_tokens_per_s": s.output_token_throughput,
            "ttft_p50_ms": s.ttft.p50_ms or float("nan"),
            "completed": float(s.completed), "duration_s": s.duration_s}


def run_guidellm(args: argparse.Namespace, exe: Path, target: str, tokenizer_dir: Path,
                 out_dir: Path) -> dict[str, float]:
    """The same load through guidellm; returns its headline numbers from its JSON."""
    out = out_dir / "bench_crosscheck_guidellm.json"
    profile = (f"kind=concurrent,streams={args.concurrency}" if args.concurrency
               else f"kind=constant,rate={args.rate}")
    cmd = [str(exe), "run",
           "--backend", f"kind=openai_http,target={target},request_format=/v1/completions",
           "--profile", profile,
           "--constraint", f"kind=max_requests,count={args.requests}",
           "--data", (f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                      f"output_tokens={args.output_tokens}"),
           "--tokenizer", f"kind=huggingface_auto,model={tokenizer_dir}",
           "--output", f"kind=json,path={out}", "--disable-progress"]
    proc = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"guidellm failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")
    bench = json.loads(out.read_text())["benchmarks"][0]
    metrics = bench["metrics"]
    completed = bench["metrics"]["request_totals"]["successful"]
    return {"requests_per_s": metrics["requests_per_second"]["successful"]["mean"],
            "output_tokens_per_s": metrics["output_tokens_per_second"]["successful"]["mean"],
            "ttft_p50_ms": metrics["time_to_first_token_ms"]["successful"]["median"],
            "completed": float(completed), "duration_s": float(bench["duration"])}


def main() -> None:
    """Run both clients, print the comparison and write results/bench_crosscheck.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="server to use (default: start a fake backend)")
    parser.add_argument("--rate", type=float, default=8.0, help="constant arrivals, req/s")
    parser.add_argument("--concurrency", type=int, help="closed loop instead of a rate")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--ttft-ms", type=float, default=80.0, help="fake backend TTFT")
    parser.add_argument("--itl-ms", type=float, default=15.0, help="fake backend ITL")
    parser.add_argument("--tokenizer", help="target model's tokenizer (default: bundled)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "results")
    args = parser.parse_args()
    args.out_dir = args.out_dir.resolve()  # guidellm runs in that folder
    console = Console()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    exe = ensure_guidellm(console)
    tokenizer_dir = export_tokenizer(args.tokenizer)
    server = None
    target = args.target
    if target is None:
        server, target = start_fake_backend(args)
    try:
        console.print(f"strata bench -> {target}")
        ours = run_strata(args, target, args.out_dir)
        console.print(f"guidellm -> {target}")
        peer = run_guidellm(args, exe, target, tokenizer_dir, args.out_dir)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    load = (f"concurrency {args.concurrency}" if args.concurrency
            else f"constant {args.rate:g} req/s")
    table = Table(title=f"strata bench vs guidellm: {args.requests} requests, {load}, "
                        f"{args.prompt_tokens} prompt / {args.output_tokens} output tokens")
    for col in ("metric", "strata bench", "guidellm", "strata/guidellm", "within 10%"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    rows: dict[str, Any] = {}
    for key in ("requests_per_s", "output_tokens_per_s", "ttft_p50_ms"):
        ratio = ours[key] / peer[key] if peer[key] else float("nan")
        ok = abs(ratio - 1.0) <= TOLERANCE
        rows[key] = {"strata": ours[key], "guidellm": peer[key], "ratio": ratio, "ok": ok}
        table.add_row(key, f"{ours[key]:.2f}", f"{peer[key]:.2f}", f"{ratio:.3f}",
                      "yes" if ok else "NO")
    for key in ("completed", "duration_s"):
        table.add_row(key, f"{ours[key]:.2f}", f"{peer[key]:.2f}", "", "")
    console.print(table)
    record = {"command": " ".join(sys.argv), "target": args.target or "fake_backend",
              "fake_backend": None if args.target else {"ttft_ms": args.ttft_ms,
                                                        "itl_ms": args.itl_ms},
              "load": load, "requests": args.requests, "prompt_tokens": args.prompt_tokens,
              "output_tokens": args.output_tokens, "peer": GUIDELLM_REQUIREMENT,
              "metrics": rows, "strata": ours, "guidellm": peer,
              "agree_within_10pct": all(r["ok"] for r in rows.values())}
    path = args.out_dir / "bench_crosscheck.json"
    path.write_text(json.dumps(record, indent=1))
    console.print(f"written {path}")


if __name__ == "__main__":
    main()
