"""GGUF weight formats: K-quants (Q4_K, Q5_K, Q6_K), Q8_0 and the older blocks load as gguf
dequantizes them, and small-batch decode computes from their blocks.

Files are written here with gguf.GGUFWriter from random weights: Q4_1 / Q8_0 / Q4_0 /
Q5_0 / Q5_1 blocks by gguf's own quantizer, K-quant blocks by tests/engine/kquants.py
(gguf-py cannot quantize K-quants). Every check is against gguf's dequantization.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from torch import nn

from strata.engine.gguf_blocks import BLOCK_TYPES, SUPPORTED_TENSOR_TYPES, BlockWeights
from strata.engine.gguf_loader import gguf_name, gguf_state_dict, layer_tensor_names, weight_blocks
from strata.engine.kernels import load_paged_attention
from strata.engine.model import LlamaModel
from strata.engine.quant import (
    SMALL_MAX_TOKENS,
    FileBlocks,
    Int8Linear,
    blocks_available,
    quantize_model,
)
from strata.engine.weights import load_config, load_state_dict

from .kquants import LAYERS, RECIPES, VOCAB, write_gguf


@pytest.fixture(scope="module", params=list(RECIPES))
def quant_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", request.param)


def test_blocks_are_exactly_what_gguf_dequantizes(quant_file: Path) -> None:
    """Every matrix's blocks (q/k rows un-permuted) equal gguf's dequantization bit for bit."""
    config = load_config(quant_file)
    names = ["model.embed_tokens.weight"] + [n for i in range(LAYERS) for n in layer_tensor_names(i)
                                              if n.endswith("proj.weight")]
    ref = gguf_state_dict(quant_file, config, names, torch.float32)
    seen = set()
    for name in names:
        blocks = weight_blocks(quant_file, config, name)
        assert blocks is not None, name
        seen.add(blocks.kind)
        got = blocks.dequantize()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), ref[name].numpy().view(np.uint32), err_msg=name)
    assert seen  # and the norms, stored F32, have no blocks
    assert weight_blocks(quant_file, config, "model.layers.0.input_layernorm.weight") is None


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_1", "Q4_0", "Q5_0", "Q5_1"])
def test_each_format_loads_as_gguf_dequantizes_it(kind: str, tmp_path: Path) -> None:
    """The dequantized weights are gguf's, and near the same weights stored Q8_0 (a valid file)."""
    name = "model.layers.1.mlp.down_proj.weight"
    loaded = {}
    for k in (kind, "Q8_0"):
        path = write_gguf(tmp_path / f"{k}.gguf", k)
        raw = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == gguf_name(name))
        assert raw.tensor_type.name == k
        loaded[k] = gguf_state_dict(path, load_config(path), [name], torch.float32)[name].numpy()
        np.testing.assert_array_equal(loaded[k], dequantize(raw.data, raw.tensor_type))
    rel = np.linalg.norm(loaded[kind] - loaded["Q8_0"]) / np.linalg.norm(loaded["Q8_0"])
    assert rel < 0.12, rel


def test_unsupported_weight_type_is_refused_at_load_naming_the_supported(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "q2k.gguf", "Q4_K", extra=("ffn_up", "Q2_K"))
    with pytest.raises(ValueError, match="Q2_K") as err:
        load_config(path)
    for kind in SUPPORTED_TENSOR_TYPES:
        assert kind in str(err.value)


needs_blocks = pytest.mark.skipif(not (load_paged_attention() and blocks_available()),
                                  reason="no AVX-512 VNNI block kernels on this CPU")


def _emulate(x: torch.Tensor, b: BlockWeights) -> torch.Tensor:
    """The kernels' arithmetic in float64: x quantized to int8 per 32 inputs (scale max|x|/127),
    integer dot per weight group, times both scales; plus m times the exact block sums
    (codes with a minimum are centred: q - 8 (4-bit) or q - 16 (5-bit) in the dot, m plus
    that many d on the sums)."""
    centre = 0 if b.m is None else 8 if b.kind == "q4" else 16
    t, k = x.shape
    xb = x.double().reshape(t, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    qx = torch.round(xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    dx = (amax.float() / 127.0).double()  # the kernel rounds its scale to float32
    g = b.group
    codes = torch.from_numpy(b.codes.astype(np.float64) - centre).reshape(b.codes.shape[0], k // g, g)
    dots = torch.einsum("tbj,nbj->tnb", qx.reshape(t, k // g, g), codes)
    dxg = dx[..., 0].repeat_interleave(32 // g, dim=1)
    y = (dots * torch.from_numpy(b.d.astype(np.float64))[None] * dxg[:, None, :]).sum(-1)
    if b.m is not None:
        m = b.m.astype(np.float64) + centre * b.d.astype(np.float64)
        y = y + xb.sum(-1) @ torch.from_numpy(m).T
    return y


@needs_blocks
@pytest.mark.parametrize("vectorized", [True, False])
def test_block_kernels_compute_from_k_quant_blocks(quant_file: Path, vectorized: bool) -> None:
    """Each matrix through its native op: its arithmetic exactly, and near x @ W.T."""
    config = load_config(quant_file)
    g = torch.Generator().manual_seed(0)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        b = weight_blocks(quant_file, config, name)
        assert b is not None
        linear = Int8Linear(nn.Linear(b.codes.shape[1], b.codes.shape[0], bias=False))
        linear.attach_blocks([b], None, SMALL_MAX_TOKENS)
        op, args = linear._small, list(linear._small_args)
        args[-1 if b.kind == "q4" else -2] = vectorized
        for tokens in (1, 2, 3, 5):
            x = torch.randn(tokens, b.codes.shape[1], generator=g)
            y = op(x, *args)  # type: ignore[operator]
            exact = _emulate(x, b)
            assert torch.allclose(y.double(), exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max())), name
            want = x @ torch.from_numpy(b.dequantize()).T
            assert float((y - want).norm() / want.norm()) < 0.02, name


@needs_blocks
def test_int8_decode_runs_on_the_file_blocks_and_stays_close(quant_file: Path) -> None:
    """`--dtype int8` on a GGUF: every projection and the head get the file's blocks (mixed
    formats in one fused projection too), and decode through them tracks the fp32 model."""
    config = load_config(quant_file)
    model = LlamaModel(config)
    model.load_weights(load_state_dict(quant_file, config, dtype=torch.float32))
    model.eval()
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = torch.log_softmax(model.compute_logits(model(ids, torch.arange(len(ids)))), -1)
    quantize_model(model, ids[:24].tolist(), blocks=FileBlocks(functools.partial(weight_blocks, quant_file, config)),
                   small_max_tokens=1 << 30)
    for layer in model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert linear.small_max_tokens == 1 << 30
    assert model.lm_head.small_max_tokens == 1 << 30
    with torch.inference_mode():
        lp = torch.log_softmax(model.compute_logits(model(ids, torch.arange(len(ids)))), -1)
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    assert kl < 0.01, kl
    assert (lp.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


def test_block_types_are_supported_types() -> None:
    assert set(BLOCK_TYPES) <= set(SUPPORTED_TENSOR_TYPES)
