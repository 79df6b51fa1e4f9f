"""`--dtype auto`: the fastest projection path that keeps quality, measured at start-up.

The candidates, in order of quality (each measured against fp32 on the bundled model:
tests/engine/test_quant.py, test_dtype_choice.py, benchmarks/int8_quality.py):

- float32: the reference;
- bfloat16: oneDNN on AMX tiles or AVX-512-BF16 (prepacked weights), bf16 activations;
- int8: SmoothQuant W8A8 through fbgemm (VNNI), fp16 down projection.

Each is timed on the loaded model's real projection shapes (one layer's q/k/v, o,
gate/up and down, times the layer count, plus the LM head) at a decode batch and over a
prefill chunk: a single square matmul says little about a 576-wide model whose decode
GEMMs have 16 to 64 rows. A lower-quality path must be faster by `MIN_GAIN` to be
chosen. Under auto, a float path also computes calls of 1 to 3 rows (batch-1 decode)
from the model file's own blocks where it has them (`quant.attach_hybrid_blocks`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from strata.engine.model_config import LlamaConfig

log = logging.getLogger("strata.engine")

# Highest quality first.
QUALITY_ORDER = ("float32", "bfloat16", "int8")
# A lower-quality path must cut the cost per token by this factor to be picked.
MIN_GAIN = 1.25
DECODE_ROWS = (16, 64)
PREFILL_ROWS = 512
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "int8": torch.float32}


@dataclass(frozen=True)
class PathSpeed:
    """Seconds of one step's projections on one path: per decode batch size, and a prefill chunk."""

    decode_s: dict[int, float]
    prefill_s: float

    def cost_per_token_s(self) -> float:
        """Mean of the per-token times of the decode batches and the prefill chunk."""
        per_token = [t / rows for rows, t in self.decode_s.items()] + [self.prefill_s / PREFILL_ROWS]
        return sum(per_token) / len(per_token)


@dataclass(frozen=True)
class DtypeChoice:
    """What the engine computes in: the dtype name, torch dtype and whether 1-3 row calls
    run the file's blocks."""

    name: str
    torch_dtype: torch.dtype
    file_blocks: bool


def choose(speeds: dict[str, PathSpeed]) -> str:
    """Pure: the fastest path, unless a higher-quality one is within `MIN_GAIN` of it."""
    ranked = [n for n in QUALITY_ORDER if n in speeds]
    if not ranked:
        raise ValueError("no candidate path was measured")
    choice = ranked[0]
    for name in ranked[1:]:
        if speeds[choice].cost_per_token_s() > MIN_GAIN * speeds[name].cost_per_token_s():
            choice = name
    return choice


def _bf16_available() -> bool:
    """Whether oneDNN has native bf16 kernels here (AMX or AVX-512-BF16)."""
    if not torch.backends.mkldnn.is_available():
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported()) if supported is not None else False


# The head is timed on this many of its output rows and scaled to the vocabulary: its
# GEMM time is linear in them, and a 49k x 576 random weight per candidate would cost
# more start-up time than the measurement itself.
HEAD_SAMPLE_ROWS = 4096


