"""A GGUF tensor's quantized blocks, converted exactly into the native block kernels' layouts.

Decode at small batch reads every weight once per step; computing from the file's own
blocks reads far fewer bytes than any dequantized copy. Each supported block format maps
onto one of two native ops (strata/engine/csrc/q4_linear.cpp) with no rounding:

- Q4_1, Q4_K -> q4_linear: 4-bit codes q, and per 32 inputs a scale d and a minimum m,
  w = d*q + m. Q4_K's super-block scale times its 6-bit sub-block scale (and the same for
  the minima) is exact in float32, not in float16, so K-quant scales stay float32.
- Q8_0, Q5_K, Q6_K -> q8_linear: int8 codes with a scale per 32 inputs (Q8_0, Q5_K) or per
  16 (Q6_K), and for Q5_K a minimum per 32: Q5_K's codes 0..31 and Q6_K's -32..31 fit int8.

`BlockWeights.dequantize` is what the kernels compute with; it equals gguf's own
dequantization bit for bit (tests/engine/test_gguf_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, ReaderTensor

QK_K = 256  # inputs per K-quant super-block

# Weight formats the engine reads: the dequantized path takes all of them; the small-batch
# block kernels take those in BLOCK_TYPES.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
BLOCK_TYPES = ("Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


@dataclass(frozen=True)
class BlockWeights:
    """One weight matrix as a block kernel reads it: w = d * codes + m per group of inputs.

    kind "q4": codes uint8 0..15 [N, K], d and m [N, K/32] (q4_linear);
    kind "q8": codes int8 [N, K], d [N, K/group], m [N, K/32] or None (q8_linear).
    d and m are float16 where the file stores float16 (Q4_1, Q8_0), else float32.
    """

    kind: str
    codes: np.ndarray
    d: np.ndarray
    m: np.ndarray | None
    group: int = 32

    def dequantize(self) -> np.ndarray:
        """The float32 weights [N, K] these blocks stand for, computed as gguf computes them."""
        n, k = self.codes.shape
        d = self.d.astype(np.float32)
        q = self.codes.reshape(n, k // self.group, self.group).astype(np.float32)
        w = (d[..., None] * q).reshape(n, k)
        if self.m is not None:
            w = (w.reshape(n, k // 32, 32) + self.m.astype(np.float32)[..., None]).reshape(n, k)
        return w

    def rows(self, perm: np.ndarray) -> BlockWeights:
        """The same blocks with rows reordered (q/k un-permutation)."""
        return BlockWeights(self.kind, self.codes[perm], self.d[perm],
                            None if self.m is None else self.m[perm], self.group)


def check_tensor_types(tensors: dict[str, ReaderTensor], source: str) -> None:
    """Refuse a file holding a weight format strata does not read, naming the ones it does."""
    bad = sorted({t.tensor_type.name for t in tensors.values()} - set(SUPPORTED_TENSOR_TYPES))
    if bad:
        raise ValueError(
            f"{source}: GGUF tensor type(s) {', '.join(bad)} are not supported; strata reads "
            f"{', '.join(SUPPORTED_TENSOR_TYPES)}. Convert the model to one of these (e.g. Q4_K_M or Q8_0)."
        )


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray, rows: int, span: int = 32) -> np.ndarray:
    """Per `span` bytes: low nibbles are the first `span` inputs, high nibbles the next
    (32 for Q4_K and Q5_K; 16, one block, for Q4_1)."""
    q = qs.reshape(rows, -1, 1, span) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(rows, -1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit sub-block scales and eight 6-bit minima."""
    lo, mn, hi = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([mn & 0x3F, (hi >> 4) | ((mn >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mins.astype(np.float32)


def _q4_k(raw: np.ndarray, rows: int) -> BlockWeights:
    b = raw.reshape(rows, -1, 144)  # d f16, dmin f16, 12 scale bytes, 128 bytes of codes
    d, dmin = _f16(b[..., 0:2]).astype(np.float32), _f16(b[..., 2:4]).astype(np.float32)
    sc, mins = _k_scales(b[..., 4:16])
    codes = _nibbles(b[..., 16:], rows)
    return BlockWeights("q4", codes, (d[..., None] * sc).reshape(rows, -1),
                        -(dmin[..., None] * mins).reshape(rows, -1))


def _q5_k(raw: np.ndarray, rows: int) -> BlockWeights:
    b = raw.reshape(rows, -1, 176)  # d, dmin, 12 scale bytes, 32 bytes of high bits, 128 of nibbles
    d, dmin = _f16(b[..., 0:2]).astype(np.float32), _f16(b[..., 2:4]).astype(np.float32)
    sc, mins = _k_scales(b[..., 4:16])
    low = _nibbles(b[..., 48:], rows).reshape(rows, -1, 8, 32)
    # Bit i of high-bit byte j is input j of sub-block i.
    high = (b[..., 16:48][:, :, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
    codes = (low | (high << 4)).reshape(rows, -1).view(np.int8)
    return BlockWeights("q8", codes, (d[..., None] * sc).reshape(rows, -1),
                        -(dmin[..., None] * mins).reshape(rows, -1))


def _q6_k(raw: np.ndarray, rows: int) -> BlockWeights:
    b = raw.reshape(rows, -1, 210)  # 128 bytes low nibbles, 64 of 2-bit highs, 16 int8 scales, d
    low = b[..., 0:128].reshape(rows, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    low = (low & 0x0F).reshape(rows, -1, 2, 128)  # per 128-input half: inputs 0..127
    high = b[..., 128:192].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    high = (high & 0x03).reshape(rows, -1, 2, 128)
    codes = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(rows, -1)
    scales = b[..., 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210]).astype(np.float32)
    return BlockWeights("q8", codes, (d[..., None] * scales).reshape(rows, -1), None, group=16)


def _q4_1(raw: np.ndarray, rows: int) -> BlockWeights:
    b = raw.reshape(rows, -1, 20)  # d f16, m f16, 16 bytes of codes
    return BlockWeights("q4", _nibbles(b[..., 4:], rows, 16), _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def _q8_0(raw: np.ndarray, rows: int) -> BlockWeights:
    b = raw.reshape(rows, -1, 34)  # d f16, 32 int8
    return BlockWeights("q8", b[..., 2:].copy().view(np.int8).reshape(rows, -1), _f16(b[..., 0:2]), None)


_DECODERS = {"Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
assert tuple(_DECODERS) == BLOCK_TYPES


def tensor_blocks(t: ReaderTensor) -> BlockWeights | None:
    """A 2-D GGUF tensor's blocks in kernel layout (rows in file order), or None for another format."""
    decode = _DECODERS.get(GGMLQuantizationType(t.tensor_type).name)
    if decode is None or len(t.shape) != 2:
        return None
    blocks = decode(np.asarray(t.data), int(t.shape[-1]))
    return BlockWeights(blocks.kind, np.ascontiguousarray(blocks.codes), np.ascontiguousarray(blocks.d),
                        None if blocks.m is None else np.ascontiguousarray(blocks.m), blocks.group)
