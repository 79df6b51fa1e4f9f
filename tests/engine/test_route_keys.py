"""Routing keys computed by the engine equal the gateway's, with the tokens each spans."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.engine.route_keys import id_route_keys, locate, text_route_keys
from strata.engine.tokenizer import Tokenizer, load_tokenizer
from strata.routing.prompt import PromptEstimator, chat_routing_text

EST = PromptEstimator()
SHARED = "You are a careful assistant. " * 30  # ~870 bytes: 3 full 256-byte chunks


@pytest.fixture(scope="module")
def tok(bundled_gguf: Path) -> Tokenizer:
    return load_tokenizer(bundled_gguf)


def test_completion_keys_are_the_gateways_and_span_the_chunk_tokens(tok: Tokenizer) -> None:
    prompt = SHARED + "Now answer: what is 2 + 2?"
    body = {"model": "m", "prompt": prompt}
    gateway = EST.from_body(body, chat=False).prefix_hashes
    ids, ends = tok.encode_with_ends(prompt)
    assert ids == tok.encode(prompt)
    data = prompt.encode()
    keys = text_route_keys(EST, data, [(0, len(data), 0)], ends)
    assert tuple(h for h, _ in keys) == gateway and len(keys) == 3
    for i, (_, n) in enumerate(keys):
        # n tokens end inside the chunk's prefix; the next one does not
        chunk_end = (i + 1) * EST.chunk_bytes
        assert len(tok.decode(ids[:n]).encode()) <= chunk_end
        assert len(tok.decode(ids[:n + 1]).encode()) > chunk_end


def test_chat_keys_follow_the_contents_into_the_rendered_prompt(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": SHARED},
                {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}]
    gateway = EST.from_body({"model": "m", "messages": messages}, chat=True).prefix_hashes
    routing, contents = chat_routing_text(messages)
    # The engine renders flattened text contents (Serving.prepare_chat).
    rendered = tok.apply_chat_template([{"role": "system", "content": SHARED},
                                        {"role": "user", "content": "What is 2 + 2?"}])
    spans = locate(contents, rendered)
    assert len(spans) == 2  # both contents found verbatim in the template's output
    ids, ends = tok.encode_with_ends(rendered)
    keys = text_route_keys(EST, routing, spans, ends)
    assert tuple(h for h, _ in keys) == gateway and len(keys) == 3
    counts = [n for _, n in keys]
    assert counts == sorted(counts) and counts[0] > 0
    # The chunk ends inside the system content: the key's tokens are the template's head
    # plus that content's leading part, never more.
    head = rendered.index(SHARED)
    for i, n in enumerate(counts):
        in_content = (i + 1) * EST.chunk_bytes - len(b"system\n")
        assert tok.decode(ids[:n], skip_special_tokens=False) in rendered[:head + in_content]


def test_an_unmatched_content_maps_to_the_last_found_one() -> None:
    routing = b"a" * 300
    spans = [(0, 100, 5)]  # the rest of the text was not found in the rendered prompt
    keys = text_route_keys(EST, routing, spans, token_ends=list(range(1, 400)))
    assert [n for _, n in keys] == [105]  # end of the found span, not further


def test_id_keys_span_whole_chunks() -> None:
    ids = list(range(200))
    keys = id_route_keys(EST, ids)
    assert tuple(h for h, _ in keys) == EST.id_hashes(ids)
    assert [n for _, n in keys] == [64, 128, 192]
