"""Test-only GGUF writer: K-quant blocks (Q4_K / Q5_K / Q6_K) in ggml's byte layout, and
small random Llama files with their matrices in any of those or gguf-py's own formats.

The installed gguf package dequantizes K-quants but cannot quantize them, so tests make
their own blocks here. A plain min/max quantizer (not llama.cpp's error-minimising
search): any valid block is a fair test of the readers, which are checked against gguf's
dequantization, never against this module.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quant_shape_to_byte_shape, quantize

QK_K = 256


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v.astype(np.float16)[..., None]).view(np.uint8)


def _scale_bytes(sc: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and minima -> Q4_K/Q5_K's 12 bytes."""
    sc, mins = sc.astype(np.uint8), mins.astype(np.uint8)
    out = np.zeros((*sc.shape[:-1], 12), np.uint8)
    out[..., 0:4] = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (mins[..., :4] & 0x3F) | ((mins[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 0x0F) | ((mins[..., 4:] & 0x0F) << 4)
    return out


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 64j + i] codes -> per 32 bytes: low nibble input i, high nibble input 32 + i."""
    q = q.reshape(*q.shape[:-1], -1, 2, 32).astype(np.uint8)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*q.shape[:-3], -1)


def _affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per 32 inputs w ~ d*sc*q - dmin*m with 6-bit sc, m; returns (d, dmin, sc, m, q)."""
    rows = x.shape[0]
    sub = x.reshape(rows, -1, 8, 32)  # super-blocks of 8 sub-blocks
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / levels
    d = scale.max(-1) / 63
    dmin = (-lo).max(-1) / 63
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d16 > 0, d16, 1)[..., None]), 0, 63)
    m = np.clip(np.round(-lo / np.where(dmin16 > 0, dmin16, 1)[..., None]), 0, 63)
    step = (d16[..., None] * sc)[..., None]
    q = np.clip(np.round((sub + (dmin16[..., None] * m)[..., None]) / np.where(step > 0, step, 1)), 0, levels)
    return d16, dmin16, sc, m, q.reshape(rows, -1, QK_K).astype(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[N, K] float -> uint8 [N, K/256*144]."""
    d, dmin, sc, m, q = _affine(x, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _scale_bytes(sc, m), _pack_nibbles(q)],
                          axis=-1).reshape(x.shape[0], -1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """[N, K] float -> uint8 [N, K/256*176]."""
    d, dmin, sc, m, q = _affine(x, 31)
    bits = (q.reshape(*q.shape[:-1], 8, 32) >> 4) & 1  # sub-block i's high bits -> bit i
    high = (bits << np.arange(8, dtype=np.uint8)[:, None]).sum(-2).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _scale_bytes(sc, m), high, _pack_nibbles(q & 0x0F)],
                          axis=-1).reshape(x.shape[0], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[N, K] float -> uint8 [N, K/256*210]: per 16 inputs an int8 scale, codes -32..31."""
    rows = x.shape[0]
    sub = x.reshape(rows, -1, 16, 16)
    scale = np.abs(sub).max(-1) / 31
    d = (np.abs(scale).max(-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)[..., None]), -128, 127)
    step = (d[..., None] * sc)[..., None]
    q = np.clip(np.round(sub / np.where(step > 0, step, 1)), -32, 31).astype(np.int16) + 32
    q = q.reshape(rows, -1, 2, 128).astype(np.uint8)  # two halves of 128 inputs
    low = q & 0x0F
    ql = (low[..., :64] | (low[..., 64:] << 4))  # per half 64 bytes
    hi = (q >> 4).reshape(rows, -1, 2, 4, 32)
    qh = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    return np.concatenate([ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64),
                           sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=-1).reshape(rows, -1)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 512
TINY = (HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB)

# A file per recipe: the type of every matrix, or llama.cpp's Q4_K_M mix (v and down in
# Q6_K, the rest Q4_K, embedding Q6_K), which fuses differently typed q/k and v.
RECIPES = {
    "Q4_K": {}, "Q5_K": {}, "Q6_K": {}, "Q8_0": {}, "Q4_1": {},
    "Q4_K_M": {"attn_v": "Q6_K", "ffn_down": "Q6_K", "token_embd": "Q6_K", "": "Q4_K"},
}


def _quantize(w: np.ndarray, kind: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in QUANTIZERS:
        return QUANTIZERS[kind](w)
    if kind == "Q2_K":  # no quantizer here; zero blocks of the right size
        return np.zeros(quant_shape_to_byte_shape(w.shape, qtype), np.uint8)
    return quantize(w, qtype)


def write_gguf(path: Path, recipe: str, seed: int = 0, extra: tuple[str, str] | None = None,
               shape: tuple[int, int, int, int, int, int] = TINY) -> Path:
    """A Llama GGUF with random weights, matrices stored per `recipe` (a RECIPES key or a
    type name); `extra` = (tensor short name, type) overrides one kind of tensor.
    `shape`: hidden, feed-forward, layers, heads, kv heads, vocabulary."""
    hidden, ffn, layers, heads, kv_heads, vocab = shape
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden // heads * kv_heads, hidden),
              "attn_v": (hidden // heads * kv_heads, hidden), "attn_output": (hidden, hidden),
              "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    mix = RECIPES.get(recipe, {})
    tensors: dict[str, np.ndarray | tuple[np.ndarray, str]] = {}
    tensors["token_embd.weight"] = (rng.standard_normal((vocab, hidden)).astype(np.float32) * 0.5, "token_embd")
    tensors["output_norm.weight"] = np.ones(hidden, np.float32)
    for i in range(layers):
        tensors[f"blk.{i}.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        tensors[f"blk.{i}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        for short, dims in shapes.items():
            tensors[f"blk.{i}.{short}.weight"] = (rng.standard_normal(dims).astype(np.float32) * 0.06, short)
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            w.add_tensor(name, value)
            continue
        arr, short = value
        kind = mix.get(short, mix.get("", recipe))
        if extra is not None and short == extra[0]:
            kind = extra[1]
        w.add_tensor(name, _quantize(arr, kind), raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
