"""Cheap request features for routing: a token estimate and prefix-chunk hashes.

Routing must not cost more than the request's share of a millisecond, so the gateway does
not tokenize. It approximates:

- **Token count** = ceil(prompt UTF-8 bytes / ``bytes_per_token``) (default 4). The bound:
  a byte-level BPE (GPT-2, Llama-3, SmolLM2 tokenizers) never makes a token from less than
  one byte, so the true count is at most ``bytes``; English prose runs 3.5-4.5 bytes per
  token and code 2.5-3.5, so for such text the estimate is within a factor of about 1.5 of
  the truth (an underestimate on code, an overestimate on long-word prose). Scripts with
  multi-byte characters (CJK: 3 bytes per character, 1-2 characters per token) are
  overestimated by up to ~2x, which only makes KV-fit checks conservative. Token-id prompts
  (``prompt: [1, 2, ...]``) are counted exactly. Chat requests add
  ``chat_tokens_per_message`` for the template around each message.
- **Prefix identity**: the prompt's leading bytes are cut into chunks of
  ``chunk_tokens * bytes_per_token`` bytes (token-id prompts into chunks of ``chunk_tokens``
  ids) and hashed as a chain, so ``hashes[i]`` names the whole prefix through chunk ``i``.
  Two prompts sharing their first k chunks share their first k hashes exactly. Chunks do
  not align with a replica's KV blocks; they only have to say "this much is the same".
  At most ``max_chunks`` are hashed, which bounds the hashing cost per request whatever
  the prompt's length.

The chain is CRC-32 (``zlib.crc32`` continued over each chunk): deterministic across
processes, so several gateways agree on prefix affinity, and the fastest hash in the
standard library. A false match needs a 32-bit collision between two same-position
prefixes, about one in 4e9 per lookup, and only misleads one routing estimate.
"""

from __future__ import annotations

import math
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from strata.routing.types import RouteRequest


class PromptError(ValueError):
    """A request body field that routing needs is malformed; ``param`` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class PromptEstimator:
    """How request bodies are turned into RouteRequests (see the module docstring)."""

    bytes_per_token: float = 4.0
    chunk_tokens: int = 64
    max_chunks: int = 64
    chat_tokens_per_message: int = 4
    default_max_tokens: int = 256  # chat requests without max_tokens; completions use 16

    def __post_init__(self) -> None:
        if self.bytes_per_token <= 0:
            raise ValueError("PromptEstimator.bytes_per_token must be > 0 (e.g. 4.0)")
        if self.chunk_tokens <= 0 or self.max_chunks < 0:
            raise ValueError("PromptEstimator.chunk_tokens must be > 0 and max_chunks >= 0")

    @property
    def chunk_bytes(self) -> int:
        """Bytes per prefix chunk for text prompts."""
        return max(1, round(self.chunk_tokens * self.bytes_per_token))

    def tokens_for_bytes(self, nbytes: int) -> int:
        """Estimated tokens of a UTF-8 text of ``nbytes`` bytes."""
        return math.ceil(nbytes / self.bytes_per_token)

    def text_hashes(self, data: bytes) -> tuple[int, ...]:
        """Chained hashes of the leading chunks of a text prompt (full chunks only)."""
        return _chain(memoryview(data), self.chunk_bytes, self.max_chunks)

    def id_hashes(self, ids: Sequence[int]) -> tuple[int, ...]:
        """Chained hashes of the leading chunks of a token-id prompt (full chunks only)."""
        n = min(len(ids) // self.chunk_tokens, self.max_chunks) * self.chunk_tokens
        try:
            data = array("q", ids[:n]).tobytes()
        except OverflowError as err:
            raise PromptError("token ids must fit in 64 bits", "prompt") from err
        return _chain(memoryview(data), self.chunk_tokens * 8, self.max_chunks)

    def from_body(self, body: dict[str, Any], chat: bool) -> RouteRequest:
        """Build the RouteRequest of an OpenAI completions or chat-completions body."""
        model = body.get("model", "")
        if not isinstance(model, str):
            raise PromptError("'model' must be a string", "model")
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.default_max_tokens if chat else 16
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise PromptError("'max_tokens' must be a non-negative integer", "max_tokens")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PromptError("'n' must be a positive integer", "n")
        if chat:
            tokens, hashes = self._chat(body.get("messages"))
        else:
            tokens, hashes = self._completion(body.get("prompt"))
        return RouteRequest(model=model, prompt_tokens=tokens, max_tokens=max_tokens * n,
                            prefix_hashes=hashes, prefix_chunk_tokens=self.chunk_tokens)

    def _completion(self, prompt: Any) -> tuple[int, tuple[int, ...]]:
        if isinstance(prompt, str):
            data = prompt.encode()
            return self.tokens_for_bytes(len(data)), self.text_hashes(data)
        if isinstance(prompt, list) and prompt:
            if all(isinstance(t, int) for t in prompt):
                return len(prompt), self.id_hashes(prompt)
            if all(isinstance(p, str) for p in prompt):
                # A batch of prompts: work is the sum; the prefix is the first prompt's.
                data = [p.encode() for p in prompt]
                return (sum(self.tokens_for_bytes(len(d)) for d in data),
                        self.text_hashes(data[0]))
            if all(isinstance(p, list) for p in prompt):
                return sum(len(p) for p in prompt), self.id_hashes(prompt[0])
        raise PromptError("'prompt' must be a string, a list of strings or of token ids",
                          "prompt")

    def _chat(self, messages: Any) -> tuple[int, tuple[int, ...]]:
        data, _ = chat_routing_text(messages)
        tokens = self.tokens_for_bytes(len(data)) + self.chat_tokens_per_message * len(messages)
        return tokens, self.text_hashes(data)


def chat_routing_text(messages: Any) -> tuple[bytes, list[tuple[int, int, str]]]:
    """The text a chat request's prefix hashes are taken over, and where its contents lie.

    The text is ``role\ncontent\n`` per message (text parts only), not the rendered chat
    template, so a gateway needs no tokenizer. The spans are (start byte, end byte, content)
    of each non-empty content in that text; an engine uses them to find the same prefix in
    its rendered prompt (strata.engine.route_keys).
    """
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty list", "messages")
    out = bytearray()
    spans: list[tuple[int, int, str]] = []
    for m in messages:
        if not isinstance(m, dict):
            raise PromptError("each message must be an object", "messages")
        out += str(m.get("role", "")).encode()
        out += b"\n"
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts count
            content = "".join(p.get("text", "") for p in content
                              if isinstance(p, dict) and isinstance(p.get("text"), str))
        if isinstance(content, str) and content:
            start = len(out)
            out += content.encode()
            spans.append((start, len(out), content))
        out += b"\n"
    return bytes(out), spans


def _chain(data: memoryview, step: int, max_chunks: int) -> tuple[int, ...]:
    crc32 = zlib.crc32
    n = min(len(data) // step, max_chunks)
    out: list[int] = []
    h = 0
    for start in range(0, n * step, step):
        h = crc32(data[start:start + step], h)
        out.append(h)
    return tuple(out)
