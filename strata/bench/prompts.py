"""Prompts synthesized to an exact length in the target model's tokens.

Prompts are built from token ids, not from text: we pick a vocabulary of "safe" tokens (a
space followed by a lowercase word, each a single token that re-encodes to itself), so any
sequence of them decodes to text that re-encodes to exactly the same ids. Each prompt is
still verified by re-encoding. Mooncake hash ids become deterministic blocks of such tokens,
so requests that shared a prefix block in production share it here, token for token, and a
server's prefix cache is exercised as it was in production.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

_SAFE_WORD = re.compile(r"^ [a-z]{2,12}$")
# Block contents depend only on this salt and the hash id, never on the run's seed, so
# the same Mooncake block is the same text in every run and every client.
_BLOCK_SALT = 0x5EED_B10C


class Tokenizer(Protocol):
    """The part of a tokenizer prompt synthesis needs (strata.engine.tokenizer's API)."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text to token ids."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Token ids to text."""
        ...


@dataclass(frozen=True)
class Prompt:
    """A synthesized prompt: its token ids and the text that encodes to exactly them."""

    token_ids: tuple[int, ...]
    text: str


class _JsonTokenizer:
    """Adapter for a bare ``tokenizer.json`` (a peer model's tokenizer) to :class:`Tokenizer`."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))


def load_bench_tokenizer(spec: str | None) -> Tokenizer:
    """The target model's tokenizer: None is the bundled model, else a model spec or path.

    A path to a ``tokenizer.json`` is read directly, for targets serving another model.
    """
    if spec is not None and spec.endswith(".json"):
        return _JsonTokenizer(Path(spec))
    from strata.engine.tokenizer import load_tokenizer
    from strata.engine.weights import resolve_model

    return load_tokenizer(resolve_model(spec))


def safe_vocabulary(tokenizer: Tokenizer) -> np.ndarray:
    """Token ids that are ' word' pieces and re-encode to themselves, in id order."""
    safe: list[int] = []
    for token_id in range(tokenizer.vocab_size):
        piece = tokenizer.decode([token_id])
        if _SAFE_WORD.match(piece) and tokenizer.encode(piece) == [token_id]:
            safe.append(token_id)
    if len(safe) < 256:
        raise ValueError(f"tokenizer has only {len(safe)} single-token ' word' pieces; "
                         "use --prompt-format ids for this model")
    return np.asarray(safe, dtype=np.int64)


class PromptSynthesizer:
    """Builds prompts of exact token lengths, with shared prefix blocks where asked."""

    def __init__(self, tokenizer: Tokenizer, seed: int = 0, verify: bool = True) -> None:
        """Precompute the safe vocabulary; ``seed`` varies the non-shared tokens."""
        self.tokenizer = tokenizer
        self.seed = seed
        self.verify = verify
        self.vocab = safe_vocabulary(tokenizer)
        self._blocks: dict[tuple[int, int], np.ndarray] = {}

    def block(self, hash_id: int, block_tokens: int) -> np.ndarray:
        """The deterministic token ids of prefix block ``hash_id``."""
        key = (hash_id, block_tokens)
        ids = self._blocks.get(key)
        if ids is None:
            rng = np.random.default_rng([_BLOCK_SALT, hash_id, block_tokens])
            ids = self.vocab[rng.integers(0, len(self.vocab), block_tokens)]
            self._blocks[key] = ids
        return ids

    def token_ids(self, n_tokens: int, request_index: int, hash_ids: tuple[int, ...] = (),
                  block_tokens: int | None = None) -> tuple[int, ...]:
        """``n_tokens`` ids: the prefix blocks named by ``hash_ids``, then unique tokens."""
        if n_tokens < 1:
            raise ValueError(f"prompt length must be >= 1 token, got {n_tokens}")
        parts: list[np.ndarray] = []
        have = 0
        if hash_ids and block_tokens:
            for hash_id in hash_ids:
                if have >= n_tokens:
                    break
                ids = self.block(hash_id, block_tokens)[: n_tokens - have]
                parts.append(ids)
                have += len(ids)
        if have < n_tokens:
            rng = np.random.default_rng([self.seed, request_index])
            parts.append(self.vocab[rng.integers(0, len(self.vocab), n_tokens - have)])
        return tuple(np.concatenate(parts).tolist())

    def prompt(self, n_tokens: int, request_index: int, hash_ids: tuple[int, ...] = (),
               block_tokens: int | None = None) -> Prompt:
        """A prompt whose text re-encodes to exactly ``n_tokens`` (verified)."""
        ids = self.token_ids(n_tokens, request_index, hash_ids, block_tokens)
        text = self.tokenizer.decode(list(ids))
        if self.verify:
            again = self.tokenizer.encode(text)
            if tuple(again) != ids:
                raise ValueError(
                    f"synthesized prompt {request_index} re-encodes to {len(again)} tokens "
                    f"instead of {n_tokens}; use --prompt-format ids for this tokenizer")
        return Prompt(ids, text)
