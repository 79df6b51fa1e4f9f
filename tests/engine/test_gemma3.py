"""Gemma 3 text against transformers' Gemma3ForCausalLM.

Tiny random models written by transformers, run by strata's one layer-range model:
alternating sliding and global layers with their own RoPE bases, (1 + w) RMSNorms around
attention and MLP, q/k norms, GeLU-tanh MLP, scaled embeddings, query_pre_attn_scalar and
the final logit soft-cap. The plain forward, the engine's paged path (scheduler + runner,
native and torch attention) in float32, bfloat16 and int8, layer-range parts, and an HF
directory through strata's loaders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from strata.engine.model import LlamaModel
from strata.engine.model_config import LlamaConfig
from strata.engine.quant import int8_supported
from strata.engine.weights import load_config, load_state_dict
from tests.engine.test_families import (
    NATIVE,
    TORCH,
    VOCAB,
    _engine_rows,
    _reference_rows,
    assert_close_with_clear_top,
    assert_engine_greedy_as_transformers,
    assert_parts_compose,
    int8_kl_and_agreement,
    serve_greedy,
)

WINDOW = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention",
               "sliding_attention", "full_attention"]


def hf_gemma(tied: bool = True, softcap: float | None = None, seed: int = 0,
             vocab: int = VOCAB) -> Gemma3ForCausalLM:
    """A tiny random Gemma 3 whose every Gemma feature moves the logits: local and global
    bases far apart, query_pre_attn_scalar not head_dim, head_dim not hidden / heads, and
    norms away from their zero init (a (1 + w) mistake or a dropped norm shows)."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        max_position_embeddings=512, sliding_window=WINDOW, layer_types=LAYER_TYPES,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 50000.0},
        },
        tie_word_embeddings=tied, final_logit_softcapping=softcap, rms_norm_eps=1e-6,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):  # peaked attention
                p.add_(0.5 + 0.2 * torch.randn_like(p))
            elif name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def gemma_pair(tied: bool = True, softcap: float | None = None):  # noqa: ANN201
    ref = hf_gemma(tied, softcap)
    ours = LlamaModel(LlamaConfig.from_hf_dict(ref.config.to_dict())).eval()
    ours.load_weights(ref.state_dict())
    return ref, ours


def test_config_switches_on_the_gemma_features() -> None:
    c = LlamaConfig.from_hf_dict(hf_gemma().config.to_dict())
    assert c.model_type == "gemma3_text"
    assert (c.qk_norm, c.norm_offset_one, c.sandwich_norms, c.mlp_act) == (True, True, True, "gelu_tanh")
    assert c.embed_scale == pytest.approx(8.0)
    assert c.attn_scale == pytest.approx(24**-0.5)
    assert (c.rope_theta, c.rope_local_theta) == (50000.0, 100.0)
    assert [c.layer_window(i) for i in range(5)] == [WINDOW, WINDOW, None, WINDOW, None]
    assert [c.layer_rope_local(i) for i in range(5)] == [True, True, False, True, False]
    assert c.kv_window is None  # global layers keep every block


def test_transformers4_style_config_reads_the_local_base() -> None:
    d = {"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
         "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window": 4,
         "sliding_window_pattern": 6, "query_pre_attn_scalar": 8,
         "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": 30.0}
    c = LlamaConfig.from_hf_dict(d)
    assert (c.rope_theta, c.rope_local_theta, c.final_logit_softcapping) == (1e6, 1e4, 30.0)
    assert [c.layer_window(i) for i in range(6)] == [4, 4, 4, 4, 4, None]


