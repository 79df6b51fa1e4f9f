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
- the output projection and the LM head are plain W8A8;
- the down projection's input (SiLU(gate) * up) has outliers no per-tensor int8 scale
  holds, so it keeps fp16 weights (fbgemm's fp16 GEMM, fp32 arithmetic).

The model files are already 4-bit quantized (Q4_1), so 8-bit weights lose little.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

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


class _PackedLinear(nn.Module):
    """A bias-free Linear whose weight fbgemm has prepacked; subclasses pack and call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.forward_2d(x.reshape(-1, shape[-1]).float())
        return y.reshape(*shape[:-1], self.out_features)

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] float32 -> [T, out]: the engine's hot path, without reshapes."""
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

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.packed, False)


class Fp16Linear(_PackedLinear):
    """Weights prepacked fp16, fp32 arithmetic."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), None)
        self._linear = raw_op(torch.ops.quantized.linear_dynamic_fp16)

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.packed)


def int8_supported() -> bool:
    """Whether this torch build has an x86 int8 GEMM backend."""
    return "fbgemm" in torch.backends.quantized.supported_engines or (
        "x86" in torch.backends.quantized.supported_engines
    )


@torch.no_grad()
def smooth_quant_(model: nn.Module, calibration_ids: list[int], alpha: float = SMOOTH_ALPHA) -> None:
    """Fold SmoothQuant scales into each layer's norms and q/k/v, gate/up columns, in place.

    `model` is a float32 LlamaModel with its embedding (the calibration runs from token ids).
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
    try:
        ids = torch.tensor(calibration_ids, dtype=torch.long)
        with torch.inference_mode():
            model(ids, torch.arange(len(ids)))  # the plain causal reference path
    finally:
        for h in hooks:
            h.remove()
    for i, layer in enumerate(model.layers):
        for key, linear, norm in (
            ("qkv", layer.self_attn.qkv_proj, layer.input_layernorm),
            ("gate_up", layer.mlp.gate_up_proj, layer.post_attention_layernorm),
        ):
            w = linear.weight
            s = stats[(key, i)].clamp(min=1e-5).pow(alpha) / w.abs().amax(dim=0).clamp(min=1e-5).pow(1 - alpha)
            w.mul_(s)
            norm.div_(s)


def quantize_model(model: nn.Module, calibration_ids: list[int] | None = None) -> int:
    """Smooth (when calibration ids are given) and swap the projections; returns how many.

    q/k/v, gate/up, the output projection and the LM head become Int8Linear; the down
    projection becomes Fp16Linear (see the module docstring for why).
    """
    if calibration_ids and getattr(model, "embed_tokens", None) is not None:
        smooth_quant_(model, calibration_ids)
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
    invalidate = getattr(model, "invalidate_plan", None)
    if invalidate is not None:
        invalidate()
    return count
