"""Fuzz the engine's and the gateway's OpenAPI schemas with schemathesis.

A real ``strata engine`` process (a tiny random-weight Llama with the bundled model's
tokenizer, so that a case costs milliseconds) and a real gateway process in front of it.
Each target's /openapi.json is loaded by schemathesis, and its operations are fuzzed with
schema-valid (positive) and schema-violating (negative) cases. The result that matters:
no 5xx (nor an SSE error event with a 5xx code inside a 200 stream), the engine process
never dies or restarts (same pid, /health ok), and no KV block is held afterwards.

    python benchmarks/fuzz.py                   # >= 10,000 cases, writes results/fuzz.json
    python benchmarks/fuzz.py --cases 400       # a quick run

/drain is left out: it is an admin operation that takes the replica out on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import requests

from strata.platform.process import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
SKIP_PATHS = {"/drain"}
# Share of a target's cases per operation: the generation routes carry the risk.
WEIGHTS = {"/v1/completions": 0.4, "/v1/chat/completions": 0.4, "/tokenize": 0.1,
           "/detokenize": 0.1}


@dataclass
class TargetResult:
    """What fuzzing one service's schema found."""

    name: str
    cases: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    sse_server_errors: int = 0
    transport_errors: list[str] = field(default_factory=list)
    per_operation: dict[str, int] = field(default_factory=dict)
    rejected_params: dict[str, int] = field(default_factory=dict)  # 4xx by the field named
    rejection_examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0


def tiny_model(out: Path) -> Path:
    """A 2-layer random-weight Llama sharing the bundled model's tokenizer (built once)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from strata.engine.tokenizer import load_tokenizer
    from strata.engine.weights import bundled_model_path

    tok = load_tokenizer(bundled_model_path())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_ids[0])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2:4]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError(f"{url} not healthy")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _sse_server_error(resp: Any) -> bool:
    """A 200 stream that carries an error event with a 5xx code."""
    ctype = resp.headers.get("content-type") or [""]
    if not (ctype[0] if isinstance(ctype, list) else ctype).startswith("text/event-stream"):
        return False
    for line in resp.text.splitlines():
        if line.startswith("data: {") and '"error"' in line:
            try:
                code = json.loads(line[6:])["error"].get("code")
            except (ValueError, KeyError, AttributeError):
                continue
            if isinstance(code, int) and code >= 500:
                return True
    return False


# Fields the engine refuses by design even when they match the schema (features it does not
# have, or a model name it does not serve): half of the positive generation cases go without
# them and with a small max_tokens, so that they reach the sampler and the detokenizer.
_REFUSED_BY_DESIGN = ("model", "best_of", "suffix", "tools", "tool_choice", "response_format",
                      "logit_bias", "chat_template_kwargs", "continue_final_message")
_DEEPEN_PATHS = ("/v1/completions", "/v1/chat/completions")


def _deepen(case: Any) -> Any:
    body = case.body
    if not isinstance(body, dict):
        return case
    body = {k: v for k, v in body.items() if k not in _REFUSED_BY_DESIGN}
    body["max_tokens"] = min(body.get("max_tokens") or 8, 8)
    body.pop("max_completion_tokens", None)
    body["min_tokens"] = min(body.get("min_tokens", 0), 8)
    if not body.get("stream"):
        body.pop("stream_options", None)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        body["prompt"] = [t % 1000 for t in prompt]  # inside any vocabulary
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        body["prompt"] = [[t % 1000 for t in p] for p in prompt]
    if body.get("top_logprobs") is not None:
        body["logprobs"] = True
    case.body = body
    return case


def _record(label: str, case: Any, resp: Any, result: TargetResult) -> None:
    result.cases += 1
    result.per_operation[label] = result.per_operation.get(label, 0) + 1
    key = str(resp.status_code)
    result.statuses[key] = result.statuses.get(key, 0) + 1
    if 400 <= resp.status_code < 500:
        try:
            err = resp.json()["error"]
            param, message = str(err.get("param")), str(err.get("message"))
        except (ValueError, KeyError, TypeError, AttributeError):
            param, message = "(not OpenAI format)", resp.text[:200]
        result.rejected_params[param] = result.rejected_params.get(param, 0) + 1
        examples = result.rejection_examples.setdefault(param, [])
        if len(examples) < 2:
            examples.append(message[:200])
    if resp.status_code >= 500:
        result.server_errors.append({"operation": label, "status": resp.status_code,
                                     "body": str(case.body)[:500], "response": resp.text[:300]})
    elif _sse_server_error(resp):
        result.sse_server_errors += 1
        result.server_errors.append({"operation": label, "status": "sse",
                                     "body": str(case.body)[:500], "response": resp.text[-300:]})


def _fuzz_test(label: str, strategy: Any, n: int, seed: int, base_url: str,
               session: requests.Session, result: TargetResult) -> Any:
    """A hypothesis test that sends n cases and records every answer (it never fails)."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), verbosity=hypothesis.Verbosity.quiet)
    @given(case=strategy)
    @hypothesis.seed(seed)
    def run(case: Any) -> None:
        try:
            resp = case.call(base_url=base_url, session=session, timeout=120)
        except requests.RequestException as e:
            result.transport_errors.append(f"{label}: {e!r}"[:300])
            return
        _record(label, case, resp, result)

    return run


