from __future__ import annotations

import subprocess
import sys

import pytest

from strata.routing.prompt import PromptError, PromptEstimator

EST = PromptEstimator(bytes_per_token=4.0, chunk_tokens=4, max_chunks=8)  # 16-byte chunks


def test_text_tokens_are_bytes_over_ratio() -> None:
    r = EST.from_body({"model": "m", "prompt": "x" * 41, "max_tokens": 7}, chat=False)
    assert r.prompt_tokens == 11  # ceil(41 / 4)
    assert r.max_tokens == 7
    assert r.model == "m"
    # The documented hard bound: a byte-level BPE never yields more tokens than bytes.
    assert r.prompt_tokens <= 41


def test_multibyte_text_counts_bytes_not_characters() -> None:
    r = EST.from_body({"prompt": "é" * 8}, chat=False)
    assert r.prompt_tokens == 4  # 16 UTF-8 bytes
    assert r.max_tokens == 16  # OpenAI completions default


def test_token_id_prompts_are_exact() -> None:
    r = EST.from_body({"prompt": list(range(10)), "max_tokens": 1}, chat=False)
    assert r.prompt_tokens == 10
    assert len(r.prefix_hashes) == 2  # two full chunks of 4 ids


def test_shared_prefix_shares_exactly_the_leading_hashes() -> None:
    a = "A" * 32 + "B" * 16 + "tail one"
    b = "A" * 32 + "C" * 16 + "tail two"
    ha = EST.from_body({"prompt": a}, chat=False).prefix_hashes
    hb = EST.from_body({"prompt": b}, chat=False).prefix_hashes
    assert len(ha) == len(hb) == 3
    assert ha[:2] == hb[:2]
    assert ha[2] != hb[2]


def test_hash_count_is_bounded() -> None:
    r = EST.from_body({"prompt": "z" * 10_000}, chat=False)
    assert len(r.prefix_hashes) == EST.max_chunks


def test_hashes_are_stable_across_processes() -> None:
    code = ("from strata.routing.prompt import PromptEstimator as P;"
            "print(P(chunk_tokens=4).from_body({'prompt': 'q' * 100}, chat=False).prefix_hashes)")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")}
    assert len(outs) == 1


def test_chat_counts_messages_and_parts() -> None:
    body = {"model": "m", "max_tokens": 5, "n": 2, "messages": [
        {"role": "system", "content": "s" * 20},
        {"role": "user", "content": [{"type": "text", "text": "u" * 20},
                                     {"type": "image_url", "image_url": {"url": "x"}}]},
    ]}
    r = EST.from_body(body, chat=True)
    text_bytes = len("system\n" + "s" * 20 + "\n" + "user\n" + "u" * 20 + "\n")
    assert r.prompt_tokens == -(-text_bytes // 4) + 2 * EST.chat_tokens_per_message
    assert r.max_tokens == 10  # n copies


def test_chat_prefers_max_completion_tokens_and_has_a_default() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert EST.from_body({"messages": msgs, "max_completion_tokens": 3,
                          "max_tokens": 9}, chat=True).max_tokens == 3
    assert EST.from_body({"messages": msgs}, chat=True).max_tokens == EST.default_max_tokens


@pytest.mark.parametrize(("body", "chat", "param"), [
    ({"prompt": 3}, False, "prompt"),
    ({"prompt": []}, False, "prompt"),
    ({"prompt": "x", "max_tokens": "9"}, False, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, False, "max_tokens"),
    ({"prompt": "x", "n": 0}, False, "n"),
    ({"prompt": "x", "model": 3}, False, "model"),
    ({"messages": []}, True, "messages"),
    ({"messages": ["hi"]}, True, "messages"),
])
def test_malformed_fields_name_the_param(body: dict, chat: bool, param: str) -> None:
    with pytest.raises(PromptError) as info:
        EST.from_body(body, chat=chat)
    assert info.value.param == param


def test_estimator_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="bytes_per_token"):
        PromptEstimator(bytes_per_token=0)
