"""A stage pipeline over a sliding-window (Mistral) model: each stage's layers keep their
windows, the head gives back blocks before the window, and the greedy output is the
single engine's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from strata.engine.sampling import SamplingParams
from strata.engine.tokenizer import load_tokenizer
from tests.stages.test_pipeline import NUM_BLOCKS, Parts, Pipeline, engine_generate

WINDOW = 12


@pytest.fixture(scope="module")
def mistral_parts(tmp_path_factory: pytest.TempPathFactory, bundled_gguf: Path) -> Parts:
    out = tmp_path_factory.mktemp("tiny-mistral")
    tokenizer = load_tokenizer(bundled_gguf)
    torch.manual_seed(7)
    hf = MistralConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        sliding_window=WINDOW, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_ids[0],
    )
    MistralForCausalLM(hf).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Parts(out)


def test_pipeline_greedy_equals_single_engine(mistral_parts: Parts) -> None:
    g = torch.Generator().manual_seed(8)
    vocab = mistral_parts.config.vocab_size
    # Longer than the 48-token step budget: chunked prefill over gathered context.
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (30, 70, 100)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = engine_generate(mistral_parts, prompts, params)
    pipe = Pipeline(mistral_parts, [(0, 1), (1, 3)], {}, inflight=2)
    blocks = pipe.core.blocks
    assert blocks.sliding_window == WINDOW
    given_back: list[int] = []
    release = blocks.release_before_window

    def counted(seq):  # type: ignore[no-untyped-def]
        before = seq.num_released_blocks
        release(seq)
        given_back.append(seq.num_released_blocks - before)

    blocks.release_before_window = counted  # type: ignore[method-assign]
    assert [layer.self_attn.window for layer in mistral_parts.part(1, 3).layers] == [WINDOW, WINDOW]
    assert pipe.generate(prompts, params) == want
    # A sequence ends with P + 15 tokens computed; a next query would see keys from
    # P + 4 on: its blocks of 16 wholly before that were given back while it ran.
    assert sum(given_back) == sum((len(p) + 4) // 16 for p in prompts) == 12
    assert blocks.num_free_blocks == NUM_BLOCKS


@pytest.fixture(scope="module")
def gemma_parts(tmp_path_factory: pytest.TempPathFactory, bundled_gguf: Path) -> Parts:
    from tests.engine.test_gemma3 import hf_gemma

    out = tmp_path_factory.mktemp("tiny-gemma3")
    tokenizer = load_tokenizer(bundled_gguf)
    hf_gemma(vocab=tokenizer.vocab_size).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Parts(out)


def test_gemma3_pipeline_greedy_equals_single_engine(gemma_parts: Parts) -> None:
    """Gemma 3's sliding layers (their own RoPE base, their window) and global layers split
    over a head and a stage: the head holds two sliding layers, the stage the rest."""
    from tests.engine.test_gemma3 import WINDOW as GEMMA_WINDOW
    from tests.engine.test_gemma3 import hf_gemma

    g = torch.Generator().manual_seed(9)
    vocab = gemma_parts.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (20, 60)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = engine_generate(gemma_parts, prompts, params)
    ref = hf_gemma(vocab=vocab)  # the same seeded weights the fixture saved
    with torch.no_grad():
        for prompt, got in zip(prompts, want, strict=True):
            greedy = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
            assert got == greedy
    pipe = Pipeline(gemma_parts, [(0, 2), (2, 5)], {}, inflight=2)
    assert pipe.core.blocks.sliding_window is None  # global layers keep every block
    assert [layer.self_attn.window for layer in gemma_parts.part(2, 5).layers] == [None, GEMMA_WINDOW, None]
    assert pipe.generate(prompts, params) == want
