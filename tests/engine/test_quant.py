"""int8 weights: SmoothQuant folding keeps the function, and the quantized model stays close.

On the real bundled model. Plain per-tensor W8A8 on every projection (what fbgemm's
dynamic linear does) changes the greedy next token at ~40% of positions here; strata's
int8 must stay close to fp32 (KL and top-1 agreement), or `--dtype int8` would quietly
serve a different model. The batch-1 decode path on the file's own blocks must be closer
still.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch

from strata.engine.gguf_loader import weight_blocks
from strata.engine.model import LlamaModel
from strata.engine.quant import (
    CALIBRATION_TEXT,
    SMALL_MAX_TOKENS,
    BlockHybridLinear,
    FileBlocks,
    Fp16Linear,
    Int8Linear,
    attach_hybrid_blocks,
    blocks_available,
    int8_supported,
    quantize_model,
    smooth_quant_,
)
from strata.engine.tokenizer import load_tokenizer
from strata.engine.weights import load_config, load_state_dict

pytestmark = pytest.mark.skipif(not int8_supported(), reason="no x86 int8 backend in this torch")

# Held out from the calibration text.
EVAL_TEXT = (
    "The scheduler decides, at every step, which sequences run: decodes first, then chunks "
    "of waiting prompts under a token budget. When the cache runs out of blocks, the newest "
    "sequence is preempted and its blocks are freed; it is recomputed later. Meanwhile the "
    "gateway routes each request to the replica whose free resources best fit it. "
    "def area(r):\n    return 3.14159 * r * r\n\nprint(area(2.5))\n"
    "In 1969 the first humans walked on the Moon; the mission lasted eight days."
)


@pytest.fixture(scope="module")
def fp32_model(bundled_gguf: Path) -> tuple[LlamaModel, object]:
    torch.set_num_threads(1)
    config = load_config(bundled_gguf)
    model = LlamaModel(config)
    model.load_weights(load_state_dict(bundled_gguf, config, dtype=torch.float32))
    model.gguf_path = bundled_gguf  # type: ignore[attr-defined]
    return model.eval(), load_tokenizer(bundled_gguf)


def _logprobs(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model.compute_logits(model(ids, torch.arange(len(ids)))), dim=-1)


def test_smoothing_keeps_the_fp32_function(fp32_model) -> None:  # type: ignore[no-untyped-def]
    model, tok = fp32_model
    ids = torch.tensor(tok.encode(EVAL_TEXT))
    smoothed = copy.deepcopy(model)
    smooth_quant_(smoothed, tok.encode(CALIBRATION_TEXT))
    assert not torch.equal(smoothed.layers[0].input_layernorm, model.layers[0].input_layernorm)
    diff = (_logprobs(smoothed, ids) - _logprobs(model, ids)).abs().max().item()
    assert diff < 1e-3


def test_int8_model_stays_close_to_fp32(fp32_model) -> None:  # type: ignore[no-untyped-def]
    model, tok = fp32_model
    ids = torch.tensor(tok.encode(EVAL_TEXT))
    ref = _logprobs(model, ids)
    q = copy.deepcopy(model)
    assert quantize_model(q, tok.encode(CALIBRATION_TEXT)) == 4 * len(model.layers) + 1
    assert isinstance(q.layers[0].self_attn.qkv_proj, Int8Linear)
    assert isinstance(q.layers[0].mlp.down_proj, Fp16Linear)
    lp = _logprobs(q, ids)
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    # Measured: KL 0.010, top-1 93% (0.031 / 89% before the head was smoothed too).
    assert kl < 0.03, kl
    assert top1 > 0.85, top1


def _file_blocks(model: LlamaModel) -> FileBlocks:
    path = model.gguf_path  # type: ignore[attr-defined]
    return FileBlocks(functools.partial(weight_blocks, path, model.config))


@pytest.mark.skipif(not blocks_available(), reason="no AVX-512 VNNI block kernels on this CPU")
def test_single_token_calls_run_on_the_file_blocks(fp32_model) -> None:  # type: ignore[no-untyped-def]
    model, tok = fp32_model
    q = copy.deepcopy(model)
    quantize_model(q, tok.encode(CALIBRATION_TEXT), blocks=_file_blocks(model))
    layer = q.layers[3]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                   layer.mlp.down_proj, q.lm_head):
        n = linear.small_max_tokens
        assert n == SMALL_MAX_TOKENS
        x = torch.randn(n + 1, linear.in_features)
        # Up to n rows: the block kernel; more: fbgemm. Both approximate the same weights.
        one = linear.forward_2d(x[:n])
        assert torch.equal(one, linear._small(x[:n], *linear._small_args))
        assert torch.equal(linear.forward_2d(x), linear.packed_forward(x))
        rel = float((one - linear.packed_forward(x[:n])).norm() / one.norm())
        assert rel < 0.05, rel


@pytest.mark.skipif(not blocks_available(), reason="no AVX-512 VNNI block kernels on this CPU")
def test_the_decode_path_on_file_blocks_stays_closer_to_fp32(fp32_model) -> None:  # type: ignore[no-untyped-def]
    """Every call through the block kernels (as batch-1 decode runs): the weights are the
    file's exactly, the SmoothQuant scale is undone on the activations, so only per-32
    activation rounding remains."""
    model, tok = fp32_model
    ids = torch.tensor(tok.encode(EVAL_TEXT))
    ref = _logprobs(model, ids)
    q = copy.deepcopy(model)
    quantize_model(q, tok.encode(CALIBRATION_TEXT), blocks=_file_blocks(model), small_max_tokens=1 << 30)
    lp = _logprobs(q, ids)
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert kl < 0.01, kl
    assert top1 > 0.9, top1


def _bf16_hybrid(model: LlamaModel, small_max_tokens: int = SMALL_MAX_TOKENS) -> LlamaModel:
    """The bundled model as `--dtype auto` serves it on a bf16 CPU: bf16 GEMMs for batches,
    the file's blocks for calls of few rows."""
    h = copy.deepcopy(model).to(torch.bfloat16)
    assert attach_hybrid_blocks(h, _file_blocks(model), small_max_tokens) == 4 * len(model.layers) + 1
    return h