def _weights(config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Random fp32 weights [out, in] of one layer's projections and a slice of the head."""
    hd, h = config.head_size, config.hidden_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    shapes = {"qkv": (h, qkv), "o": (config.num_attention_heads * hd, h),
              "gate_up": (h, 2 * config.intermediate_size), "down": (config.intermediate_size, h),
              "head": (h, min(config.vocab_size, HEAD_SAMPLE_ROWS))}
    g = torch.Generator().manual_seed(0)
    return {kind: torch.randn(n, k, generator=g) * k**-0.5 for kind, (k, n) in shapes.items()}


def _path_fns(name: str, weights: dict[str, torch.Tensor]) -> dict[str, Callable]:
    """The callables a path runs each projection with."""
    from strata.engine.model import _padded_linear
    from strata.engine.quant import Fp16Linear, Int8Linear

    fns: dict[str, Callable] = {}
    for kind, w in weights.items():
        if name == "int8":
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w
            fns[kind] = (Fp16Linear(lin) if kind == "down" else Int8Linear(lin)).forward_2d
        else:
            wd = w.to(TORCH_DTYPES[name])
            if name == "float32":  # the [in, out] storage the fp32 runner uses
                wd = wd.t().contiguous().t()
            fns[kind] = _padded_linear(wd)
    return fns


def measure_paths(names: list[str], config: LlamaConfig, rounds: int = 3) -> dict[str, PathSpeed]:
    """Each path's step time on this model's shapes: layers x (q/k/v, o, gate/up, down),
    plus the head on the decode rows (a prefill chunk samples only its last rows).

    The paths take turns, round after round, and each keeps its best time: on a shared
    CPU a burst of someone else's work then hits every path alike instead of one.
    """
    weights = _weights(config)
    rows = max(*DECODE_ROWS, PREFILL_ROWS)
    head_scale = config.vocab_size / weights["head"].shape[0]
    cases: dict[tuple[str, str, int], Callable[[], None]] = {}
    for name in names:
        fns = _path_fns(name, weights)
        xs = {kind: torch.randn(rows, w.shape[1]).to(TORCH_DTYPES[name]) for kind, w in weights.items()}
        for m in (*DECODE_ROWS, PREFILL_ROWS):
            def layer(fns=fns, xs=xs, m=m) -> None:  # type: ignore[no-untyped-def]
                for kind in ("qkv", "o", "gate_up", "down"):
                    fns[kind](xs[kind][:m])

            cases[(name, "layer", m)] = layer
        for m in DECODE_ROWS:
            cases[(name, "head", m)] = lambda fns=fns, xs=xs, m=m: fns["head"](xs["head"][:m])
    best = dict.fromkeys(cases, float("inf"))
    for fn in cases.values():
        fn()  # warm: kernels, packing, first touch
    for _ in range(rounds):
        for key, fn in cases.items():
            t = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
    layers = config.num_hidden_layers
    return {
        name: PathSpeed(
            decode_s={m: layers * best[(name, "layer", m)] + head_scale * best[(name, "head", m)]
                      for m in DECODE_ROWS},
            prefill_s=layers * best[(name, "layer", PREFILL_ROWS)])
        for name in names
    }


def candidates(device: torch.device, allow_int8: bool = True) -> list[str]:
    """The paths this machine can run, by quality."""
    from strata.engine.quant import int8_supported

    out = ["float32"]
    if _bf16_available():
        out.append("bfloat16")
    if allow_int8 and device.type == "cpu" and int8_supported():
        out.append("int8")
    return out


def choose_dtype(dtype: str, device: torch.device, config: LlamaConfig,
                 allow_int8: bool = True) -> DtypeChoice:
    """Resolve ``--dtype``: as asked, or under auto by `measure_paths` and `choose`
    (``allow_int8``: False where the engine needs float weights, as LoRA does)."""
    if dtype != "auto":
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be auto, float32, bfloat16, float16 or int8; got {dtype!r}")
        return DtypeChoice(dtype, TORCH_DTYPES[dtype], file_blocks=dtype == "int8")
    if device.type == "cuda":
        return DtypeChoice("bfloat16", torch.bfloat16, file_blocks=False)
    t = time.perf_counter()
    # On one thread: the formats rank alike on one core or all of them, and a parallel
    # region on a shared CPU waits for its slowest thread, which would time the neighbours.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            speeds = measure_paths(candidates(device, allow_int8), config)
    finally:
        torch.set_num_threads(threads)
    name = choose(speeds)
    log.info(
        "dtype auto: projections per token on 1 thread (decode %s rows, prefill %d) %s -> %s (%.2f s)",
        "/".join(map(str, DECODE_ROWS)), PREFILL_ROWS,
        ", ".join(f"{n} {s.cost_per_token_s() * 1e6:.0f} us" for n, s in speeds.items()),
        name, time.perf_counter() - t,
    )
    return DtypeChoice(name, TORCH_DTYPES[name], file_blocks=True)
