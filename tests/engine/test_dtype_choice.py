"""`--dtype auto`: the decision on measured numbers, the measurement on the real shapes, and
the prepacked oneDNN linear it measures against the fp32 reference."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from strata.engine.dtype_choice import (
    DECODE_ROWS,
    PathSpeed,
    _bf16_available,
    candidates,
    choose,
    choose_dtype,
    measure_paths,
)
from strata.engine.model import _padded_linear
from strata.engine.weights import load_config


def _speed(per_token_us: float) -> PathSpeed:
    """A path whose every measurement costs ``per_token_us`` per token."""
    return PathSpeed(decode_s={m: m * per_token_us * 1e-6 for m in DECODE_ROWS},
                     prefill_s=512 * per_token_us * 1e-6)


def test_choose_takes_the_lower_quality_path_only_when_clearly_faster() -> None:
    # An AMX machine: bf16 several times fp32, int8 (VNNI) slower than bf16.
    assert choose({"float32": _speed(4000), "bfloat16": _speed(800), "int8": _speed(1900)}) == "bfloat16"
    # AVX-512 without bf16 units: emulated bf16 loses; int8 on VNNI wins by more than MIN_GAIN.
    assert choose({"float32": _speed(3000), "bfloat16": _speed(5000), "int8": _speed(1200)}) == "int8"
    # Within the margin, quality wins.
    assert choose({"float32": _speed(1000), "bfloat16": _speed(900), "int8": _speed(850)}) == "float32"
    assert choose({"float32": _speed(3000), "bfloat16": _speed(1000), "int8": _speed(900)}) == "bfloat16"
    assert choose({"float32": _speed(1000)}) == "float32"
    with pytest.raises(ValueError):
        choose({})


def test_cost_weighs_decode_batches_and_the_prefill_chunk() -> None:
    fast_prefill = PathSpeed(decode_s={16: 16e-3, 64: 64e-3}, prefill_s=512e-4)
    assert fast_prefill.cost_per_token_s() == pytest.approx((1e-3 + 1e-3 + 1e-4) / 3)


def test_explicit_dtypes_are_kept(bundled_gguf: Path) -> None:
    config = load_config(bundled_gguf)
    cpu = torch.device("cpu")
    assert choose_dtype("float32", cpu, config).torch_dtype == torch.float32
    assert not choose_dtype("bfloat16", cpu, config).file_blocks  # as asked: no hybrid
    int8 = choose_dtype("int8", cpu, config)
    assert (int8.name, int8.torch_dtype, int8.file_blocks) == ("int8", torch.float32, True)
    with pytest.raises(ValueError, match="dtype must be"):
        choose_dtype("fp8", cpu, config)


def test_auto_measures_the_real_shapes_and_is_quick(bundled_gguf: Path) -> None:
    config = load_config(bundled_gguf)
    torch.set_num_threads(1)
    t = time.perf_counter()
    choice = choose_dtype("auto", torch.device("cpu"), config)
    elapsed = time.perf_counter() - t
    assert choice.name in candidates(torch.device("cpu"))
    assert choice.file_blocks
    # About a second on a quiet 2-core machine; generous for a busy one.
    assert elapsed < 10, elapsed
    speed = measure_paths(["float32"], config, rounds=1)["float32"]
    assert set(speed.decode_s) == set(DECODE_ROWS)
    assert all(t > 0 for t in speed.decode_s.values()) and speed.prefill_s > 0
    assert "int8" not in candidates(torch.device("cpu"), allow_int8=False)


@pytest.mark.skipif(not _bf16_available(), reason="no oneDNN bf16 kernels on this CPU")
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 100, 600])
def test_prepacked_linear_matches_the_fp32_reference(rows: int) -> None:
    """The prepacked oneDNN linear (bf16 serving path) computes what F.linear does."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(960, 576, generator=g) * 0.05
    b = torch.randn(960, generator=g)
    x = torch.randn(rows, 576, generator=g)
    ref = F.linear(x, w, b)
    got = _padded_linear(w.bfloat16(), b.bfloat16())(x.bfloat16())
    assert got.shape == (rows, 960) and got.dtype == torch.bfloat16
    assert float((got.float() - ref).norm() / ref.norm()) < 1e-2
    same_kernel = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
    assert float((got.float() - same_kernel.float()).abs().max()) <= 0.02 * float(ref.abs().max())
