"""Optional int8 weights for CPU (``--dtype int8``): W8A8 where it is safe, SmoothQuant-folded.

On x86 CPUs with AVX-512 VNNI, fbgemm's int8 GEMM is several times faster than fp32 and
reads a quarter of the bytes, which is what bounds batch-1 decode. fbgemm quantizes the
activations per tensor, at run time, and that is where the error comes from: one outlier
channel sets the scale for all. So, measured on the bundled model (benchmarks/int8_quality.py):

- the q/k/v and gate/up projections read RMSNorm outputs whose outlier channels are
  tamed by SmoothQuant (Xiao et al., 2023): per input channel j a scale
  s_j = max|X_j|^a / max|W_j|^(1-a), folded into the norm weight (X / s) and the
  projection's columns (W * s), so the model's function is unchanged in exact arithmetic
  and nothing is added at run time. max|X_j| comes from one forward pass over a fixed
  calibration text (below);
- the LM head reads the final norm's output, so it is smoothed the same way (its own
  alpha; the head is a copy of the tied embedding, so the input embedding is untouched);
- the output projection is plain W8A8;
- the down projection's input (SiLU(gate) * up) has outliers no per-tensor int8 scale
  holds, so it keeps fp16 weights (fbgemm's fp16 GEMM, fp32 arithmetic).

The model files are already 4-bit quantized (Q4_1), so 8-bit weights lose little.

Calls of one row (batch-1 decode) can instead run on the model file's own blocks (Q4_1,
Q8_0, Q4_K, Q5_K, Q6_K; `FileBlocks`, native q4_linear / q8_linear): the file's weights
exactly, per-32 int8 activations with the smoothing scales multiplied back in.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from strata.engine.gguf_blocks import BlockWeights
from strata.engine.kernels import raw_op

# Calibration text for the activation ranges: prose, dialogue, code and numbers, so the
# channels that light up on each kind of input are all seen. Fixed, so loading is
# deterministic; a few hundred tokens are enough for per-channel maxima.
CALIBRATION_TEXT = """\
<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
<|im_start|>user
Can you explain how a paged KV cache works, and why it helps an inference server?<|im_end|>
<|im_start|>assistant
A paged KV cache stores the keys and values of each sequence in fixed-size blocks, much
like virtual memory pages. A block table maps each sequence's logical positions to
physical blocks, so memory is allocated on demand and freed the moment a request ends.
Sequences that share a prompt prefix can share its blocks, which saves both memory and
the compute of the prefill.<|im_end|>
The river wound through the valley for three hundred miles before it reached the sea. In
the spring of 1887 the town council voted 7 to 2 to build a stone bridge; it cost $41,250
and took nineteen months. "We shall not see its like again," the mayor said, and he was
right: the flood of 1903 carried away every other crossing between Millbrook and the coast.

def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    i = j = 0
    out = []
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]

