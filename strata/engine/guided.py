"""Structured output: grammars from request fields, token masks, and their overlap with the model.

A request's constraint (a JSON schema, a regex, a choice, a grammar) is compiled once at the
API edge into an llguidance grammar (`GuidedDecoding`), carried in its SamplingParams. The
engine core gives each constrained sequence an `LLMatcher`; before each forward pass it asks
`GrammarBackend.start_masks` for the next token masks, which a worker thread computes while
the model runs (llguidance and torch both release the GIL), as vLLM overlaps them. The
sampler then bans the masked-out tokens of those rows only, and the core advances each
matcher by the token it accepted; a grammar with nothing left to match ends the sequence.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from strata.engine.sampling import GuidedDecoding
from strata.engine.tokenizer import Tokenizer
from strata.protocol import OpenAIError

# Compact JSON (", " and ": ", no free whitespace): a small model given free whitespace can
# fill its whole budget with newlines. A schema's own x-guidance options override these.
JSON_DEFAULTS: dict[str, Any] = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
}
MAX_GRAMMAR_CHARS = 1 << 20


def compile_json_schema(schema: Any, param: str, whitespace_pattern: str | None = None,
                        kind: str = "json") -> GuidedDecoding:
    """A JSON schema (dict or JSON text) as a grammar; ValueError naming ``param`` if it is not one."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"{param} is not valid JSON: {e}") from None
    if not isinstance(schema, dict | bool):
        raise ValueError(f"{param} must be a JSON schema (an object)")
    defaults = dict(JSON_DEFAULTS)
    if whitespace_pattern is not None:
        defaults.update(whitespace_flexible=True, whitespace_pattern=whitespace_pattern)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{param} is not a usable JSON schema: {e}") from None
    return GuidedDecoding(kind, param, grammar)


def compile_regex(pattern: str, param: str) -> GuidedDecoding:
    """A regular expression (Rust regex syntax, as llguidance takes it) as a grammar."""
    return GuidedDecoding("regex", param, llguidance.LLMatcher.grammar_from_regex(pattern))


def compile_choice(choices: list[str], param: str) -> GuidedDecoding:
    """Exactly one of the given strings."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{param} must be a non-empty list of non-empty strings")
    lark = "start: " + " | ".join(json.dumps(c) for c in dict.fromkeys(choices))
    return GuidedDecoding("choice", param, llguidance.LLMatcher.grammar_from_lark(lark))


def compile_grammar(text: str, param: str) -> GuidedDecoding:
    """A context-free grammar: GBNF (llama.cpp, as vLLM takes it) or Lark (llguidance)."""
    try:
        return GuidedDecoding("grammar", param, llguidance.grammar_from("grammar", text))
    except ValueError as e:
        raise ValueError(f"{param} is not a usable grammar: {e}") from None


def _limits() -> llguidance.LLParserLimits:
    # Errors go back to clients: keep the parser's state out of them.
    return llguidance.LLParserLimits(verbose_errors=False)


class GrammarBackend:
    """llguidance over one model's tokenizer: validation, matchers and overlapped masks.

    The llguidance tokenizer (about a second to build) is made on first use, so an engine
    that never sees a constrained request never pays for it.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, threads: int = 1) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.logits_width = vocab_size
        self._threads = threads
        self._lock = threading.Lock()
        self._lltok: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        """The llguidance tokenizer, built on first use (thread-safe)."""
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(
                    self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                    eos_token=list(self.tokenizer.eos_token_ids) or None)
                self._executor = llguidance.LLExecutor(num_threads=self._threads)
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="strata-grammar")
            return self._lltok

    def validate(self, guided: GuidedDecoding) -> None:
        """ValueError naming the request field when the grammar cannot be used."""
        if len(guided.grammar) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"{guided.param} compiles to a grammar over {MAX_GRAMMAR_CHARS} "
                             "characters; send a smaller one")
        is_error, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(
            guided.grammar, self.lltokenizer, limits=_limits())
        if is_error:
            raise ValueError(f"{guided.param} is not usable: {msgs[0] if msgs else 'invalid'}")

    def matcher(self, guided: GuidedDecoding) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; ValueError if the grammar is unusable."""
        m = llguidance.LLMatcher(self.lltokenizer, guided.grammar, log_level=0, limits=_limits())
        if m.is_error():
            raise ValueError(f"{guided.param} is not usable: {m.get_error()}")
        return m

    def start_masks(self, matchers: list[llguidance.LLMatcher | None]) -> MaskJob | None:
        """Begin computing the next-token masks of the rows that have a matcher (None: none do)."""
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        assert self._pool is not None  # a matcher exists, so the tokenizer and pool do
        return MaskJob(self._pool.submit(self._masks, rows, len(matchers)))

    def _masks(self, rows: list[tuple[llguidance.LLMatcher, int]], n: int) -> MaskResult:
        words = (self.vocab_size + 31) // 32
        bitmask = np.full((len(rows), words), -1, dtype=np.int32)
        order = [(m, k) for k, (m, _) in enumerate(rows)]
        assert self._executor is not None
        self._executor.unsafe_compute_mask_ptr(order, bitmask.ctypes.data, words * 4, len(rows))
        # Unpacked here, off the engine thread: True where a token is banned.
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        banned = torch.from_numpy(bits[:, : self.logits_width] == 0)
        out: list[torch.Tensor | None] = [None] * n
        errors: dict[int, str] = {}
        for k, (m, i) in enumerate(rows):
            if m.is_error():
                errors[i] = m.get_error()
            out[i] = banned[k]
        return MaskResult(out, errors)

    def close(self) -> None:
        """Stop the worker thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)


