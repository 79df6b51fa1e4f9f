"""Prompts are exactly N tokens of the bundled model; equal hash ids share prefix blocks."""

from __future__ import annotations

import pytest

from strata.bench.prompts import PromptSynthesizer


@pytest.mark.parametrize("n_tokens", [1, 7, 512, 3000])
def test_exact_length_after_reencoding(synthesizer: PromptSynthesizer, n_tokens: int) -> None:
    prompt = synthesizer.prompt(n_tokens, request_index=n_tokens)
    assert len(prompt.token_ids) == n_tokens
    assert synthesizer.tokenizer.encode(prompt.text) == list(prompt.token_ids)


def test_unique_prompts_differ_and_are_seeded(synthesizer: PromptSynthesizer) -> None:
    a, b = synthesizer.prompt(64, 1), synthesizer.prompt(64, 2)
    assert a.token_ids[:16] != b.token_ids[:16]
    assert synthesizer.prompt(64, 1) == a
    assert PromptSynthesizer(synthesizer.tokenizer, seed=5).prompt(64, 1) != a


def test_mooncake_hash_ids_share_prefix_blocks(synthesizer: PromptSynthesizer) -> None:
    block = 32
    first = synthesizer.prompt(100, 1, hash_ids=(0, 11, 12, 13), block_tokens=block)
    second = synthesizer.prompt(90, 2, hash_ids=(0, 11, 40), block_tokens=block)
    assert len(first.token_ids) == 100 and len(second.token_ids) == 90
    assert first.token_ids[: 2 * block] == second.token_ids[: 2 * block]
    assert first.token_ids[2 * block: 3 * block] != second.token_ids[2 * block: 3 * block]
    shared_text = synthesizer.tokenizer.decode(list(first.token_ids[: 2 * block]))
    assert first.text.startswith(shared_text) and second.text.startswith(shared_text)
    # A block is the same whatever the run's seed: prefix caches see identical tokens.
    other_seed = PromptSynthesizer(synthesizer.tokenizer, seed=99)
    assert other_seed.block(11, block).tolist() == synthesizer.block(11, block).tolist()
