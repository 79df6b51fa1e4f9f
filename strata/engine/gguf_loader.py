"""Read Llama-family GGUF files (llama.cpp's format): config, tokenizer metadata, weights.

Weights come back under Hugging Face names and in Hugging Face layout, so the forward pass
has a single weight convention whatever file the model came from.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, ReaderField, ReaderTensor
from gguf.quants import dequantize

from strata.engine.gguf_blocks import BlockWeights, check_tensor_types, tensor_blocks
from strata.engine.model_config import LlamaConfig

# Architectures whose GGUF tensors the one forward pass runs: llama's layout, plus q/k/v
# biases (qwen2) or per-head q/k norms (qwen3), found by the tensors the file holds, and
# Gemma 3 text (gemma3), whose config comes from its own rules below.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

# llama.cpp's gemma3: every 6th layer attends globally, the others slide and rotate with
# a fixed local base; neither is written into the file's metadata.
_GEMMA3_SLIDING_PATTERN = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0

# Per-layer tensors: Hugging Face suffix -> llama.cpp name inside "blk.{i}.".
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
# Per-layer tensors only some models have, by the LlamaConfig flag that calls for them.
_OPTIONAL_LAYER_TENSORS = {
    "self_attn.q_proj.bias": ("qkv_bias", "attn_q.bias"),
    "self_attn.k_proj.bias": ("qkv_bias", "attn_k.bias"),
    "self_attn.v_proj.bias": ("qkv_bias", "attn_v.bias"),
    "self_attn.o_proj.bias": ("o_bias", "attn_output.bias"),
    "self_attn.q_norm.weight": ("qk_norm", "attn_q_norm.weight"),
    "self_attn.k_norm.weight": ("qk_norm", "attn_k_norm.weight"),
    # Gemma 3's norms around the MLP.
    "pre_feedforward_layernorm.weight": ("sandwich_norms", "ffn_norm.weight"),
    "post_feedforward_layernorm.weight": ("sandwich_norms", "post_ffw_norm.weight"),
}
_GGUF_SUFFIX = {**_LAYER_TENSORS, **{k: v[1] for k, v in _OPTIONAL_LAYER_TENSORS.items()}}
# With sandwich norms (Gemma 3) the norm after attention is its own tensor; ffn_norm is
# the one before the MLP.
_SANDWICH_SUFFIX = {**_GGUF_SUFFIX, "post_attention_layernorm.weight": "post_attention_norm.weight"}


# Metadata arrays longer than this (token list, merges, scores) are left out of the index:
# as Python objects (a vocabulary's worth of them) they cost far more memory than the rest
# of the index, and only the one-off tokenizer conversion needs them.
_MAX_ARRAY_FIELD = 1024


@dataclass(frozen=True)
class GGUFIndex:
    """What a GGUF file holds, minus its big tokenizer arrays; tensors stay memory-mapped."""

    metadata: dict[str, Any]
    tensors: dict[str, ReaderTensor]
    data_offset: int

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (str, int, float, bool or short list), or default."""
        return self.metadata.get(key, default)


def _value(f: ReaderField) -> Any:
    value = f.contents()
    if isinstance(value, float):
        # GGUF stores float32; its shortest repr (1e-05, not 9.9999997e-06) is the intended value.
        value = float(str(np.float32(value)))
    return value


@functools.lru_cache(maxsize=4)
def _cached_index(path: str, mtime_ns: int, size: int) -> GGUFIndex:
    reader = GGUFReader(path)
    metadata = {
        key: _value(f) for key, f in reader.fields.items()
        if not (f.types and f.types[0] == GGUFValueType.ARRAY and len(f.data) > _MAX_ARRAY_FIELD)
    }
    return GGUFIndex(metadata, {t.name: t for t in reader.tensors}, reader.data_offset)


def open_gguf(path: Path) -> GGUFIndex:
    """Parse a GGUF file once per process (GGUFReader takes seconds on a large vocabulary)."""
    st = Path(path).stat()
    return _cached_index(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def metadata_digest(path: Path) -> str:
    """sha256 of the GGUF header (all metadata, no tensor data): the tokenizer's identity."""
    index = open_gguf(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(index.data_offset))
    return h.hexdigest()


def _architecture(index: GGUFIndex, path: Path) -> str:
    arch = index.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF general.architecture={arch!r} is not supported; strata runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models."
        )
    return arch


