"""Greedy generation with the real bundled model equals transformers' token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strata.engine.engine import EngineConfig, build_engine_core
from strata.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def core(bundled_gguf: Path):
    return build_engine_core(
        EngineConfig(model=str(bundled_gguf), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=64)
    )


def run_to_completion(core, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    base = 10_000
    for i, ids in enumerate(prompts):
        core.add(base + i, ids, params, 0.0)
    out: dict[int, list[int]] = {base + i: [] for i in range(len(prompts))}
    while core.has_work:
        for o in core.step():
            out[o.seq_id] += o.token_ids
    return [out[base + i] for i in range(len(prompts))]


def test_greedy_tokens_equal_transformers(core, bundled_gguf: Path) -> None:
    from transformers import LlamaForCausalLM

    tok = core.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
        for q in ("What is the capital of France?", "Write a haiku about the sea.")
    ]
    n_new = 24
    ours = run_to_completion(
        core, prompts, SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    )
    ref = LlamaForCausalLM.from_pretrained(
        str(bundled_gguf.parent), gguf_file=bundled_gguf.name, torch_dtype=torch.float32
    ).eval()
    for ids, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            gen = ref.generate(
                torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
        assert got == gen[0, len(ids):].tolist()
    assert core.blocks.num_free_blocks == core.blocks.num_blocks


def test_batched_equals_alone_and_prefix_cache_hits(core) -> None:
    """A sequence's greedy output must not depend on its batch mates or on cache hits."""
    tok = core.tokenizer
    text = "The history of the Roman empire is long. " * 6
    base = tok.encode(text)
    prompts = [base + tok.encode(f" Question {i}: what came next?") for i in range(5)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [run_to_completion(core, [p], params)[0] for p in prompts[:2]]
    hits_before = core.blocks.stats().hit_tokens
    together = run_to_completion(core, prompts, params)
    assert together[:2] == alone
    assert core.blocks.stats().hit_tokens > hits_before


def test_seeded_sampling_is_reproducible(core) -> None:
    ids = core.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    a = run_to_completion(core, [ids], params)[0]
    b = run_to_completion(core, [ids, ids], params)
    assert b[0] == a and b[1] == a
    c = run_to_completion(core, [ids], SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))
    assert c != a
