"""What this CPU can do for this model: the yardstick every engine benchmark divides by.

Measures, on the thread count the engines use: the CPU model, dense matmul throughput in
fp32, bf16 and int8 (torch's dynamic-int8 linear, the path ``strata --dtype int8`` takes),
and memory read bandwidth. From those and the model's shape it derives

- the compute roofline in output tokens/s: matmul FLOP/s / (2 * matmul params per token);
- the batch-1 bandwidth roofline: read bandwidth / weight bytes per decode step;
- the roofline of batch ``c`` decode: min(compute, c * bandwidth roofline), since one step
  reads the weights once for all ``c`` sequences.

Attention over the KV cache is left out of both (a 256-token context adds ~7% FLOPs), so
the rooflines are slightly generous: a fraction of them is a lower bound.

    python benchmarks/roofline.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Bytes per weight element in each dtype a server may compute in.
DTYPE_BYTES: dict[str, float] = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0,
                                 "q4_1": 0.625}  # Q4_1: 32 x 4 bits + fp16 scale and min


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as /proc/cpuinfo names it, and the matmul extensions that decide the dtype."""

    model: str
    logical_cpus: int
    flags: tuple[str, ...]  # the relevant ones only: avx2, avx512*, amx*

    @property
    def has_amx(self) -> bool:
        """AMX tiles: bf16 matmul is then several times faster than fp32."""
        return "amx_bf16" in self.flags

    @property
    def has_avx512_bf16(self) -> bool:
        """Native bf16 dot products; without them torch emulates bf16 matmul (slower)."""
        return "avx512_bf16" in self.flags


@dataclass(frozen=True)
class ModelShape:
    """The parameter counts that set a decoder's FLOPs and bytes per token."""

    name: str
    matmul_params: int  # weights multiplied per token: every linear layer plus the LM head

    @property
    def flops_per_token(self) -> int:
        """Two FLOPs (multiply, add) per weight per token."""
        return 2 * self.matmul_params


@dataclass(frozen=True)
class Roofline:
    """Measured machine limits on ``threads`` threads (TFLOP/s and GB/s)."""

    cpu: CpuInfo
    threads: int
    matmul_tflops: dict[str, float]  # dtype -> measured dense matmul TFLOP/s, its fastest path
    read_gbps: float
    paths: dict[str, float] = field(default_factory=dict)  # "dtype path" -> TFLOP/s, every path

    def compute_tokens_s(self, shape: ModelShape, dtype: str) -> float:
        """Output tokens/s if every matmul ran at the measured ``dtype`` peak."""
        return self.matmul_tflops[dtype] * 1e12 / shape.flops_per_token

    def best_compute(self, shape: ModelShape) -> tuple[str, float]:
        """The dtype with the fastest matmul here, and its compute roofline."""
        dtype = max(self.matmul_tflops, key=lambda d: self.matmul_tflops[d])
        return dtype, self.compute_tokens_s(shape, dtype)

    def bandwidth_tokens_s(self, shape: ModelShape, dtype: str) -> float:
        """Batch-1 decode bound: one full read of the weights per output token."""
        return self.read_gbps * 1e9 / (shape.matmul_params * DTYPE_BYTES[dtype])

    def at_concurrency(self, shape: ModelShape, weight_dtype: str, concurrency: int,
                       compute_dtype: str | None = None) -> float:
        """Roofline of batch-``concurrency`` decode: weights stored in ``weight_dtype``,
        matmuls at the ``compute_dtype`` rate (default: the same, else the best measured)."""
        compute_dtype = compute_dtype or weight_dtype
        if compute_dtype not in self.matmul_tflops:
            compute_dtype = self.best_compute(shape)[0]
        compute = self.compute_tokens_s(shape, compute_dtype)
        return min(compute, concurrency * self.bandwidth_tokens_s(shape, weight_dtype))

    def to_dict(self, shape: ModelShape) -> dict[str, object]:
        """JSON form with the derived rooflines, for result files."""
        best_dtype, best = self.best_compute(shape)
        return {
            "cpu": asdict(self.cpu), "threads": self.threads,
            "matmul_tflops": self.matmul_tflops, "read_gbps": self.read_gbps,
            "model": asdict(shape), "flops_per_token": shape.flops_per_token,
            "paths_tflops": self.paths,
            "compute_roofline_tokens_s": {d: self.compute_tokens_s(shape, d)
                                          for d in self.matmul_tflops},
            "best_compute_dtype": best_dtype, "best_compute_roofline_tokens_s": best,
            "batch1_bandwidth_roofline_tokens_s": {d: self.bandwidth_tokens_s(shape, d)
                                                   for d in DTYPE_BYTES},
        }