SELECT name, COUNT(*) AS n FROM orders WHERE created_at >= '2024-01-01' GROUP BY name;
Photosynthesis converts light energy into chemical energy: 6 CO2 + 6 H2O -> C6H12O6 + 6 O2.
Q: What is 17 * 23? A: 391. Q: What is the capital of Japan? A: Tokyo.
Les feuilles tombent doucement en automne, et le vent emporte les souvenirs de l'été.
"""
SMOOTH_ALPHA = 0.7
# The LM head reads the final norm's output: its scales fold into that norm. Measured on
# the bundled model, a = 0.5 is best there (KL vs fp32 0.031 -> 0.013).
HEAD_SMOOTH_ALPHA = 0.5


def pack_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 blocks (w = d * code + m) into the native q4_linear op's layout: (qs, d, m).

    qs: per row and per 64 inputs, 32 bytes, byte i holding input i (low nibble) and input
    32+i (high nibble); d and m float32 when given float32 (Q4_K's exact scales), else
    float16 as a Q4_1 file stores them. K must be a multiple of 64.
    """
    n, k = codes.shape
    if k % 64:
        raise ValueError(f"q4 weights need K a multiple of 64, got {k}")
    c = codes.astype(np.uint8).reshape(n, k // 64, 2, 32)
    qs = (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, k // 2)
    scale = np.float32 if d.dtype == np.float32 else np.float16
    # clone(): torch's allocator aligns to 64 bytes, numpy's to 16.
    return (torch.from_numpy(np.ascontiguousarray(qs)).clone(),
            torch.from_numpy(np.ascontiguousarray(d, dtype=scale)).clone(),
            torch.from_numpy(np.ascontiguousarray(m, dtype=scale)).clone())


def _block_call(parts: list[BlockWeights], col_scale: torch.Tensor | None) -> tuple[object, tuple]:
    """One native op and its arguments for blocks of one kind stacked by rows."""
    codes = np.concatenate([p.codes for p in parts], axis=0)
    d = np.concatenate([p.d for p in parts], axis=0)
    if parts[0].kind == "q4":
        m = np.concatenate([p.m for p in parts], axis=0)  # type: ignore[misc]
        return raw_op(torch.ops.strata.q4_linear), (*pack_q4_1(codes, d, m), col_scale, True)
    m8 = None if parts[0].m is None else torch.from_numpy(np.concatenate([p.m for p in parts], axis=0)).clone()
    return raw_op(torch.ops.strata.q8_linear), (torch.from_numpy(codes).clone(), torch.from_numpy(d).clone(),
                                               col_scale, True, m8)


def _concat_calls(x: torch.Tensor, *calls: tuple[object, tuple]) -> torch.Tensor:
    """A fused projection whose parts are stored in different block formats."""
    return torch.cat([op(x, *args) for op, args in calls], dim=1)  # type: ignore[operator]


class _PackedLinear(nn.Module):
    """A Linear whose weight fbgemm has prepacked; subclasses pack and call.

    A bias (Qwen2's q/k/v) stays float32 and is added after either GEMM path.

    With the model file's own blocks attached (`attach_blocks`), calls of at most
    `small_max_tokens` rows run the native q4_linear / q8_linear op on them instead:
    decode at small batch reads every weight once per step, so it goes at the speed of
    the bytes read, and those kernels read 4.5 (Q4_1), 6 (Q4_K), 8.5 (Q8_0), 10 (Q5_K,
    Q6_K) bits per weight with per-32 activation scales.
    """

    small_max_tokens = 0

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        bias = linear.bias
        self.bias = None if bias is None else bias.detach().float().clone()

    def attach_blocks(self, parts: list[BlockWeights], col_scale: torch.Tensor | None, max_tokens: int) -> None:
        """Use these blocks (the fused projection's parts, stacked by rows) for inputs of up
        to `max_tokens` rows.

        `col_scale` multiplies the input first: the SmoothQuant scale folded out of the
        input norm, so the blocks see the activations they were quantized against.
        """
        rows, cols = sum(p.codes.shape[0] for p in parts), parts[0].codes.shape[1]
        if (rows, cols) != (self.out_features, self.in_features):
            raise ValueError(f"blocks of {rows}x{cols} weights do not fit a "
                             f"{self.in_features}->{self.out_features} projection")
        # Consecutive parts of one layout share a call; a Q4_K_M file's v (Q6_K) does not
        # share q and k's (Q4_K).
        runs: list[list[BlockWeights]] = []
        for p in parts:
            key = (p.kind, p.group, p.d.dtype, p.m is None)
            if runs and (runs[-1][0].kind, runs[-1][0].group, runs[-1][0].d.dtype, runs[-1][0].m is None) == key:
                runs[-1].append(p)
            else:
                runs.append([p])
        calls = [_block_call(run, col_scale) for run in runs]
        if len(calls) == 1:
            self._small, self._small_args = calls[0]
        else:
            self._small, self._small_args = _concat_calls, tuple(calls)
        self.small_max_tokens = max_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.forward_2d(x.reshape(-1, shape[-1]).float().contiguous())
        return y.reshape(*shape[:-1], self.out_features)

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] float32 -> [T, out]: the engine's hot path, without reshapes."""
        if x.shape[0] <= self.small_max_tokens:
            y = self._small(x, *self._small_args)
        else:
            y = self.packed_forward(x)
        return y if self.bias is None else y.add_(self.bias)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] float32 -> [T, out] through the fbgemm-packed weight."""
        raise NotImplementedError


class Int8Linear(_PackedLinear):
    """Weights prepacked int8, per output channel; activations quantized per call (W8A8)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            # torch >= 2.12 warns that quantized tensor creation is deprecated; fbgemm's
            # prepacked linear still needs it, and the torch pin (< 2.14) keeps it there.
            warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")
            qw = torch.quantize_per_channel(w, scales, zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self._linear = raw_op(torch.ops.quantized.linear_dynamic)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.packed, False)


