"""Model families beside Llama: strata's engine speed on same-shape random-weight models.

Builds one Hugging Face directory per family with transformers (random weights,
safetensors), every one in the bundled SmolLM2-135M's shape (hidden 576, intermediate
1536, 30 layers, 9 query heads of 64, 3 KV heads, vocabulary 49152, tied embeddings) and
with the bundled model's tokenizer, so only the architecture differs:

- ``llama``: the bundled model's own architecture;
- ``mistral``: Llama plus a sliding window (``--window``, default 32 tokens, shorter
  than every prompt, so the windowed attention path is what runs);
- ``qwen2``: q/k/v projection biases;
- ``qwen3``: RMSNorm on q and k per head;
- ``gemma3``: Gemma 3 text: (1 + w) sandwich norms, q/k norms, GeLU-tanh MLP, scaled
  embeddings, five sliding layers (``--window``) to one global, two RoPE bases.

Then serves each with ``strata engine --model DIR`` (one server at a time) and drives it
with the engine benchmark's closed loop (benchmarks/engine.py): prompts of exactly
``--input-tokens`` tokens, ``--output-tokens`` output tokens with EOS ignored, greedy,
streamed, at each concurrency. Families run alternately, ``--rounds`` times (A B C D A B C
D), so a shared machine's slow spells fall on all of them; the table gives each family's
median and spread over the rounds and its ratio to Llama's median.

    python benchmarks/families.py                          # ~10 min on a busy 2-core box
    python benchmarks/families.py --dtype int8 --rounds 1

The directories are cached under ``~/.cache/strata/families`` (``--cache-dir``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as eb  # noqa: E402  (sibling script module)
import roofline as rl  # noqa: E402

import peers  # noqa: E402
from strata.bench.metrics import summarize  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def family_config(family: str, window: int) -> object:
    """A transformers config of ``family`` in the bundled model's shape."""
    import transformers as tf

    from strata.engine.weights import bundled_model_path, load_config

    base = load_config(bundled_model_path())
    common = {
        "vocab_size": base.vocab_size, "hidden_size": base.hidden_size,
        "intermediate_size": base.intermediate_size,
        "num_hidden_layers": base.num_hidden_layers,
        "num_attention_heads": base.num_attention_heads,
        "num_key_value_heads": base.num_key_value_heads,
        "max_position_embeddings": base.max_position_embeddings,
        "rms_norm_eps": base.rms_norm_eps, "rope_theta": base.rope_theta,
        "tie_word_embeddings": base.tie_word_embeddings,
        "bos_token_id": base.bos_token_id, "eos_token_id": base.eos_token_id,
    }
    head_dim = base.hidden_size // base.num_attention_heads
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, head_dim=head_dim, sliding_window=window)
    if family == "qwen2":  # q/k/v biases are part of the architecture
        return tf.Qwen2Config(**common, use_sliding_window=False)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=head_dim, use_sliding_window=False)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=head_dim, sliding_window=window,
                                   query_pre_attn_scalar=head_dim)
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def build_dir(family: str, window: int, cache_dir: Path) -> Path:
    """The family's random-weight HF directory (built once, then reused)."""
    import transformers as tf

    from strata.engine.tokenizer import load_tokenizer
    from strata.engine.weights import bundled_model_path

    name = f"{family}-w{window}" if family in ("mistral", "gemma3") else family
    out = cache_dir / name
    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(family_config(family, window),
                                                dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(bundled_model_path()).save_pretrained(out)
    return out


def measure(model_dir: Path, args: Sequence[str], opts: argparse.Namespace,
            texts: list[str]) -> tuple[str, dict[int, float]]:
    """Serve one directory and run every level: (dtype, output tok/s per concurrency)."""
    server = peers.strata_server(opts.threads, ["--model", str(model_dir), *args])
    out: dict[int, float] = {}
    with server:
        dtype = eb.strata_dtype(server, args)
        model = asyncio.run(eb.served_model(server.url))
        warm = asyncio.run(eb.closed_loop(server.url, model, texts[:eb.WARMUP],
                                          opts.input_tokens, 2, 8, {}))
        bad = [r.error for r in warm if r.status != "ok"]
        if bad:
            raise RuntimeError(f"{model_dir.name} failed its warm-up requests: {bad[0]}")
        first = eb.WARMUP
        for c in opts.concurrency:
            n = max(opts.requests, c)
            records = asyncio.run(eb.closed_loop(server.url, model, texts[first:first + n],
                                                 opts.input_tokens, c, opts.output_tokens, {}))
            first += n
            s = summarize(records, slo_ttft_ms=1e9, slo_tpot_ms=1e9, ignore_eos_sent=True)
            if s.errors or s.completed != n:
                raise RuntimeError(f"{model_dir.name} c={c}: {s.errors} errors")
            out[c] = s.output_token_throughput
    return dtype, out


def table(samples: dict[str, dict[int, list[float]]], dtypes: dict[str, list[str]],
          concurrency: Sequence[int]) -> str:
    """Markdown per level: median tok/s (min-max over rounds), and the ratios to Llama of
    the medians and of the bests (the best round is the least disturbed by other jobs)."""
    head = "| family | dtype | " + " | ".join(
        f"c={c} tok/s median (min-max) | vs llama: median, best" for c in concurrency) + " |"
    rule = "|---|---|" + "---:|---:|" * len(concurrency)
    rows = [head, rule]
    for fam, per_c in samples.items():
        # --dtype auto decides by a start-up matmul timing, so a busy machine can flip it
        seen = dtypes.get(fam, [])
        cells = [fam, " / ".join(f"{d} x{seen.count(d)}" if len(set(seen)) > 1 else d
                                 for d in dict.fromkeys(seen)) or "?"]
        for c in concurrency:
            vals = per_c.get(c, [])
            if not vals:
                cells += ["-", "-"]
                continue
            med = statistics.median(vals)
            base = samples.get("llama", {}).get(c)
            ratio = (f"{med / statistics.median(base):.2f}, {max(vals) / max(base):.2f}"
                     if base else "-")
            cells += [f"{med:.1f} ({min(vals):.1f}-{max(vals):.1f})", ratio]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--requests", type=int, default=4,
                   help="requests per level (at least the concurrency)")
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--window", type=int, default=32, help="Mistral's sliding window")
    p.add_argument("--dtype", default="auto", help="strata engine --dtype")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path,
                   default=Path.home() / ".cache" / "strata" / "families")
    p.add_argument("--output", type=Path, default=None, help="also write JSON here")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.families = [f for f in a.families.split(",") if f]
    unknown = [f for f in a.families if f not in FAMILIES]
    if unknown:
        p.error(f"--families: unknown {unknown}; choose from {','.join(FAMILIES)}")
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    return a


