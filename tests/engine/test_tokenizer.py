"""Tokenizer: agreement with transformers, chat template, and streaming detokenization."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from strata.engine import gguf_loader
from strata.engine.cache_dir import default_cache_dir
from strata.engine.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "Numbers 1234567890 and 3.14159, dates 2024-11-25.",
    "Café naïve résumé façade Ångström Straße",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트",
    "Emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "def f(x):\n\treturn x ** 2  # comment\n\n\n",
    "Mixed\u00a0nbsp, zero\u200bwidth, RTL עברית العربية",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "   \n\n  whitespace   runs\t\t",
    "a",
    "",
]


@pytest.fixture(scope="module")
def tok(bundled_gguf: Path) -> Tokenizer:
    return load_tokenizer(bundled_gguf)


@pytest.fixture(scope="module")
def hf_tok(bundled_gguf: Path):  # noqa: ANN201 - transformers type, test-only
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_gguf.parent), gguf_file=bundled_gguf.name)


def test_special_ids_and_vocab(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    assert tok.id_to_token(2) == "<|im_end|>" and tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("no-such-token-xyz") is None
    assert tok.name == "SmolLM2-135M-Instruct.Q4_1"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_agree_with_transformers(tok: Tokenizer, hf_tok, text: str) -> None:  # noqa: ANN001
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


def test_known_ids(tok: Tokenizer) -> None:
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert tok.decode([1, 4093, 2]) == "user"


def test_gguf_tokenizer_is_cached_and_loads_without_transformers(bundled_gguf: Path, tok: Tokenizer) -> None:
    digest = gguf_loader.metadata_digest(bundled_gguf)
    assert (default_cache_dir() / "tokenizers" / digest[:32] / "tokenizer.json").is_file()
    code = (
        "import sys; from pathlib import Path; from strata.engine.tokenizer import load_tokenizer; "
        f"t = load_tokenizer(Path({str(bundled_gguf)!r})); "
        "assert 'transformers' not in sys.modules, 'cache miss'; print(t.encode('Hello world'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[19556, 905]"


# --- chat template ---------------------------------------------------------------------


def test_chat_template_smollm2_format(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message the template inserts SmolLM's default one.
    no_system = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert no_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert no_system.endswith("<|im_start|>user\nHi<|im_end|>\n")


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 😀"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_agrees_with_transformers(
    tok: Tokenizer, hf_tok, messages: list[dict], add_generation_prompt: bool  # noqa: ANN001
) -> None:
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == \
        hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_continue_final_message_agrees_with_transformers(tok: Tokenizer, hf_tok) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Autumn moon"}]
    ours = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert ours.endswith("<|im_start|>assistant\nAutumn moon")
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                              continue_final_message=True)
    with pytest.raises(ValueError, match="exclusive"):
        tok.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)


def test_missing_or_failing_template_is_a_clear_error(tok: Tokenizer) -> None:
    bare = Tokenizer(tok.backend, name="bare")
    with pytest.raises(ValueError, match="has no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "Hi"}])
    strict = Tokenizer(tok.backend, name="strict",
                       chat_template="{{ raise_exception('only user messages') }}")
    with pytest.raises(ValueError, match="only user messages"):
        strict.apply_chat_template([{"role": "system", "content": "x"}])


def test_hf_dir_tokenizer_matches_gguf(tiny_hf_dir: Path, tok: Tokenizer) -> None:
    hf = load_tokenizer(tiny_hf_dir)
    assert hf.name == tiny_hf_dir.name
    assert (hf.bos_token_id, hf.eos_token_ids, hf.vocab_size) == (1, [2], 49152)
    assert hf.chat_template == tok.chat_template
    for text in TEXTS:
        assert hf.encode(text) == tok.encode(text)
    messages = CONVERSATIONS[1]
    assert hf.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_end_of_turn_token_used_by_template_is_an_eos(tok: Tokenizer) -> None:
    chatml = Tokenizer(tok.backend, name="chatml", eos_token_ids=[0],
                       chat_template="{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    assert chatml.eos_token_ids == [0, 2]
    assert Tokenizer(tok.backend, name="plain", eos_token_ids=[0]).eos_token_ids == [0]


# --- incremental detokenization ---------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None,
           skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_streams_text_exactly(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas = stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)  # never a broken character on the wire


def test_detokenizer_holds_back_partial_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1, "the emoji should span several byte-level tokens"
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "😀"
    assert detok.flush() == ""


def test_detokenizer_keeps_leading_space_after_prompt(tok: Tokenizer) -> None:
    prompt = tok.encode("The capital of France is")
    deltas = stream(tok, tok.encode(" Paris, of course."), prompt)
    assert deltas[0] == " Paris"
    assert "".join(deltas) == " Paris, of course."


def _byte_token_ids(tok: Tokenizer) -> list[int]:
    """Ids of tokens that are a single byte (in byte-level form): they split characters."""
    return [i for i in range(tok.vocab_size) if len(tok.id_to_token(i) or "") == 1]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_detokenizer_equals_decode_on_random_sequences(tok: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(20241125)
    byte_ids = _byte_token_ids(tok)
    special = list(range(17))
    for _ in range(400):
        n = rng.randint(1, 40)
        pools = [range(tok.vocab_size), byte_ids, byte_ids + special]
        pool = pools[rng.randrange(len(pools))]
        ids = [rng.choice(pool) for _ in range(n)]
        deltas = stream(tok, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens), ids
        # Only the final flush may end in U+FFFD: everything earlier was complete text.
        assert not any(d.endswith("\ufffd") for d in deltas[:-1]), ids


def test_detokenizer_with_prompt_equals_decode_suffix(tok: Tokenizer) -> None:
    rng = random.Random(7)
    byte_ids = _byte_token_ids(tok)
    for text in TEXTS:
        prompt = tok.encode(text)
        for _ in range(20):
            gen = [rng.choice(byte_ids if rng.random() < 0.5 else range(tok.vocab_size))
                   for _ in range(rng.randint(1, 25))]
            full = tok.decode(prompt + gen)
            expected = full[len(tok.decode(prompt)):]
            assert "".join(stream(tok, gen, prompt)) == expected, (prompt, gen)


def test_detokenizer_on_cjk_emoji_accents_token_by_token(tok: Tokenizer) -> None:
    text = "".join(TEXTS[3:6])
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    seen = ""
    for i, token in enumerate(ids):
        seen += detok.add(token)
        assert tok.decode(ids[: i + 1]).startswith(seen)
    assert seen + detok.flush() == text


def test_completions_add_the_tokenizers_bos_as_vllm_does(tok: Tokenizer) -> None:
    """A tokenizer that adds BOS (Gemma's, Llama 3's) gets it on a completion's text prompt
    by default and on /tokenize's, never on top of a chat template's own."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.processors import TemplateProcessing

    from strata.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest

    bos = "<|im_start|>"
    bos_id = tok.token_to_id(bos)
    assert bos_id is not None
    backend = Backend.from_str(tok.backend.to_str())
    backend.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    with_bos = Tokenizer(backend, name="bos-test", bos_token_id=bos_id)
    text = "The capital of France is"
    plain = tok.encode(text)
    assert with_bos.encode(text, add_special_tokens=True) == [bos_id, *plain]
    assert with_bos.encode(text) == plain
    ids, ends = with_bos.encode_with_ends(text, add_special_tokens=True)
    assert ids == [bos_id, *plain] and ends[0] == 0  # BOS ends before any text
    assert CompletionRequest(model="m", prompt=text).add_special_tokens is True
    assert ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]
                                 ).add_special_tokens is False
    assert TokenizeRequest(prompt=text).add_special_tokens is None