@pytest.mark.skipif(not blocks_available(), reason="no AVX-512 VNNI block kernels on this CPU")
def test_hybrid_calls_of_few_rows_run_on_the_file_blocks(fp32_model) -> None:  # type: ignore[no-untyped-def]
    model, _ = fp32_model
    h = _bf16_hybrid(model)
    for linear in (h.layers[2].self_attn.qkv_proj, h.layers[2].mlp.down_proj, h.lm_head):
        assert isinstance(linear, BlockHybridLinear)
        x = torch.randn(SMALL_MAX_TOKENS + 1, linear.in_features).to(torch.bfloat16)
        few = linear.forward_2d(x[:SMALL_MAX_TOKENS])
        assert few.dtype == torch.bfloat16
        assert torch.equal(few, linear._small(x[:SMALL_MAX_TOKENS].float(), *linear._small_args).bfloat16())
        many = linear.forward_2d(x)
        ref = torch.nn.functional.linear(x.float(), linear.linear.weight.detach().float())
        assert float((many.float() - ref).norm() / ref.norm()) < 0.01


@pytest.mark.skipif(not blocks_available(), reason="no AVX-512 VNNI block kernels on this CPU")
@pytest.mark.parametrize("small_max_tokens", [SMALL_MAX_TOKENS, 1 << 30])
def test_the_hybrid_default_stays_close_to_fp32(fp32_model, small_max_tokens: int) -> None:  # type: ignore[no-untyped-def]
    """Both halves of the auto default: the bf16 GEMM (prompt rows) and every call on the
    file's blocks (as batch-1 decode runs them), against the fp32 model."""
    model, tok = fp32_model
    ids = torch.tensor(tok.encode(EVAL_TEXT))
    ref = _logprobs(model, ids)
    lp = _logprobs(_bf16_hybrid(model, small_max_tokens), ids)
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert kl < 0.01, kl
    assert top1 > 0.9, top1
