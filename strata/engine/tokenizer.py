"""Text <-> token ids for a model, its chat template, and streaming detokenization.

The request path uses the Rust `tokenizers` backend directly. transformers is only needed
once per GGUF file, to build a fast tokenizer from its metadata; the result is cached as a
plain tokenizer.json keyed by the GGUF header's sha256.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as BackendTokenizer

from strata.engine import gguf_loader
from strata.engine.cache_dir import default_cache_dir

# End-of-turn markers of common chat formats (ChatML, Llama 3, Phi-3, Gemma, Llama 2, GPT-2).
# A marker counts as a stop token only if the model's chat template actually emits it.
END_OF_TURN_MARKERS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>",
    "<|endoftext|>", "<|end_of_text|>",
)
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Tokens of the window before the read offset that are re-decoded for each new token, so
# that context-dependent decoding (leading spaces, byte sequences) comes out right.
_PREFIX_WINDOW = 5


class Tokenizer:
    """A model's tokenizer: encode/decode, special ids and chat template, over `tokenizers`."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        name: str,
        chat_template: str | None = None,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        special_tokens: dict[str, str | None] | None = None,
    ) -> None:
        self.backend = backend
        self.name = name
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.special_tokens = {k: (special_tokens or {}).get(k) for k in _SPECIAL_NAMES}
        eos = list(eos_token_ids)
        for marker in END_OF_TURN_MARKERS:
            marker_id = backend.token_to_id(marker)
            if chat_template and marker in chat_template and marker_id is not None:
                eos.append(marker_id)
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text; chat prompts already carry their special tokens, hence the default."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_ends(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
        """``encode(text)`` and each token's end character offset in ``text``, in one pass."""
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, [end for _, end in enc.offsets]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (no clean-up of spaces, so decoding is exact and incremental)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id (byte-level form), or None if out of range."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None."""
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation into the prompt text the model was trained on.

        continue_final_message leaves the last (assistant) message open so that generation
        extends it, as in transformers; extra kwargs (tools, documents, ...) reach the template.
        ``chat_template`` renders with that template instead of the model's.
        """
        template = chat_template or self.chat_template
        if not template:
            raise ValueError(
                f"tokenizer {self.name!r} has no chat template, so chat requests cannot be "
                "formatted; use /v1/completions, or a model whose files carry one "
                "(GGUF tokenizer.chat_template or chat_template in tokenizer_config.json)."
            )
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are exclusive; set one.")
        context = {k: v for k, v in self.special_tokens.items() if v is not None}
        context.update(kwargs)
        try:
            text = _compile_template(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            )
        except (jinja2.TemplateError, TypeError, AttributeError, KeyError, IndexError,
                ValueError, RecursionError) as exc:
            # The template runs over the client's messages and kwargs: whatever it trips on
            # there is the request's fault (400), not the replica's.
            raise ValueError(f"chat template of {self.name!r} rejected the messages: {exc}") from exc
        if continue_final_message:
            text = _cut_after_final_message(text, messages)
        return text

    def save_pretrained(self, out_dir: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (HF layout).

        tokenizer_class is the generic fast tokenizer so that older transformers (as used by
        peers such as vLLM) load the files too.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out_dir / "tokenizer.json"))
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            **{k: v for k, v in self.special_tokens.items() if v is not None},
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
            (out_dir / "chat_template.jinja").write_text(self.chat_template)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _cut_after_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    """Drop what the template appends after the last message (its end-of-turn marker)."""
    final = messages[-1].get("content") if messages else None
    if isinstance(final, list):  # content parts: continue the last text part
        final = next((p.get("text") for p in reversed(final) if p.get("type") == "text"), None)
    if not isinstance(final, str) or not final.strip() or final.strip() not in text:
        raise ValueError("continue_final_message needs a final message with text content to continue.")
    needle = final if final in text else final.strip()
    return text[: text.rindex(needle) + len(needle)]


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    """A sandboxed Jinja environment with the helpers Hugging Face chat templates expect."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def load_tokenizer(path: Path, cache_dir: Path | None = None) -> Tokenizer:
    """The tokenizer of a .gguf file or an HF directory (see weights.resolve_model)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return _load_gguf_tokenizer(path, cache_dir if cache_dir is not None else default_cache_dir())
    if path.is_dir():
        return _load_hf_tokenizer(path)
    raise ValueError(f"{path}: expected a .gguf file or a Hugging Face directory.")


def _load_gguf_tokenizer(path: Path, cache_dir: Path) -> Tokenizer:
    meta = gguf_loader.tokenizer_metadata(path)
    tok_dir = Path(cache_dir) / "tokenizers" / gguf_loader.metadata_digest(path)[:32]
    if not (tok_dir / "tokenizer.json").is_file():
        _convert_gguf_tokenizer(path, tok_dir)
    backend = BackendTokenizer.from_file(str(tok_dir / "tokenizer.json"))

    def token(key: str) -> str | None:
        token_id = meta.get(f"{key}_token_id")
        return backend.id_to_token(token_id) if token_id is not None else None

    eos = [meta[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if meta[k] is not None]
    return Tokenizer(
        backend,
        name=path.stem,
        chat_template=meta["chat_template"],
        bos_token_id=meta["bos_token_id"],
        eos_token_ids=eos,
        special_tokens={"bos_token": token("bos"), "eos_token": token("eos"),
                        "unk_token": token("unknown"), "pad_token": token("padding")},
    )


def _convert_gguf_tokenizer(path: Path, tok_dir: Path) -> None:
    """Build tokenizer.json from GGUF metadata with transformers (slow, so done once)."""
    from transformers import AutoTokenizer  # heavy import, only needed on a cache miss

    tok_dir.parent.mkdir(parents=True, exist_ok=True)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # nosec B615 (a local directory: no Hub download)
    tmp = Path(tempfile.mkdtemp(dir=tok_dir.parent, prefix=f".{tok_dir.name}-"))
    try:
        hf.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared between users
        try:
            os.rename(tmp, tok_dir)
        except OSError:
            # Another process won the race; its file is built from the same bytes, so keep it.
            if not (tok_dir / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _load_hf_tokenizer(model_dir: Path) -> Tokenizer:
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    model_cfg = _read_json(model_dir / "config.json")
    gen_cfg = _read_json(model_dir / "generation_config.json")
    if (model_dir / "tokenizer.json").is_file():
        backend = BackendTokenizer.from_file(str(model_dir / "tokenizer.json"))
    else:
        from transformers import AutoTokenizer  # converts sentencepiece-only tokenizers

        try:
            backend = AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer  # nosec B615 (a local directory)
        except Exception as exc:
            raise ValueError(f"{model_dir}: no usable tokenizer (tokenizer.json missing): {exc}") from exc

    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    special = {k: _token_content(tok_cfg.get(k)) for k in _SPECIAL_NAMES}

    def token_id(key: str) -> int | None:
        content = special[key]
        return backend.token_to_id(content) if content is not None else None

    eos = _as_list(gen_cfg.get("eos_token_id")) + _as_list(model_cfg.get("eos_token_id"))
    if (eos_id := token_id("eos_token")) is not None:
        eos.append(eos_id)
    bos = gen_cfg.get("bos_token_id", model_cfg.get("bos_token_id"))
    return Tokenizer(
        backend,
        name=model_dir.name,
        chat_template=template,
        bos_token_id=int(bos) if bos is not None else token_id("bos_token"),
        eos_token_ids=eos,
        special_tokens=special,
    )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never split a UTF-8 character.

    Each step decodes a short window of earlier tokens with and without the new ones and
    emits the difference (the prefix/read offset scheme of TGI and vLLM), so leading spaces
    and multi-token characters come out exactly as a one-shot decode would produce them.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or [])
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - _PREFIX_WINDOW, 0)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (may be empty)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back at the end of generation (e.g. an incomplete character)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        new_text = decode(self._ids[self._prefix_offset:], self.skip_special_tokens)
        # A trailing U+FFFD is an incomplete character that later tokens may finish.
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return new_text[len(prefix_text):]
        return ""