class Fp16Linear(_PackedLinear):
    """Weights prepacked fp16, fp32 arithmetic."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), None)
        self._linear = raw_op(torch.ops.quantized.linear_dynamic_fp16)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.packed)


def blocks_available() -> bool:
    """Whether the native q4_linear/q8_linear ops are built with their AVX-512 VNNI path."""
    from strata.engine.kernels import load_paged_attention

    return load_paged_attention() and bool(torch.ops.strata.q4_vnni_available())


def int8_supported() -> bool:
    """Whether this torch build has an x86 int8 GEMM backend."""
    return "fbgemm" in torch.backends.quantized.supported_engines or (
        "x86" in torch.backends.quantized.supported_engines
    )


@torch.no_grad()
def smooth_quant_(model: nn.Module, calibration_ids: list[int],
                  alpha: float = SMOOTH_ALPHA) -> dict[tuple[str, int], torch.Tensor]:
    """Fold SmoothQuant scales into the norms and the q/k/v, gate/up and head columns, in place.

    `model` is a float32 LlamaModel with its embedding (the calibration runs from token ids).
    Returns the per-input-channel scales s by ("qkv" | "gate_up", layer index) and
    ("head", 0) for the LM head (folded into the final norm): the norms now emit X / s.
    """
    stats: dict[tuple[str, int], torch.Tensor] = {}

    def recorder(key: tuple[str, int]):  # type: ignore[no-untyped-def]
        def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0)
            stats[key] = torch.maximum(stats[key], x) if key in stats else x

        return hook

    hooks = []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.self_attn.qkv_proj.register_forward_hook(recorder(("qkv", i))))
        hooks.append(layer.mlp.gate_up_proj.register_forward_hook(recorder(("gate_up", i))))
    head = getattr(model, "lm_head", None) if getattr(model, "norm", None) is not None else None
    if head is not None:
        hooks.append(head.register_forward_hook(recorder(("head", 0))))
    scales: dict[tuple[str, int], torch.Tensor] = {}
    try:
        ids = torch.tensor(calibration_ids, dtype=torch.long)
        with torch.inference_mode():
            hidden = model(ids, torch.arange(len(ids)))  # the plain causal reference path
            if head is not None:
                model.compute_logits(hidden)
    finally:
        for h in hooks:
            h.remove()
    for i, layer in enumerate(model.layers):
        for key, linear, norm in (
            ("qkv", layer.self_attn.qkv_proj, layer.input_layernorm),
            # The norm right before the MLP: Gemma's sandwich norms put their own there.
            ("gate_up", layer.mlp.gate_up_proj,
             layer.post_attention_layernorm if layer.pre_feedforward_layernorm is None
             else layer.pre_feedforward_layernorm),
        ):
            w = linear.weight
            s = stats[(key, i)].clamp(min=1e-5).pow(alpha) / w.abs().amax(dim=0).clamp(min=1e-5).pow(1 - alpha)
            w.mul_(s)
            norm.div_(s)
            scales[(key, i)] = s.float().contiguous()
    if head is not None:
        # The head is its own copy of the (tied) embedding, so scaling its columns leaves
        # the input embedding alone.
        w = head.weight
        s = stats[("head", 0)].clamp(min=1e-5).pow(HEAD_SMOOTH_ALPHA) / w.abs().amax(dim=0).clamp(
            min=1e-5).pow(1 - HEAD_SMOOTH_ALPHA)
        w.mul_(s)
        model.norm.div_(s)
        scales[("head", 0)] = s.float().contiguous()
    return scales


@dataclass(frozen=True)
class FileBlocks:
    """The model file's own quantized blocks, by Hugging Face tensor name.

    `weights(name)` gives a tensor's blocks in the kernels' layout (rows in Hugging Face
    order), or None for a format the block kernels do not read.
    """

    weights: Callable[[str], BlockWeights | None]


# Up to this many tokens per call, projections with the file's blocks attached run the
# block kernels: they read fewer bytes than fbgemm's int8 GEMM, which wins at batch 1-3,
# and from 4 rows on their per-row work catches up with the GEMM (decode step times per
# batch size: docs/results.md).
SMALL_MAX_TOKENS = 3


def _attach_file_blocks(linear: _PackedLinear, blocks: FileBlocks, names: list[str],
                        scale: torch.Tensor | None, max_tokens: int) -> None:
    """Give `linear` the named tensors' blocks when all have them and K suits the kernels."""
    parts = [blocks.weights(n) for n in names]
    if linear.in_features % 64 == 0 and all(p is not None for p in parts):
        linear.attach_blocks(parts, scale, max_tokens)  # type: ignore[arg-type]


