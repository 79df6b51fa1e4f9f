"""A prompt's routing keys, each with the prompt tokens its prefix spans.

The keys are exactly the gateway's prefix-chunk hashes (strata.routing.prompt), taken over
the same text: a completion's prompt, or a chat request's ``role\\ncontent\\n`` text. The
engine adds what the gateway cannot know: how many tokens of the prompt it actually runs
(the chat-rendered one) each chunk covers, so the key can be anchored to the KV block
that ends it (strata.engine.prefix_registry).

A chunk's end, a byte offset in the routing text, is carried into the rendered prompt
through the message contents, which the template copies verbatim; an end that falls
between contents (a role, a separator) or in a content the template changed maps to the
end of the last content found before it. The token count is then the number of tokens
that end at or before that point. Both err short, which anchors a key to an earlier block
of the same prefix: one that stays cached at least as long.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from strata.engine.prefix_registry import RouteKeys
from strata.routing.prompt import PromptEstimator

# (start byte in the routing text, end byte, position of the same text in the rendered prompt)
Span = tuple[int, int, int]


def id_route_keys(estimator: PromptEstimator, ids: Sequence[int]) -> RouteKeys:
    """Keys of a token-id prompt: chunk i spans exactly (i + 1) * chunk_tokens tokens."""
    step = estimator.chunk_tokens
    return tuple((h, (i + 1) * step) for i, h in enumerate(estimator.id_hashes(ids)))


def locate(contents: Sequence[tuple[int, int, str]], rendered: str) -> list[Span]:
    """Where each (start, end, content) of the routing text appears in ``rendered``, in order.

    Contents the template does not reproduce verbatim are left out.
    """
    spans: list[Span] = []
    cursor = 0
    for start, end, text in contents:
        at = rendered.find(text, cursor)
        if at >= 0:
            spans.append((start, end, at))
            cursor = at + len(text)
    return spans


def text_route_keys(estimator: PromptEstimator, routing: bytes, spans: Sequence[Span],
                    token_ends: Sequence[int]) -> RouteKeys:
    """Keys of a text prompt.

    ``routing`` is the text the gateway hashes, ``spans`` where its parts lie in the prompt
    the engine runs (one span (0, len, 0) for a completion), ``token_ends`` the end
    character offset of each token of that prompt (non-decreasing).
    """
    hashes = estimator.text_hashes(routing)
    if not hashes:
        return ()
    step = estimator.chunk_bytes
    keys: list[tuple[int, int]] = []
    j = 0  # spans before the current chunk end
    for i, h in enumerate(hashes):
        end = (i + 1) * step
        while j < len(spans) and spans[j][0] < end:
            j += 1
        if j == 0:
            pos = 0
        else:
            start, stop, at = spans[j - 1]
            inner = routing[start:min(end, stop)]
            pos = at + len(inner.decode("utf-8", errors="ignore"))
        keys.append((h, bisect_right(token_ends, pos)))
    return tuple(keys)
