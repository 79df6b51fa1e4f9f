"""Pure helpers of the engine benchmark scripts: CPU parsing, rooflines, peer build flags."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    """Import a benchmarks/ script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


roofline = _load("roofline")
peers = _load("peers")

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
flags\t\t: fpu sse avx avx2 fma f16c avx512f avx512_vnni avx512vbmi avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
flags\t\t: fpu sse avx avx2 fma f16c avx512f avx512_vnni avx512vbmi avx512_bf16 amx_bf16 amx_tile
"""


def test_parse_cpuinfo_keeps_model_count_and_matmul_flags() -> None:
    cpu = roofline.parse_cpuinfo(CPUINFO)
    assert cpu.model == "Intel(R) Xeon(R) Processor @ 2.80GHz"
    assert cpu.logical_cpus == 2
    assert "fpu" not in cpu.flags and "avx512_vnni" in cpu.flags
    assert cpu.has_amx and cpu.has_avx512_bf16
    bare = roofline.parse_cpuinfo("processor : 0\nflags : avx2 fma\n")
    assert not bare.has_amx and not bare.has_avx512_bf16 and bare.model == "unknown CPU"


def test_smollm2_shape_matches_its_published_size() -> None:
    # SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, MLP 1536, vocab 49152, tied head.
    shape = roofline.llama_shape("smollm2", 576, 1536, 30, 9, 3, 49152)
    assert shape.matmul_params == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) \
        + 576 * 49152
    assert shape.matmul_params == pytest.approx(134.5e6, rel=0.01)
    assert shape.flops_per_token == 2 * shape.matmul_params


def test_roofline_is_min_of_compute_and_c_times_bandwidth() -> None:
    cpu = roofline.parse_cpuinfo(CPUINFO)
    shape = roofline.ModelShape("m", matmul_params=100_000_000)
    roof = roofline.Roofline(cpu=cpu, threads=2, read_gbps=20.0,
                             matmul_tflops={"float32": 0.4, "bfloat16": 2.0, "int8": 1.0})
    assert roof.compute_tokens_s(shape, "bfloat16") == pytest.approx(10_000)
    assert roof.bandwidth_tokens_s(shape, "bfloat16") == pytest.approx(100)
    assert roof.at_concurrency(shape, "bfloat16", 1) == pytest.approx(100)
    assert roof.at_concurrency(shape, "bfloat16", 64) == pytest.approx(6_400)
    assert roof.at_concurrency(shape, "bfloat16", 256) == pytest.approx(10_000)
    # Q4_1 weights: 0.625 bytes each; matmuls at the int8 rate when asked.
    assert roof.at_concurrency(shape, "q4_1", 1, "int8") == pytest.approx(320)
    assert roof.at_concurrency(shape, "q4_1", 64, "int8") == pytest.approx(5_000)
    assert roof.best_compute(shape) == ("bfloat16", pytest.approx(10_000))
    assert roof.to_dict(shape)["best_compute_dtype"] == "bfloat16"


def test_ggml_flags_follow_the_cpu_and_never_enable_amx() -> None:
    args = peers.ggml_cmake_args({"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni"})
    assert "-DGGML_NATIVE=OFF" in args
    assert "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_VNNI=ON" in args
    assert "-DGGML_AVX512_BF16=OFF" in args  # absent flag: the kernels would SIGILL
    assert all(a.endswith("=OFF") for a in args if "AMX" in a)
    amx = peers.ggml_cmake_args({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    assert "-DGGML_AVX512_BF16=ON" in amx and "-DGGML_AMX_BF16=OFF" in amx


def _level(server: str, c: int, tok_s: float, tpot_ms: float, neighbour: bool = False) -> object:
    engine = _load("engine")
    return engine.LevelResult(
        server=server, concurrency=c, requests=4, completed=4, output_tokens_s=tok_s,
        ttft_p50_ms=100.0, ttft_p99_ms=120.0, tpot_p50_ms=tpot_ms, tpot_p99_ms=tpot_ms,
        duration_s=10.0, mean_output_tokens=128.0, early_stops=0, prompt_token_mismatches=0,
        errors={}, roofline_tokens_s=200.0, weight_format="float32", neighbour=neighbour)


def test_best_peer_ignores_strata_variants_and_targets_use_ratios() -> None:
    engine = _load("engine")
    results = [_level("strata", 16, 300.0, 50.0), _level("strata --dtype int8", 16, 900.0, 20.0),
               _level("vllm", 16, 150.0, 90.0), _level("llama-server", 16, 100.0, 120.0),
               _level("strata", 1, 20.0, 50.0), _level("llama-server", 1, 80.0, 12.0)]
    assert engine.best_peer(results, 16).server == "vllm"
    assert engine.is_strata("strata --dtype int8") and not engine.is_strata("stratax")
    cpu = roofline.parse_cpuinfo(CPUINFO)
    roof = roofline.Roofline(cpu=cpu, threads=2, read_gbps=20.0,
                             matmul_tflops={"float32": 0.4, "bfloat16": 2.0})
    shape = roofline.ModelShape("m", matmul_params=100_000_000)
    checks = {c["target"]: c for c in engine.verdicts(results, roof, shape, "float32")}
    peer16 = next(c for t, c in checks.items() if "c=16" in t)
    assert peer16["value"] == pytest.approx(2.0) and peer16["met"]
    tpot = next(c for t, c in checks.items() if "TPOT" in t)
    assert tpot["value"] == pytest.approx(50.0 / 12.0) and not tpot["met"]


def test_parse_args_accepts_several_strata_variants() -> None:
    engine = _load("engine")
    opts = engine.parse_args(["--strata-args", "", "--strata-args", "--dtype int8",
                              "--concurrency", "1,4"])
    assert opts.strata_variants == ((), ("--dtype", "int8"))
    assert opts.concurrency == (1, 4)
    assert engine.requests_for(opts, 1) == 4 and engine.requests_for(opts, 64) == 64
    assert engine.prompt_offset(opts, 1) == engine.WARMUP
    assert engine.prompt_offset(opts, 4) == engine.WARMUP + 4


def test_neighbour_passes_get_prompts_of_their_own() -> None:
    engine = _load("engine")
    quiet = engine.parse_args(["--concurrency", "1,4"])
    opts = engine.parse_args(["--concurrency", "1,4", "--neighbour"])
    assert quiet.neighbour_cpu is None and opts.neighbour_cpu in engine.os.sched_getaffinity(0)
    assert engine.neighbour_passes(quiet) == [False]
    assert engine.neighbour_passes(opts) == [False, True]
    ranges = [(engine.prompt_offset(opts, c, nb), engine.requests_for(opts, c))
              for nb in (False, True) for c in (1, 4)]
    used = [i for first, n in ranges for i in range(first, first + n)]
    assert len(used) == len(set(used)) and min(used) == engine.WARMUP
    assert engine.prompt_offset(opts, None) == max(used) + 1
    assert engine.prompt_offset(quiet, None) == engine.WARMUP + 4 + 8


def test_neighbour_shares_and_targets() -> None:
    engine = _load("engine")
    results = [_level("strata", 4, 100.0, 30.0), _level("strata", 4, 60.0, 50.0, True),
               _level("vllm", 4, 90.0, 36.0), _level("vllm", 4, 81.0, 38.0, True),
               _level("strata", 64, 400.0, 100.0), _level("strata", 64, 100.0, 400.0, True)]
    rows = engine.neighbour_rows(results)
    assert [(r["server"], r["concurrency"]) for r in rows] == [
        ("strata", 4), ("vllm", 4), ("strata", 64)]
    assert rows[0]["share"] == pytest.approx(0.6)
    assert rows[0]["tpot_factor"] == pytest.approx(50.0 / 30.0)
    checks = {c["target"]: c for c in engine.neighbour_verdicts(rows, "strata")}
    half4 = next(c for t, c in checks.items() if "c=4" in t and "50%" in t)
    peer4 = next(c for t, c in checks.items() if "c=4" in t and "peer" in t)
    half64 = next(c for t, c in checks.items() if "c=64" in t and "50%" in t)
    assert half4["met"] and not peer4["met"]  # 0.6 of quiet, but vllm kept 0.9
    assert half64["value"] == pytest.approx(0.25) and not half64["met"]
    assert "share of quiet" in engine.neighbour_markdown(rows, 1, list(checks.values()))


def test_busy_neighbour_is_pinned_and_stopped() -> None:
    engine = _load("engine")
    cpu = max(engine.os.sched_getaffinity(0))
    with engine.busy_neighbour(cpu, settle_s=0.0) as proc:
        assert engine.os.sched_getaffinity(proc.pid) == {cpu}
        assert proc.poll() is None
    assert proc.poll() is not None