def _projections(model: nn.Module) -> list[tuple[nn.Module, list[str], tuple[str, int] | None]]:
    """Each projection of the model (and its head), the file tensors it is made of, and the
    key of its SmoothQuant scale (None: not smoothed)."""
    out: list[tuple[nn.Module, list[str], tuple[str, int] | None]] = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        p = f"model.layers.{model.layer_start + i}."
        out += [
            (attn.qkv_proj, [p + f"self_attn.{n}_proj.weight" for n in "qkv"], ("qkv", i)),
            (attn.o_proj, [p + "self_attn.o_proj.weight"], None),
            (mlp.gate_up_proj, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], ("gate_up", i)),
            (mlp.down_proj, [p + "mlp.down_proj.weight"], None),
        ]
    if getattr(model, "lm_head", None) is not None:
        head = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
        out.append((model.lm_head, [head], ("head", 0)))
    return out


def quantize_model(model: nn.Module, calibration_ids: list[int] | None = None,
                   blocks: FileBlocks | None = None, small_max_tokens: int = SMALL_MAX_TOKENS) -> int:
    """Smooth (when calibration ids are given) and swap the projections; returns how many.

    q/k/v, gate/up, the output projection and the LM head become Int8Linear; the down
    projection becomes Fp16Linear (see the module docstring for why). With `blocks` (the
    file's own quantized tensors), every projection stored in a block format also
    gets them for calls of up to `small_max_tokens` rows (Q4_1, Q8_0, Q4_K, Q5_K, Q6_K).
    """
    scales: dict[tuple[str, int], torch.Tensor] = {}
    if calibration_ids and getattr(model, "embed_tokens", None) is not None:
        scales = smooth_quant_(model, calibration_ids)
    use_blocks = blocks is not None and small_max_tokens > 0 and blocks_available()
    count = 0
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = Int8Linear(attn.qkv_proj)
        attn.o_proj = Int8Linear(attn.o_proj)
        mlp.gate_up_proj = Int8Linear(mlp.gate_up_proj)
        mlp.down_proj = Fp16Linear(mlp.down_proj)
        count += 4
    if getattr(model, "lm_head", None) is not None:
        model.lm_head = Int8Linear(model.lm_head)
        count += 1
    if use_blocks:
        for linear, names, scale_key in _projections(model):
            _attach_file_blocks(linear, blocks, names, scales.get(scale_key) if scale_key else None,  # type: ignore[arg-type]
                                small_max_tokens)
    invalidate = getattr(model, "invalidate_plan", None)
    if invalidate is not None:
        invalidate()
    return count


class BlockHybridLinear(_PackedLinear):
    """A float (bf16/fp16/fp32) Linear whose calls of few rows run the file's own blocks.

    The default on a CPU with fast float GEMMs (`--dtype auto`): batched rows (decode at
    concurrency, prefill) go through the float GEMM, where matrix units make compute
    cheap; 1 to `small_max_tokens` rows, where a step reads every weight once and
    bytes decide, go through the 4.5-bit blocks. The nn.Linear stays a child, so its
    weight is where the runner's warm-up and the tests look for it.
    """

    def __init__(self, linear: nn.Linear) -> None:
        from strata.engine.model import _padded_linear

        super().__init__(linear)
        self.linear = linear
        self.dtype = linear.weight.dtype
        self._gemm = _padded_linear(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.forward_2d(x.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], self.out_features)

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] -> [T, out] in the Linear's dtype: blocks up to `small_max_tokens` rows."""
        if x.shape[0] > self.small_max_tokens:
            return self._gemm(x)
        y = self._small(x.float().contiguous(), *self._small_args)
        if self.bias is not None:
            y.add_(self.bias)
        return y if self.dtype == torch.float32 else y.to(self.dtype)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(x)


def attach_hybrid_blocks(model: nn.Module, blocks: FileBlocks,
                         small_max_tokens: int = SMALL_MAX_TOKENS) -> int:
    """Wrap each float projection (and the head) whose file tensors are in a block format
    as a `BlockHybridLinear`; returns how many. No-op without the VNNI block kernels."""
    if small_max_tokens <= 0 or not blocks_available():
        return 0
    count = 0
    for linear, names, _ in _projections(model):
        if not isinstance(linear, nn.Linear):
            continue
        hybrid = BlockHybridLinear(linear)
        _attach_file_blocks(hybrid, blocks, names, None, small_max_tokens)
        if not hybrid.small_max_tokens:
            continue
        _replace(model, linear, hybrid)
        count += 1
    invalidate = getattr(model, "invalidate_plan", None)
    if invalidate is not None:
        invalidate()
    return count


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` is among the model's submodules."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError("module not found in the model")
