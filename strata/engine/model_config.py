"""Shape and hyper-parameters of a Llama-family model, parsed once from its files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Hugging Face model_type values whose weights the one forward pass runs, by the features
# their configs switch on (q/k/v bias, per-head q/k RMSNorm); see `LlamaConfig.from_hf_dict`.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face `config.json` (LlamaConfig) that the forward pass needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict ("rope_type": "llama3" | "linear" | "dynamic" ...), or None.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Sliding-window attention: a query at position i attends to keys j with
    # i - sliding_window < j <= i (transformers' mask). None = full attention.
    sliding_window: int | None = None
    # Per layer "sliding_attention" or "full_attention" (HF `layer_types`); None = every
    # layer slides when sliding_window is set (Mistral).
    layer_types: tuple[str, ...] | None = None
    name: str = "llama"
    extra: dict[str, Any] = field(default_factory=dict)
    model_type: str = "llama"
    qkv_bias: bool = False  # q/k/v projections add a bias (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # the output projection adds a bias (attention_bias in Llama, Qwen3)
    qk_norm: bool = False  # RMSNorm over head_dim on each q and k head before RoPE (Qwen3)
    # Gemma 3: norm weights are stored as w and scale by (1 + w); the loader adds the 1.
    norm_offset_one: bool = False
    # Gemma 3: the attention and MLP outputs are normed before their residual adds, and
    # the MLP input has its own norm (pre/post_feedforward_layernorm).
    sandwich_norms: bool = False
    mlp_act: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU, gelu_pytorch_tanh)
    embed_scale: float | None = None  # embeddings times this, in the model dtype (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power, not head_dim's
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma's local base)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)

    @property
    def head_size(self) -> int:
        """Per-head dimension (explicit head_dim wins over hidden/heads)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer`` (absolute index); None = global."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def layer_rope_local(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` rotates with the local base (`rope_local_theta`)."""
        return self.rope_local_theta is not None and self.layer_window(layer) is not None

    @property
    def attn_scale(self) -> float:
        """The factor on q·k: head_dim**-0.5, or query_pre_attn_scalar**-0.5 (Gemma)."""
        return (self.query_pre_attn_scalar or self.head_size) ** -0.5

    @property
    def kv_window(self) -> int | None:
        """The sliding window every layer shares, else None: only then are a sequence's
        KV blocks before the window dead for all layers (see `BlockManager`)."""
        windows = {self.layer_window(i) for i in range(self.num_hidden_layers)}
        return windows.pop() if len(windows) == 1 else None

    @property
    def eos_token_ids(self) -> list[int]:
        """EOS ids as a list, whatever form the config gave."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "llama") -> LlamaConfig:
        """Build from a parsed Hugging Face config.json; unsupported features are refused."""
        model_type = d.get("model_type") or "llama"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; strata runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} models."
            )
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported: strata's MLP has no biases.")
        if model_type == "gemma3_text":
            return _gemma3_config(d, name)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported; strata's MLP is SwiGLU (silu).")
        attention_bias = bool(d.get("attention_bias", False))
        kwargs = _known_fields(d)
        # transformers >= 5 moves rope_theta into rope_parameters.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            if "rope_theta" in rp:
                kwargs.setdefault("rope_theta", rp["rope_theta"])
            if rp.get("rope_type", "default") != "default":
                kwargs.setdefault("rope_scaling", rp)
        window, layer_types = _hf_sliding_window(d)
        return cls(
            **kwargs, sliding_window=window, layer_types=layer_types, name=name,
            model_type=model_type,
            # Qwen2's q/k/v always carry a bias (its config has no switch) and its o_proj none.
            qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
            qk_norm=model_type == "qwen3",
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers' class for this model_type accepts."""
        if self.model_type == "gemma3_text":
            raise ValueError("a gemma3_text config cannot be exported (its HF files are its own)")
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "head_dim": self.head_size,
            "hidden_act": "silu",
            "attention_bias": self.o_bias,
            "mlp_bias": False,
        }
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
            if self.model_type.startswith("qwen"):  # their window is off unless switched on
                d["use_sliding_window"] = True
                if self.layer_types is not None:
                    d["layer_types"] = list(self.layer_types)
            elif self.kv_window is None:
                raise ValueError(
                    f"per-layer sliding windows cannot be exported as a {self.model_type} config"
                )
            elif self.model_type == "llama":  # Mistral is Llama with a window on every layer
                d.update(architectures=[_ARCHITECTURES["mistral"]], model_type="mistral")
        return d


_KNOWN_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "head_dim",
    "bos_token_id", "eos_token_id",
)


def _known_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields `LlamaConfig` takes as they are."""
    kwargs = {k: d[k] for k in _KNOWN_FIELDS if k in d and d[k] is not None}
    kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
    return kwargs


def _gemma3_config(d: dict[str, Any], name: str) -> LlamaConfig:
    """Gemma 3 text (transformers' Gemma3TextConfig): GeGLU-tanh MLP, (1 + w) norms before
    and after attention and MLP, q/k norms, scaled embeddings, and sliding layers that
    rotate with their own base (``rope_local_base_freq``, or transformers 5's
    ``rope_parameters["sliding_attention"]``)."""
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_activation={act!r} is not supported for gemma3_text; "
                         "strata runs gelu_pytorch_tanh.")
    if d.get("attn_logit_softcapping") is not None:
        raise ValueError("attn_logit_softcapping is not supported: strata's attention "
                         "does not soft-cap its scores.")
    if d.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true is not supported: strata is causal.")
    kwargs = _known_fields(d)
    kwargs.setdefault("rms_norm_eps", 1e-6)
    kwargs.setdefault("tie_word_embeddings", True)
    local_theta = d.get("rope_local_base_freq", 10000.0)
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:  # transformers >= 5, per layer type
        full, local = rp["full_attention"] or {}, rp.get("sliding_attention") or {}
        if "rope_theta" in full:
            kwargs["rope_theta"] = full["rope_theta"]
        if full.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = full
        if local.get("rope_type", "default") != "default":
            raise ValueError("rope scaling on gemma3's sliding layers is not supported.")
        local_theta = local.get("rope_theta", local_theta)
    window, layer_types = _hf_sliding_window(d)
    if window is not None and layer_types is None:  # transformers' default pattern
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        layer_types = tuple(
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(int(d["num_hidden_layers"]))
        )
    softcap = d.get("final_logit_softcapping")
    return LlamaConfig(
        **kwargs, sliding_window=window, layer_types=layer_types, name=name,
        model_type="gemma3_text", qkv_bias=bool(d.get("attention_bias")),
        o_bias=bool(d.get("attention_bias")), qk_norm=True, norm_offset_one=True,
        sandwich_norms=True, mlp_act="gelu_tanh", embed_scale=float(d["hidden_size"]) ** 0.5,
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or 256),
        rope_local_theta=float(local_theta),
        final_logit_softcapping=None if softcap is None else float(softcap),
    )


def _hf_sliding_window(d: dict[str, Any]) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) as transformers reads them from a config.json.

    Qwen2 turns the window off unless ``use_sliding_window`` and, without explicit
    ``layer_types``, slides only layers from ``max_window_layers`` on.
    """
    window = d.get("sliding_window")
    qwen = str(d.get("model_type", "")).startswith("qwen")  # whose window is off by default
    if not d.get("use_sliding_window", not qwen) or not window:
        return None, None
    types = d.get("layer_types")
    if types is None and "max_window_layers" in d:
        n, first = int(d["num_hidden_layers"]), int(d["max_window_layers"])
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return int(window), None if types is None else tuple(types)
