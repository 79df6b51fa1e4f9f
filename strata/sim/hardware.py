"""The hardware and model tables the roofline reads: peak numbers, efficiency factors, shapes.

GPU numbers are the vendors' dense bf16 peaks and HBM bandwidths; the efficiency factors
and start-up components are documented defaults (``strata.sim.perf_model`` says why).
Models are named Llama-family shapes or any Hugging Face ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from strata.engine.model_config import LlamaConfig

# -- hardware -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    """A GPU's peak numbers (dense bf16, HBM, interconnect) and the efficiency factors."""

    name: str
    flops: float  # dense bf16 FLOP/s
    mem_bw: float  # HBM bytes/s
    mem_bytes: float  # HBM capacity
    link_bw: float  # NVLink bytes/s per direction (tensor-parallel all-reduce)
    link_latency_s: float = 10e-6  # per all-reduce
    mfu: float = 0.6
    bw_eff: float = 0.8
    overhead_s: float = 0.002
    gpu_memory_utilization: float = 0.9  # share of HBM the engine may use (vLLM's default)
    activation_reserve_bytes: float = 2e9  # activations, CUDA graphs, allocator slack
    # Replica start-up: pull the serving image, load weights, warm up (CUDA graphs).
    image_pull_s: float = 60.0
    weight_load_bw: float = 2e9  # bytes/s from the node's cache or object store
    warmup_s: float = 20.0


HARDWARE: dict[str, GpuSpec] = {
    # A100-SXM4-80GB: 312 TFLOP/s bf16 dense, 2.039 TB/s HBM2e, NVLink3 600 GB/s (300 each way).
    "a100-80g": GpuSpec("a100-80g", flops=312e12, mem_bw=2.0e12, mem_bytes=80e9,
                        link_bw=300e9),
    # H100-SXM5-80GB: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, NVLink4 900 GB/s (450 each way).
    "h100-80g": GpuSpec("h100-80g", flops=989e12, mem_bw=3.35e12, mem_bytes=80e9,
                        link_bw=450e9),
}
CPU_LOCAL = "cpu-local"


def hardware_names() -> list[str]:
    """Names accepted by ``--hardware``."""
    return [*HARDWARE, CPU_LOCAL]


# -- model shapes -------------------------------------------------------------------------

MODELS: dict[str, LlamaConfig] = {
    "llama-2-13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                               num_hidden_layers=40, num_attention_heads=40,
                               num_key_value_heads=40, max_position_embeddings=4096,
                               name="llama-2-13b"),
    "llama-3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, max_position_embeddings=8192,
                              name="llama-3-8b"),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, max_position_embeddings=8192,
                                tie_word_embeddings=True, name="smollm2-135m"),
}


def model_names() -> list[str]:
    """Names accepted by ``--model`` besides a config.json path."""
    return list(MODELS)


def load_model_shape(spec: str) -> LlamaConfig:
    """A model by name, or from a Hugging Face ``config.json`` (or a directory holding one)."""
    if spec in MODELS:
        return MODELS[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model {spec!r} is neither one of {', '.join(MODELS)} nor a "
                         "config.json file (or a directory with one)")
    try:
        data = json.loads(path.read_text())
        return LlamaConfig.from_hf_dict(data, name=path.parent.name or "custom")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a Llama-style config.json ({err})") from None


@dataclass(frozen=True)
class ModelCosts:
    """Parameter and byte counts of a model, derived once from its shape."""

    layers: int
    hidden: int
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv_heads * head_dim
    vocab: int
    layer_params: int  # matmul parameters of one decoder layer
    head_params: int  # LM head (vocab x hidden)

    @classmethod
    def of(cls, cfg: LlamaConfig) -> ModelCosts:
        """Count the matmul parameters of each part."""
        h, d = cfg.hidden_size, cfg.head_size
        q = cfg.num_attention_heads * d
        kv = cfg.num_key_value_heads * d
        layer = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size
        return cls(cfg.num_hidden_layers, h, q, kv, cfg.vocab_size, layer, cfg.vocab_size * h)

    def kv_bytes_per_token(self, layers: int, dtype_bytes: float) -> float:
        """K and V bytes one token occupies across ``layers`` layers."""
        return 2 * layers * self.kv_dim * dtype_bytes

    def weight_params(self, first: int, last: int) -> int:
        """Parameters held by a part with layers [first, last) (embedding/head at the ends)."""
        n = (last - first) * self.layer_params
        if first == 0:
            n += self.head_params  # embedding table (tied or not, it is held)
        if last == self.layers:
            n += self.head_params  # LM head (a tied model still reads it as a matmul)
        return n
