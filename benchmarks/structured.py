"""Structured output's cost per output token: JSON-schema-constrained decoding beside plain.

One engine core (in-process, no HTTP: what is measured is the step, masks included) on the
bundled SmolLM2-135M. For each batch size (16 and 64 by default) two scenarios run the same
prompts, ``--output-tokens`` sampled tokens each (temperature 1, seeded, EOS ignored): plain,
and every row under a JSON schema (an open-ended list of records, so that no grammar ends
early and both scenarios make the same number of tokens). Scenarios alternate ``--rounds``
times, so a shared machine's slow spells fall on both; the table gives each one's best round:
decode time per output token, the mean decode step, and how long the step waited for its
masks after the forward pass (the part of the mask work the overlap did not hide).

    python benchmarks/structured.py                  # a few minutes on a busy 2-core box
    python benchmarks/structured.py --batch 16 64 --rounds 3 --output results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline as rl  # noqa: E402

from strata.engine import guided  # noqa: E402
from strata.engine.engine import EngineConfig, build_engine_core  # noqa: E402
from strata.engine.guided import compile_json_schema  # noqa: E402
from strata.engine.sampling import SamplingParams  # noqa: E402

SCHEMA = {  # never complete within the budget: at least 64 records
    "type": "object",
    "properties": {"orders": {"type": "array", "minItems": 64, "items": {
        "type": "object",
        "properties": {"item": {"type": "string", "maxLength": 24},
                       "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                       "express": {"type": "boolean"}},
        "required": ["item", "qty", "express"], "additionalProperties": False}}},
    "required": ["orders"], "additionalProperties": False,
}
PROMPT = "List the orders of the day as JSON:"


class _WaitMeter:
    """Adds up how long the engine step blocked on MaskJob.result (the unhidden mask work)."""

    def __init__(self) -> None:
        self.wait_s = 0.0
        self._result = guided.MaskJob.result
        meter = self

        def timed(job: guided.MaskJob) -> guided.MaskResult:
            t0 = time.perf_counter()
            try:
                return meter._result(job)
            finally:
                meter.wait_s += time.perf_counter() - t0

        guided.MaskJob.result = timed  # type: ignore[method-assign]


def run(core, batch: int, tokens: int, constrained: bool, meter: _WaitMeter) -> dict:  # type: ignore[no-untyped-def]
    """One scenario: decode seconds per output token, mean decode step, mask wait per step."""
    grammar = compile_json_schema(SCHEMA, "guided_json") if constrained else None
    ids = core.tokenizer.encode(PROMPT)
    base = int(time.monotonic() * 1000) % 1_000_000 * 1000
    for i in range(batch):
        params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True,
                                guided=grammar)
        core.add(base + i, ids, params, 0.0)
    made = {base + i: 0 for i in range(batch)}
    decode_s, wait_s, steps, decode_tokens = 0.0, 0.0, 0, 0
    while core.has_work:
        started = all(made.values())  # every row past its prefill: a pure decode step
        w0, t0 = meter.wait_s, time.perf_counter()
        outs = core.step()
        dt = time.perf_counter() - t0
        for o in outs:
            made[o.seq_id] += len(o.token_ids)
        if started:
            decode_s += dt
            wait_s += meter.wait_s - w0
            steps += 1
            decode_tokens += len(outs)
    assert all(n == tokens for n in made.values()), made
    return {"s_per_token": decode_s / decode_tokens, "step_s": decode_s / steps,
            "mask_wait_s": wait_s / steps}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--output-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--output", type=Path)
    opts = ap.parse_args(argv)
    cpu = rl.read_cpu_info()
    most = max(opts.batch)
    core = build_engine_core(EngineConfig(
        dtype=opts.dtype, device="cpu", threads=opts.threads, max_num_seqs=most,
        max_num_batched_tokens=512, num_kv_blocks=most * 8, block_size=16))
    core.grammar.validate(compile_json_schema(SCHEMA, "guided_json"))  # builds its tokenizer
    meter = _WaitMeter()
    print(f"CPU: {cpu.model} ({cpu.logical_cpus} logical CPUs), {torch.get_num_threads()} torch "
          f"threads, {opts.dtype}; {opts.output_tokens} tokens per row, temperature 1")
    best: dict[tuple[int, bool], dict] = {}
    for _ in range(opts.rounds):
        for batch in opts.batch:
            for constrained in (False, True):
                r = run(core, batch, opts.output_tokens, constrained, meter)
                key = (batch, constrained)
                if key not in best or r["s_per_token"] < best[key]["s_per_token"]:
                    best[key] = r
    print(f"{'batch':>6} {'decoding':>12} {'ms/token':>9} {'step ms':>8} {'mask wait ms':>13} "
          f"{'vs plain':>9}")
    rows = []
    for batch in opts.batch:
        plain = best[(batch, False)]
        for constrained in (False, True):
            r = best[(batch, constrained)]
            ratio = r["s_per_token"] / plain["s_per_token"]
            print(f"{batch:>6} {'json schema' if constrained else 'plain':>12} "
                  f"{r['s_per_token'] * 1e3:>9.2f} {r['step_s'] * 1e3:>8.1f} "
                  f"{r['mask_wait_s'] * 1e3:>13.2f} {ratio:>9.2f}")
            rows.append({"batch": batch, "constrained": constrained, **r, "vs_plain": ratio})
    print(f"best of {opts.rounds} interleaved rounds")
    if opts.output:
        opts.output.write_text(json.dumps({"cpu": cpu.model, "threads": torch.get_num_threads(),
                                           "dtype": opts.dtype, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