_RELEVANT_FLAG = re.compile(r"^(avx2|fma|f16c|avx512\w*|amx\w*)$")


def parse_cpuinfo(text: str) -> CpuInfo:
    """The CPU model, logical CPU count and matmul-relevant flags from /proc/cpuinfo text."""
    model = "unknown CPU"
    flags: set[str] = set()
    cpus = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            cpus += 1
        elif key == "model name" and model == "unknown CPU":
            model = " ".join(value.split())
        elif key == "flags" and not flags:
            flags = {f for f in value.split() if _RELEVANT_FLAG.match(f)}
    return CpuInfo(model=model, logical_cpus=max(cpus, 1), flags=tuple(sorted(flags)))


def read_cpu_info() -> CpuInfo:
    """This machine's CPU (Linux); elsewhere the platform's processor string."""
    path = Path("/proc/cpuinfo")
    if path.exists():
        return parse_cpuinfo(path.read_text())
    return CpuInfo(model=platform.processor() or "unknown CPU", logical_cpus=1, flags=())


def llama_shape(name: str, hidden: int, intermediate: int, layers: int, heads: int,
                kv_heads: int, vocab: int, head_dim: int | None = None) -> ModelShape:
    """Matmul parameter count of a Llama decoder (q, k, v, o, gate, up, down, LM head)."""
    hd = head_dim or hidden // heads
    attn = hidden * heads * hd * 2 + hidden * kv_heads * hd * 2
    mlp = 3 * hidden * intermediate
    return ModelShape(name=name, matmul_params=layers * (attn + mlp) + hidden * vocab)


def bundled_model_shape() -> ModelShape:
    """Shape of the model strata serves by default, read from its GGUF file."""
    from strata.engine.weights import bundled_model_path, load_config

    path = bundled_model_path()
    c = load_config(path)
    return llama_shape(path.stem, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                       c.num_attention_heads, c.num_key_value_heads, c.vocab_size, c.head_dim)


def _best_rates(jobs: dict[str, tuple[Callable[[], object], float]], rounds: int = 8,
                window_s: float = 0.15) -> dict[str, float]:
    """Best rate (work units/s) of each job over ``rounds`` short timed windows.

    The jobs take turns, round after round, so that on a shared machine a burst of
    someone else's load hits every job alike instead of skewing one; the best window of
    each approximates what the hardware does when it is free.
    """
    for fn, _ in jobs.values():
        fn()  # warm: allocation, packing, first-touch
    best = dict.fromkeys(jobs, 0.0)
    for _ in range(rounds):
        for name, (fn, work) in jobs.items():
            n = 0
            t0 = time.perf_counter()
            while True:
                fn()
                n += 1
                dt = time.perf_counter() - t0
                if dt >= window_s:
                    break
            best[name] = max(best[name], n * work / dt)
    return best