@pytest.mark.parametrize("field,value,match", [
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping"),
    ("hidden_activation", "relu", "gelu_pytorch_tanh"),
])
def test_unsupported_gemma_settings_are_refused(field: str, value: object, match: str) -> None:
    d = {**hf_gemma().config.to_dict(), field: value}
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf_dict(d)


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["no-softcap", "softcap"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_match_transformers(tied: bool, softcap: float | None) -> None:
    ref, ours = gemma_pair(tied, softcap)
    ids = torch.randint(3, VOCAB, (1, 41))  # longer than the window
    with torch.no_grad():
        expected = ref(ids).logits[0]
        got = ours.compute_logits(ours(ids[0], torch.arange(41)))
    if softcap is not None:
        assert expected.abs().max().item() < softcap
    assert (expected - got).abs().max().item() < 1e-3


def test_every_gemma_feature_moves_the_logits() -> None:
    """Guards the test models: with any one feature dropped the logits differ (so the
    match above is not an accident of a feature doing nothing on them)."""
    from dataclasses import replace

    ref, ours = gemma_pair()
    ids = torch.randint(3, VOCAB, (41,))
    pos = torch.arange(41)
    with torch.no_grad():
        base = ours.compute_logits(ours(ids, pos))
        for change in (dict(rope_local_theta=50000.0), dict(query_pre_attn_scalar=None),
                       dict(embed_scale=None), dict(mlp_act="silu"), dict(sliding_window=None)):
            other = LlamaModel(replace(ours.config, **change)).eval()
            other.load_weights(ref.state_dict())
            assert (other.compute_logits(other(ids, pos)) - base).abs().max().item() > 1e-2, change


def test_layer_range_parts_compose_to_the_whole() -> None:
    ref, whole = gemma_pair()
    assert_parts_compose(whole, ref.state_dict(), [0, 2, 4, 5])


@pytest.mark.parametrize("native", [NATIVE, TORCH])
def test_engine_float32_gives_transformers_greedy_tokens(native: bool) -> None:
    ref, ours = gemma_pair()
    assert_engine_greedy_as_transformers(ref, ours, native, max_tokens=8)


@pytest.mark.parametrize("native", [NATIVE, TORCH])
def test_engine_bfloat16_stays_close_to_transformers(native: bool) -> None:
    """bf16 rounds (the residual stream, the (1 + w) norm weights): the engine's logits
    stay within twice the distance of transformers' own bf16 run from its fp32 one, and
    wherever fp32's top token leads by more than that, the engine picks it too."""
    ref, ours = gemma_pair()
    ref_bf16 = hf_gemma().to(torch.bfloat16)
    ours = ours.to(torch.bfloat16)
    for prompt, out, rows in _engine_rows(ours, torch.bfloat16, native):
        expected = _reference_rows(ref, prompt, out)
        tol = 2 * (_reference_rows(ref_bf16, prompt, out) - expected).abs().max().item()
        assert tol < 0.25 * expected.abs().max().item()  # transformers' bf16 is itself close
        assert_close_with_clear_top(torch.stack(rows), expected, tol)


@pytest.mark.skipif(not int8_supported(), reason="no x86 int8 backend in this torch")
@pytest.mark.parametrize("native", [NATIVE, TORCH])
def test_engine_int8_stays_close_to_transformers(native: bool) -> None:
    """SmoothQuant folds the gate/up scale into the norm right before the MLP, which for
    Gemma is pre_feedforward_layernorm (folding it into post_attention_layernorm breaks this)."""
    ref, ours = gemma_pair()
    kl, agreement = int8_kl_and_agreement(ref, ours, native)
    # The tiny model's logits are flat (near-ties for the top token), so the KL carries
    # the bound; folding into post_attention_layernorm instead multiplies it many times.
    assert kl < 3e-4
    assert agreement >= 0.85


def test_hf_directory_loads_through_strata(tmp_path: Path) -> None:
    ref = hf_gemma(tied=True)
    ref.save_pretrained(tmp_path)
    assert any(tmp_path.glob("*.safetensors"))
    config = load_config(tmp_path)
    assert config.model_type == "gemma3_text"
    whole = LlamaModel(config).eval()
    whole.load_weights(load_state_dict(tmp_path, config))
    # Stages read only their own layers' tensors, the sandwich norms included.
    first_sd = load_state_dict(tmp_path, config, layers=range(0, 3), include_head=False)
    assert "model.layers.2.post_feedforward_layernorm.weight" in first_sd
    first = LlamaModel(config, 0, 3, has_embed=True, has_head=False).eval()
    first.load_weights(first_sd)
    last = LlamaModel(config, 3, 5, has_embed=False, has_head=True).eval()
    last.load_weights(load_state_dict(tmp_path, config, layers=range(3, 5), include_embed=False))
    ids = torch.randint(3, VOCAB, (33,))
    pos = torch.arange(33)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
        assert (whole.compute_logits(whole(ids, pos)) - expected).abs().max().item() < 1e-3
        assert (last.compute_logits(last(first(ids, pos), pos)) - expected).abs().max().item() < 1e-3


def test_engine_from_directory_gives_transformers_greedy_tokens(bundled_gguf: Path, tmp_path: Path) -> None:
    """`strata engine --model DIR` as it starts (load, size the cache, warm up; the runner's
    rope table beside the model's local one), then greedy decode equal to transformers."""
    from strata.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(bundled_gguf)
    ref = hf_gemma(vocab=tok.vocab_size)
    ref.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompt = tok.encode("The rivers of the world, from the longest to the shortest, are")
    assert len(prompt) > WINDOW
    out, greedy = serve_greedy(tmp_path, "float32", prompt, ref)
    assert out == greedy