def fuzz_target(name: str, base_url: str, cases: int, seed: int,
                engine: subprocess.Popen) -> TargetResult:
    """Run about `cases` schemathesis cases against one service, half positive, half negative."""
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    ops = [op for op in ops if op.path not in SKIP_PATHS]
    result = TargetResult(name)
    session = requests.Session()
    weighted = {op.label: WEIGHTS.get(op.path, 0.0) for op in ops}
    rest = [op for op in ops if weighted[op.label] == 0.0]
    t0 = time.perf_counter()
    for op in ops:
        share = weighted[op.label] / (sum(weighted.values()) or 1.0)
        n_op = max(20, round(cases * share)) if share else max(20, cases // 200 // max(1, len(rest)))
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            n = max(1, n_op // 2)
            strategy = op.as_strategy(generation_mode=mode)
            if mode == GenerationMode.POSITIVE and op.path in _DEEPEN_PATHS:
                strategy = strategy | strategy.map(_deepen)

            run = _fuzz_test(op.label, strategy, n, seed, base_url, session, result)
            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                pass  # nothing to break in this operation (negative mode of a GET without inputs)
            if engine.poll() is not None:
                result.seconds = time.perf_counter() - t0
                return result
        print(f"  {name} {op.label}: {result.per_operation.get(op.label, 0)} cases", flush=True)
    result.seconds = time.perf_counter() - t0
    return result


def _idle(engine_url: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        rep = httpx.get(engine_url + "/load", timeout=5).json()
        if (rep["running"] == 0 and rep["waiting"] == 0) or time.monotonic() > deadline:
            return rep
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10_000, help="cases in all (split over the two targets)")
    ap.add_argument("--model", type=Path, help="model to serve (default: a tiny random-weight Llama)")
    ap.add_argument("--max-model-len", type=int, default=64, help="keeps generation short")
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--out", type=Path, default=RESULTS / "fuzz.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="strata-fuzz-"))
    model = args.model or tiny_model(Path(tempfile.gettempdir()) / "strata-fuzz-tiny-llama")
    engine, engine_url = _start([sys.executable, "-m", "strata.cli", "engine", "--model", str(model),
                                 "--threads", "1", "--dtype", "float32", "--num-kv-blocks", "256",
                                 "--max-model-len", str(args.max_model_len)], work / "engine.log")
    pid = engine.pid
    try:
        gateway, gateway_url = _start([sys.executable, "-m", "strata.gateway.cli", "--replica",
                                       engine_url, "--poll-interval-s", "0.2", "--max-retries", "0"],
                                      work / "gateway.log")
    except BaseException:
        _stop(engine)
        raise
    results: list[TargetResult] = []
    try:
        per_target = args.cases // 2
        for name, url in (("engine", engine_url), ("gateway", gateway_url)):
            print(f"fuzzing {name} ({url}) with ~{per_target} cases", flush=True)
            results.append(fuzz_target(name, url, per_target, args.seed, engine))
            if engine.poll() is not None:
                break
        alive = engine.poll() is None
        health = httpx.get(engine_url + "/health", timeout=5).json() if alive else {"status": "dead"}
        load = _idle(engine_url) if alive else {}
    finally:
        _stop(gateway)
        _stop(engine)
    restarts = 0 if (alive and engine.pid == pid) else 1
    leaked = (load.get("total_kv_blocks", 0) - load.get("free_kv_blocks", 0)) if load else None
    total = sum(r.cases for r in results)
    n5xx = sum(len(r.server_errors) for r in results)

    print()
    print("| target | cases | 2xx | 4xx | 5xx (incl. SSE) | transport errors | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        c2 = sum(v for k, v in r.statuses.items() if k.startswith("2"))
        c4 = sum(v for k, v in r.statuses.items() if k.startswith("4"))
        print(f"| {r.name} | {r.cases} | {c2} | {c4} | {len(r.server_errors)} | "
              f"{len(r.transport_errors)} | {r.seconds:.0f} |")
    for r in results:
        print(f"{r.name} statuses: {dict(sorted(r.statuses.items()))}")
        print(f"{r.name} per operation: {r.per_operation}")
        top = sorted(r.rejected_params.items(), key=lambda kv: -kv[1])[:15]
        print(f"{r.name} 4xx by param (top 15): {dict(top)}")
        for e in r.server_errors[:5]:
            print(f"  5xx: {e}")
        for e in r.transport_errors[:5]:
            print(f"  transport: {e}")
    print(f"cases {total}, 5xx {n5xx}, engine restarts {restarts} (pid {pid}, "
          f"health {health.get('status')}), KV blocks held afterwards {leaked}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/fuzz.py", *sys.argv[1:]]),
        "cases": total, "server_errors": n5xx, "engine_restarts": restarts,
        "kv_blocks_held_after": leaked, "engine_health_after": health.get("status"),
        "max_model_len": args.max_model_len, "seed": args.seed,
        "targets": [asdict(r) for r in results],
    }, indent=2))
    print(f"wrote {args.out}")
    ok = n5xx == 0 and restarts == 0 and leaked == 0 and \
        not any(r.transport_errors for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