def matmul_paths(m: int, k: int, n: int) -> dict[str, tuple[Callable[[], object], float]]:
    """Every way torch can run an [m, k] x [k, n] product here, by "dtype path".

    - float32 mkl: plain matmul (MKL / oneDNN sgemm);
    - bfloat16 matmul: plain matmul, weight re-laid out by oneDNN on every call;
    - bfloat16 packed: oneDNN linear on a weight packed once (AMX tiles where the CPU has
      them; what strata serves bf16 with, and torch.compile on the CPU);
    - int8 fbgemm: dynamic W8A8 (per-tensor activations, VNNI), strata ``--dtype int8``;
    - int8 onednn: oneDNN's quantized linear (AMX-int8 where present, else VNNI), as
      PyTorch's x86 quantization runs it, including the per-call activation quantization.
    """
    import torch

    flops = 2.0 * m * k * n
    jobs: dict[str, tuple[Callable[[], object], float]] = {}
    a32, w32 = torch.randn(m, k), torch.randn(n, k) * k**-0.5
    wt = w32.t().contiguous()
    jobs["float32 mkl"] = (lambda: a32 @ wt, flops)
    a16, w16 = a32.bfloat16(), w32.bfloat16()
    wt16 = wt.bfloat16()
    jobs["bfloat16 matmul"] = (lambda: a16 @ wt16, flops)
    if torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w16, None)
            lin = torch.ops.mkldnn._linear_pointwise.default
            lin(a16, packed, None, "none", [], "")
            jobs["bfloat16 packed"] = (lambda: lin(a16, packed, None, "none", [], ""), flops)
        except (RuntimeError, AttributeError):
            pass
    engines = torch.backends.quantized.supported_engines
    scales = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    if "x86" in engines or "fbgemm" in engines:
        with warnings.catch_warnings():  # quantized tensor creation is deprecated, not gone
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(w32, scales.double(), torch.zeros(n, dtype=torch.long), 0,
                                            torch.qint8)
        fb = torch.ops.quantized.linear_prepack(qw, None)
        jobs["int8 fbgemm"] = (lambda: torch.ops.quantized.linear_dynamic(a32, fb, False), flops)
    try:
        q8 = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
        dn = torch.ops.onednn.qlinear_prepack(q8, None)
        zp = torch.zeros(n, dtype=torch.int32)
        qlin = torch.ops.onednn.qlinear_pointwise.default

        def onednn_int8() -> object:
            xs = float(a32.abs().amax()) / 127 or 1.0
            qx = torch.round(a32 * (1 / xs)).clamp(-127, 127).add_(128).to(torch.uint8)
            return qlin(qx, xs, 128, dn, scales, zp, None, 1.0, 0, torch.float32, "none", [], "")

        onednn_int8()
        jobs["int8 onednn"] = (onednn_int8, flops)
    except (RuntimeError, AttributeError):
        pass
    return jobs


def measure_paths(threads: int, m: int = 256, k: int = 1536, n: int = 1536) -> dict[str, float]:
    """TFLOP/s of every `matmul_paths` path at a decode-like shape (``m`` tokens in flight)."""
    import torch

    torch.set_num_threads(threads)
    return {name: rate / 1e12 for name, rate in _best_rates(matmul_paths(m, k, n)).items()}


def fastest_per_dtype(paths: dict[str, float]) -> dict[str, float]:
    """Each dtype's fastest path: the format's roofline."""
    best: dict[str, float] = {}
    for name, tflops in paths.items():
        dtype = name.split()[0]
        best[dtype] = max(best.get(dtype, 0.0), tflops)
    return best


def measure_matmul_tflops(threads: int, m: int = 256, k: int = 1536, n: int = 1536
                          ) -> dict[str, float]:
    """Dense matmul TFLOP/s per dtype, each through its fastest path (`matmul_paths`)."""
    return fastest_per_dtype(measure_paths(threads, m, k, n))