@dataclass
class MaskResult:
    """Per sampled row: the banned-token mask (None: unconstrained) and grammar errors by row."""

    banned: list[torch.Tensor | None]
    errors: dict[int, str]


class MaskJob:
    """Masks being computed in the grammar worker while the model runs."""

    def __init__(self, future: concurrent.futures.Future[MaskResult]) -> None:
        self._future = future

    def result(self) -> MaskResult:
        """Wait for the masks (they are usually done before the forward pass is)."""
        return self._future.result()


_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def decoding_of(req: Any) -> GuidedDecoding | None:
    """The constraint a completion or chat request asks for (None: none), compiled.

    Raises OpenAIError (400) naming the field when it is malformed or combined with another.
    Whether the grammar is usable with this model's tokenizer is `GrammarBackend.validate`'s.
    """
    field = req.structured_output_field
    if field is None:
        return None
    others = [n for n in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                          "structured_outputs") if n != field and getattr(req, n) is not None]
    if others:
        raise OpenAIError(f"{field} and {others[0]} both constrain the output; send one",
                          param=others[0])
    ws = req.guided_whitespace_pattern
    try:
        if field == "response_format":
            return _response_format(req.response_format, ws)
        if field == "guided_json":
            return compile_json_schema(req.guided_json, "guided_json", ws)
        if field == "guided_regex":
            return compile_regex(req.guided_regex, "guided_regex")
        if field == "guided_choice":
            return compile_choice(req.guided_choice, "guided_choice")
        if field == "guided_grammar":
            return compile_grammar(req.guided_grammar, "guided_grammar")
        return _structured_outputs(req.structured_outputs, ws)
    except ValueError as e:
        if isinstance(e, OpenAIError):
            raise
        raise OpenAIError(str(e), param=str(e).split(" ", 1)[0]) from None


def _response_format(rf: dict[str, Any], ws: str | None) -> GuidedDecoding:
    kind = rf.get("type")
    if kind == "json_object":
        return compile_json_schema({"type": "object"}, "response_format", ws, kind="json_object")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise OpenAIError("response_format.json_schema must be an object with `name` and "
                              "`schema`", param="response_format.json_schema")
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:
            raise OpenAIError("response_format.json_schema.schema is missing: send the JSON "
                              "schema the output must follow",
                              param="response_format.json_schema.schema")
        return compile_json_schema(schema, "response_format.json_schema.schema", ws)
    raise OpenAIError(
        f"response_format.type must be \"text\", \"json_object\" or \"json_schema\"; got "
        f"{kind!r}", param="response_format.type")


def _structured_outputs(so: dict[str, Any], ws: str | None) -> GuidedDecoding:
    unknown = sorted(set(so) - {*_STRUCTURED_KEYS, "whitespace_pattern",
                                "disable_any_whitespace", "disable_fallback",
                                "disable_additional_properties"})
    if unknown:
        raise OpenAIError(f"structured_outputs.{unknown[0]} is not supported; use one of "
                          f"{', '.join(_STRUCTURED_KEYS)}", param=f"structured_outputs.{unknown[0]}")
    set_keys = [k for k in _STRUCTURED_KEYS if so.get(k) not in (None, False)]
    if len(set_keys) != 1:
        raise OpenAIError("structured_outputs must set exactly one of "
                          f"{', '.join(_STRUCTURED_KEYS)}", param="structured_outputs")
    key = set_keys[0]
    param = f"structured_outputs.{key}"
    value = so[key]
    ws = so.get("whitespace_pattern", ws)
    if ws is not None and not isinstance(ws, str):
        raise OpenAIError("structured_outputs.whitespace_pattern must be a string",
                          param="structured_outputs.whitespace_pattern")
    if key == "json_object":
        return compile_json_schema({"type": "object"}, param, ws, kind="json_object")
    if key == "json":
        return compile_json_schema(value, param, ws)
    if key == "choice":
        if not isinstance(value, list):
            raise OpenAIError(f"{param} must be a list of strings", param=param)
        return compile_choice(value, param)
    if not isinstance(value, str):
        raise OpenAIError(f"{param} must be a string", param=param)
    return compile_regex(value, param) if key == "regex" else compile_grammar(value, param)