def config_from_gguf(path: Path) -> LlamaConfig:
    """Build the model config from GGUF metadata (llama.cpp's `llama.*` and `tokenizer.ggml.*`)."""
    index = open_gguf(path)
    arch = _architecture(index, path)
    tensors = index.tensors
    check_tensor_types(tensors, str(path))

    def req(key: str) -> Any:
        value = index.get(f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}; the file is incomplete.")
        return value

    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv_heads = int(index.get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = index.get(f"{arch}.attention.key_length")
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor.")
    # The embedding's row count is what the forward pass indexes; it equals the token list
    # length in practice (some converters pad it, and then the tensor wins).
    vocab_size = int(embd.shape[-1])  # ggml lists dims innermost first: [hidden, vocab]
    eos_ids = [
        int(v)
        for key in ("eos_token_id", "eot_token_id", "eom_token_id")
        if (v := index.get(f"tokenizer.ggml.{key}")) is not None
    ]
    eos_ids = list(dict.fromkeys(eos_ids))
    bos = index.get("tokenizer.ggml.bos_token_id")
    n_layers = int(req("block_count"))
    window = index.get(f"{arch}.attention.sliding_window")
    family: dict[str, Any] = {}
    if arch == "gemma3":
        family = _gemma3_fields(hidden, int(head_dim or hidden // n_heads), n_layers, window)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=int(index.get(f"{arch}.context_length", 8192)),
        rms_norm_eps=float(index.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(index.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(index, arch, path, head_dim or hidden // n_heads),
        tie_word_embeddings="output.weight" not in tensors,
        head_dim=int(head_dim) if head_dim is not None else None,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
        sliding_window=int(window) if window else None,
        name=Path(path).stem,
        model_type="gemma3_text" if arch == "gemma3" else arch,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        extra={"source_format": "gguf", "gguf_file_type": index.get("general.file_type")},
        **family,
    )


def _gemma3_fields(hidden: int, head_dim: int, n_layers: int, window: Any) -> dict[str, Any]:
    """The Gemma 3 flags a gemma3 GGUF implies (as llama.cpp runs it).

    llama.cpp's converter stores every norm weight as (1 + w), so the norms here are plain
    RMSNorm (norm_offset_one off), unlike an HF directory's. The attention scale is
    head_dim's (the 270M-12B models' query_pre_attn_scalar; llama.cpp does the same).
    """
    layer_types = None
    if window:
        layer_types = tuple(
            "full_attention" if (i + 1) % _GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
            for i in range(n_layers)
        )
    return {
        "layer_types": layer_types, "norm_offset_one": False, "sandwich_norms": True,
        "mlp_act": "gelu_tanh", "embed_scale": float(hidden) ** 0.5,
        "query_pre_attn_scalar": float(head_dim), "rope_local_theta": _GEMMA3_LOCAL_ROPE_BASE,
    }


def _rope_scaling(index: GGUFIndex, arch: str, path: Path, head_dim: int) -> dict[str, Any] | None:
    """HF rope_scaling from `{arch}.rope.scaling.*` keys or from a llama3 `rope_freqs` tensor."""
    kind = index.get(f"{arch}.rope.scaling.type")
    factor = index.get(f"{arch}.rope.scaling.factor")
    original = index.get(f"{arch}.rope.scaling.original_context_length")
    if kind in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none"):
        raise ValueError(f"{path}: GGUF rope scaling type {kind!r} is not supported.")
    freqs = index.tensors.get("rope_freqs.weight")
    if freqs is None:
        return None
    factors = np.asarray(dequantize(freqs.data, freqs.tensor_type), dtype=np.float64).reshape(-1)
    theta = float(index.get(f"{arch}.rope.freq_base", 10000.0))
    return _llama3_scaling_from_factors(factors, theta, head_dim, path)


def _llama3_scaling_from_factors(
    factors: np.ndarray, theta: float, head_dim: int, path: Path
) -> dict[str, Any]:
    """Recover Llama 3 rope parameters from llama.cpp's precomputed per-frequency factors.

    llama.cpp stores only the factors; every released Llama 3.x uses low/high frequency
    factors 1 and 4 over an 8192-token original context, so try that and check it reproduces
    the tensor exactly rather than guess silently.
    """
    scaling = {
        "rope_type": "llama3",
        "factor": float(f"{factors.max():.6g}"),  # undo float32 storage: 7.9999995 -> 8
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if not np.allclose(llama3_rope_factors(scaling, theta, head_dim), factors, rtol=1e-4):
        raise ValueError(
            f"{path}: the rope_freqs tensor does not match Llama 3 rope scaling with the usual "
            "parameters; convert this model to a Hugging Face directory and load that instead."
        )
    return scaling


def llama3_rope_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as rope_freqs for Llama 3."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"]
            )
            out.append(1.0 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.asarray(out)


def gguf_name(hf_name: str, config: LlamaConfig | None = None) -> str:
    """llama.cpp's tensor name for a Hugging Face parameter name (of `config`'s family)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".", 3)  # model, layers, i, suffix
    suffixes = _SANDWICH_SUFFIX if config is not None and config.sandwich_norms else _GGUF_SUFFIX
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in suffixes:
        return f"blk.{parts[2]}.{suffixes[parts[3]]}"
    raise KeyError(f"no GGUF tensor corresponds to {hf_name!r}")


def layer_tensor_names(layer: int, config: LlamaConfig | None = None) -> list[str]:
    """Hugging Face names of one decoder layer's parameters (biases and q/k norms as
    the config calls for them)."""
    suffixes = list(_LAYER_TENSORS)
    if config is not None:
        suffixes += [s for s, (flag, _) in _OPTIONAL_LAYER_TENSORS.items() if getattr(config, flag)]
    return [f"model.layers.{layer}.{suffix}" for suffix in suffixes]


def _rope_permuted(config: LlamaConfig) -> bool:
    """Whether the converter permuted q/k rows: it does for llama, not for qwen2/qwen3."""
    return config.model_type in ("llama", "mistral")


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's q/k row permutation (interleaved rope -> rotate_half).

    llama.cpp reorders each head's rows from [first half | second half] to interleaved
    pairs; transformers' GGUF loader applies this same inverse.
    """
    half = weight.shape[0] // n_heads // 2
    w = weight.reshape(n_heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def gguf_state_dict(
    path: Path, config: LlamaConfig, names: Iterable[str], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Dequantize just the named tensors (HF names); untouched ones are never read from disk."""
    tensors = open_gguf(path).tensors
    permuted = _rope_permuted(config)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        src = gguf_name(name, config)
        t = tensors.get(src)
        if t is None:
            raise ValueError(f"{path}: GGUF file lacks tensor {src} (for {name}).")
        w = dequantize(t.data, t.tensor_type)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope_rows(w, config.num_attention_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rope_rows(w, config.num_key_value_heads)
        # Copy out of the read-only memmap before handing the tensor to torch.
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True)).to(dtype)
    return out


def weight_blocks(path: Path, config: LlamaConfig, name: str) -> BlockWeights | None:
    """A weight's quantized blocks in the block kernels' layout, rows in Hugging Face order
    (so they stand for exactly what `gguf_state_dict` returns), or None for another format."""
    t = open_gguf(path).tensors.get(gguf_name(name, config))
    blocks = None if t is None else tensor_blocks(t)
    if blocks is not None and _rope_permuted(config) and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if name.endswith("q_proj.weight") else config.num_key_value_heads
        blocks = blocks.rows(unpermute_rope_rows(np.arange(blocks.codes.shape[0]), heads))
    return blocks


def tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The GGUF's chat template and special-token ids, as a tokenizer needs them."""
    index = open_gguf(path)
    keys = ("bos", "eos", "eot", "eom", "unknown", "padding")
    meta: dict[str, Any] = {f"{k}_token_id": index.get(f"tokenizer.ggml.{k}_token_id") for k in keys}
    meta["chat_template"] = index.get("tokenizer.chat_template")
    return meta