def shape_table(threads: int, shape_of: dict[str, tuple[int, int]], rows: list[int]) -> list[str]:
    """TFLOP/s of each path on the model's own projections (in, out) at each row count."""
    import torch

    torch.set_num_threads(threads)
    lines = []
    for kind, (k, n) in shape_of.items():
        for m in rows:
            jobs = matmul_paths(m, k, n)
            rates = _best_rates(jobs, rounds=3, window_s=0.05)
            lines.append(f"{kind:8s} {k:5d}->{n:<6d} rows {m:5d}: " + ", ".join(
                f"{p} {r / 1e12:.2f}" for p, r in rates.items()))
    return lines


def measure_read_gbps(threads: int, mib: int = 512) -> float:
    """Memory read bandwidth: summing a buffer ~10x larger than the last-level cache."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    rates = _best_rates({"read": (lambda: buf.sum(), buf.numel() * 4.0)}, rounds=10,
                        window_s=0.2)
    return rates["read"] / 1e9


def measure(threads: int) -> Roofline:
    """Measure this machine on ``threads`` threads (takes a few seconds)."""
    paths = measure_paths(threads)
    return Roofline(cpu=read_cpu_info(), threads=threads, matmul_tflops=fastest_per_dtype(paths),
                    read_gbps=measure_read_gbps(threads), paths=paths)


def describe(roof: Roofline, shape: ModelShape, strata_dtype: str | None = None) -> list[str]:
    """Human-readable header lines: CPU, measured limits and the derived rooflines."""
    flags = ", ".join(f for f in roof.cpu.flags if f.startswith(("avx512_bf16", "avx512_vnni",
                                                               "amx")))
    lines = [
        f"CPU: {roof.cpu.model} ({roof.cpu.logical_cpus} logical CPUs; "
        f"{flags or 'no AMX / AVX512-BF16 / VNNI'}); {roof.threads} threads measured",
        "matmul: " + ", ".join(f"{d} {t:.3f} TFLOP/s" for d, t in roof.matmul_tflops.items())
        + f"; memory read {roof.read_gbps:.1f} GB/s",
        *([("paths (TFLOP/s): " + ", ".join(f"{p} {t:.3f}" for p, t in roof.paths.items()))]
          if roof.paths else []),
        f"model: {shape.name}, {shape.matmul_params / 1e6:.1f} M matmul params, "
        f"{shape.flops_per_token / 1e6:.0f} MFLOP per token",
        "compute roofline (tokens/s): " + ", ".join(
            f"{d} {roof.compute_tokens_s(shape, d):,.0f}" for d in roof.matmul_tflops),
        "batch-1 bandwidth roofline (tokens/s): " + ", ".join(
            f"{d} {roof.bandwidth_tokens_s(shape, d):,.0f}" for d in DTYPE_BYTES),
    ]
    if strata_dtype:
        lines.append(f"strata computes in {strata_dtype}: the roofline column is "
                     f"min(compute[{strata_dtype}], c x bandwidth[{strata_dtype}])")
    return lines


def main() -> None:
    """Measure and print the roofline; optionally write it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="write JSON here")
    parser.add_argument("--shapes", default="", metavar="ROWS",
                        help="also time every path on the bundled model's projections at these "
                             "row counts, e.g. 1,16,64,512")
    args = parser.parse_args()
    shape = bundled_model_shape()
    roof = measure(args.threads)
    for line in describe(roof, shape):
        print(line)
    if args.shapes:
        from strata.engine.weights import bundled_model_path, load_config

        c = load_config(bundled_model_path())
        qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_size
        shapes = {"qkv": (c.hidden_size, qkv), "o": (c.num_attention_heads * c.head_size, c.hidden_size),
                  "gate_up": (c.hidden_size, 2 * c.intermediate_size),
                  "down": (c.intermediate_size, c.hidden_size), "lm_head": (c.hidden_size, c.vocab_size)}
        for line in shape_table(args.threads, shapes, [int(r) for r in args.shapes.split(",")]):
            print(line)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(roof.to_dict(shape), indent=2) + "\n")


if __name__ == "__main__":
    main()