def main(argv: Sequence[str] | None = None) -> None:
    """Build the directories, measure the families alternately, print the table."""
    opts = parse_args(argv)
    print(f"CPU: {rl.read_cpu_info().model}; {opts.threads} threads per server")
    dirs = {f: build_dir(f, opts.window, opts.cache_dir) for f in opts.families}
    needed = eb.WARMUP + sum(max(opts.requests, c) for c in opts.concurrency)
    texts, _ = eb.make_prompts(needed, opts.input_tokens, opts.seed)
    args = [] if opts.dtype == "auto" else ["--dtype", opts.dtype]
    samples: dict[str, dict[int, list[float]]] = {f: {} for f in opts.families}
    dtypes: dict[str, list[str]] = {f: [] for f in opts.families}
    for rnd in range(opts.rounds):
        for fam in opts.families:
            t0 = time.monotonic()
            dtype, got = measure(dirs[fam], args, opts, texts)
            dtypes[fam].append(dtype)
            for c, v in got.items():
                samples[fam].setdefault(c, []).append(v)
            print(f"round {rnd + 1} {fam} ({dtype}): " + ", ".join(
                f"c={c} {v:.1f} tok/s" for c, v in got.items())
                + f" ({time.monotonic() - t0:.0f} s)", flush=True)
    md = table(samples, dtypes, opts.concurrency)
    print()
    print(md)
    if opts.output:
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        opts.output.write_text(json.dumps({
            "cpu": rl.read_cpu_info().model, "options": {k: str(v) for k, v in vars(opts).items()},
            "dtypes": dtypes, "samples": samples, "markdown": md}, indent=2) + "\n")


if __name__ == "__main__":
    main()
