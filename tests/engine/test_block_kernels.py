"""The native small-batch kernels on the model file's own blocks: q4_linear (Q4_1), q8_linear (Q8_0).

Each is checked against an exact emulation of its arithmetic in torch (weights from the
blocks, activations quantized per 32 inputs to int8 with scale max|x|/127, round half to
even), and against the plain float product within the error that activation rounding
allows; the AVX-512 path against the scalar one; and the loaders against the dequantized
weights of the bundled GGUF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from strata.engine.gguf_loader import gguf_state_dict, weight_blocks
from strata.engine.kernels import load_paged_attention
from strata.engine.quant import pack_q4_1
from strata.engine.weights import load_config

pytestmark = pytest.mark.skipif(not load_paged_attention(), reason="native kernels not built")


def _random_q4(n: int, k: int, g: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8).numpy()
    d = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half().numpy()
    m = (-8 * d.astype(np.float32) + torch.randn(n, k // 32, generator=g).numpy() * 0.01).astype(np.float16)
    return codes, d, m


def _dequant_q4(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> torch.Tensor:
    n, k = codes.shape
    w = codes.reshape(n, -1, 32).astype(np.float32) * d[..., None].astype(np.float32) + m[..., None].astype(np.float32)
    return torch.from_numpy(w.reshape(n, k))


def _quant_acts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32 int8 activations as the kernels make them: (codes as float, scale) per block."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(xb * inv), amax / 127.0


def _emulate_q4(x: torch.Tensor, codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> torch.Tensor:
    """y = sum over blocks of d*dx*sum((q-8)*qx) + (m+8d)*sum(x), in float64."""
    q, dx = _quant_acts(x)
    n, k = codes.shape
    c = torch.from_numpy(codes.astype(np.float64)).reshape(n, k // 32, 32) - 8
    dd = torch.from_numpy(d.astype(np.float64))
    m8 = torch.from_numpy(m.astype(np.float64)) + 8 * dd
    dots = torch.einsum("tbj,nbj->tnb", q.double(), c)
    sums = x.double().reshape(x.shape[0], k // 32, 32).sum(-1)
    return (dots * dd[None] * dx.double()[:, None, :, 0]).sum(-1) + sums @ m8.T


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize(("n", "k"), [(1, 64), (5, 576), (17, 1536), (64, 128)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9])
def test_q4_linear_computes_its_arithmetic(vectorized: bool, n: int, k: int, tokens: int) -> None:
    g = torch.Generator().manual_seed(n * 1000 + k + tokens)
    codes, d, m = _random_q4(n, k, g)
    x = torch.randn(tokens, k, generator=g)
    y = torch.ops.strata.q4_linear(x, *pack_q4_1(codes, d, m), None, vectorized)
    assert y.shape == (tokens, n) and y.dtype == torch.float32
    exact = _emulate_q4(x, codes, d, m)
    assert torch.allclose(y.double(), exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    ref = x @ _dequant_q4(codes, d, m).T
    assert float((y - ref).norm() / ref.norm()) < 0.02


def test_q4_linear_col_scale_multiplies_the_input_and_zero_input_gives_zero() -> None:
    g = torch.Generator().manual_seed(1)
    codes, d, m = _random_q4(48, 576, g)
    packed = pack_q4_1(codes, d, m)
    x = torch.randn(3, 576, generator=g)
    cs = torch.rand(576, generator=g) + 0.5
    a = torch.ops.strata.q4_linear(x, *packed, cs, True)
    b = torch.ops.strata.q4_linear(x * cs, *packed, None, True)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    z = torch.ops.strata.q4_linear(torch.zeros(2, 576), *packed, None, True)
    assert torch.equal(z, torch.zeros(2, 48))


def test_block_kernels_give_the_same_result_on_one_and_two_threads() -> None:
    g = torch.Generator().manual_seed(2)
    codes, d, m = _random_q4(1000, 576, g)
    packed = pack_q4_1(codes, d, m)
    q8 = torch.randint(-127, 128, (1000, 576), generator=g, dtype=torch.int8)
    d8 = (torch.rand(1000, 18, generator=g) * 0.01).half()
    x = torch.randn(2, 576, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.strata.q4_linear(x, *packed, None, True), torch.ops.strata.q8_linear(x, q8, d8, None, True)
        torch.set_num_threads(2)
        two = torch.ops.strata.q4_linear(x, *packed, None, True), torch.ops.strata.q8_linear(x, q8, d8, None, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("tokens", [1, 4, 7])
def test_q8_linear_computes_its_arithmetic(vectorized: bool, tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    n, k = 37, 576
    qs = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    d = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4).half()
    x = torch.randn(tokens, k, generator=g)
    y = torch.ops.strata.q8_linear(x, qs, d, None, vectorized)
    q, dx = _quant_acts(x)
    dots = torch.einsum("tbj,nbj->tnb", q.double(), qs.double().reshape(n, k // 32, 32))
    exact = (dots * d.double()[None] * dx.double()[:, None, :, 0]).sum(-1)
    assert torch.allclose(y.double(), exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    w = (qs.float().reshape(n, -1, 32) * d.float()[..., None]).reshape(n, k)
    ref = x @ w.T
    assert float((y - ref).norm() / ref.norm()) < 0.02


def test_block_kernels_refuse_bad_shapes() -> None:
    codes, d, m = _random_q4(4, 64, torch.Generator().manual_seed(0))
    packed = pack_q4_1(codes, d, m)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.strata.q4_linear(torch.randn(1, 32), packed[0][:, :16].contiguous(), packed[1][:, :1].contiguous(),
                                   packed[2][:, :1].contiguous(), None, True)
    with pytest.raises(RuntimeError, match="qs"):
        torch.ops.strata.q4_linear(torch.randn(1, 128), *packed, None, True)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.strata.q4_linear(torch.randn(1, 64).double(), *packed, None, True)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.strata.q8_linear(torch.randn(1, 64), torch.zeros(2, 64, dtype=torch.uint8),
                                   torch.zeros(2, 2, dtype=torch.half), None, True)
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_q4_1(np.zeros((2, 32), np.uint8), np.zeros((2, 1), np.float16), np.zeros((2, 1), np.float16))


def test_file_blocks_are_the_dequantized_weights(bundled_gguf: Path) -> None:
    config = load_config(bundled_gguf)
    names = ["model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight",
             "model.layers.2.mlp.down_proj.weight", "model.embed_tokens.weight"]
    ref = gguf_state_dict(bundled_gguf, config, names, torch.float32)
    for name in names:  # q and k rows come back un-permuted, like the dequantized weights
        blocks = weight_blocks(bundled_gguf, config, name)
        assert blocks is not None
        assert (blocks.kind, blocks.d.dtype) == (("q8" if "embed" in name else "q4"), np.float16)
        assert torch.equal(torch.from_numpy(blocks.dequantize()), ref[name])
    q = weight_blocks(bundled_gguf, config, names[0])
    assert q is not None and torch.equal(_dequant_q4(q.codes, q.d, q.m), ref[names[0]])  # w = d*code + m
    # A format without blocks (the norms are F32): None, not a wrong decode.
    assert weight_blocks(bundled_gguf, config, "model.norm.weight") is None
