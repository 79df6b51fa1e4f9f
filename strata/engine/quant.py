"""Optional int8 weights for CPU: per-channel W8, dynamically quantized activations (A8).

On x86 CPUs with AVX-512 VNNI, fbgemm's int8 GEMM is several times faster than
fp32 and reads a quarter of the bytes, which is what bounds batch-1 decode. The
model files are already 4-bit quantized (Q4_1), so 8-bit weights lose little;
activations are quantized per call, as llama.cpp quantizes them to Q8.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """A bias-free Linear whose weight is prepacked int8, per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        qw = torch.quantize_per_channel(w, scales, zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self._linear = torch.ops.quantized.linear_dynamic.default
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self.packed, False)
        return y.reshape(*shape[:-1], self.out_features)

    def forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] float32 -> [T, out]: the engine's hot path, without reshapes."""
        return self._linear(x, self.packed, False)


def int8_supported() -> bool:
    """Whether this torch build has an x86 int8 GEMM backend."""
    return "fbgemm" in torch.backends.quantized.supported_engines or (
        "x86" in torch.backends.quantized.supported_engines
    )


def quantize_linears(module: nn.Module) -> int:
    """Replace every nn.Linear below `module` by Int8Linear; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(module, name, Int8Linear(child))
            count += 1
        else:
            count += quantize_linears(child)
    invalidate = getattr(module, "invalidate_plan", None)
    if invalidate is not None:
        invalidate()
    return count
