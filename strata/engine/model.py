"""Llama-family transformer whose forward runs any contiguous layer range [a, b).

The same module serves a whole engine (embedding + all layers + head) and a
layer-range stage (any subset, embedding and head optional). Attention reads and
writes a paged KV cache described by `AttentionMetadata`; without metadata the
forward is a plain causal pass over one sequence, used as a reference in tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from strata.engine.kernels import raw_op
from strata.engine.model_config import LlamaConfig


@dataclass
class PrefillSpan:
    """One sequence's chunk of new tokens inside the flattened batch."""

    start: int  # index of its first token in the flattened batch
    length: int  # number of new tokens
    context_len: int  # tokens already in the KV cache before this chunk
    # Slots of all context_len + length tokens, only needed when context_len > 0.
    gather_slots: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to.

    The flattened batch holds `num_decodes` single-token decodes first, then the
    prefill spans. Decodes attend over padded gathers of their cached tokens.
    """

    slot_mapping: torch.Tensor  # [T] flat KV slot for every token of the batch
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [D, Lmax] slots, padded with slot 0
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, Lmax] bool, True = attend
    # For the native kernel instead of slots/mask: block tables and context lengths.
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks] int32
    decode_lens: torch.Tensor | None = None  # [D] int32
    block_size: int = 16
    # Set when the native fused ops run: the rotary table [max_pos, D].
    cos_sin: torch.Tensor | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)
    # The step's LoRA adapter groups (strata.engine.lora.LoraBatch); None: base model only.
    lora: Any = None


def _rope_inv_freq(config: LlamaConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies, with the config's rope scaling applied (HF semantics).

    ``local``: those of the sliding layers' own base (`rope_local_theta`), unscaled.
    """
    dim = config.head_size
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = {} if local else config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in ("default", None):
        return inv_freq.float()
    if rope_type == "linear":
        return (inv_freq / float(scaling["factor"])).float()
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled).float()
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported; supported: default, linear, llama3"
    )


def padded_rows(n: int) -> int:
    """The row count a GEMM of ``n`` rows runs at: ``n`` up to 16, then one of a few buckets.

    Above 16 rows, ``n`` is rounded up to a multiple of a sixteenth of the next power of
    two (at least 16): at most 12.5% more rows, and at most 8 counts per octave. The
    AMX tiles that run bf16 GEMMs hold 16 rows, so multiples of 16 cost little there.
    """
    if n <= 16:
        return n
    step = max(16, (1 << (n - 1).bit_length()) // 16)
    return -(-n // step) * step


def _pads(t: torch.Tensor) -> bool:
    """Whether torch runs this tensor's GEMMs and attention through oneDNN (see below)."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _onednn_packed(weight: torch.Tensor):  # type: ignore[no-untyped-def]
    """oneDNN's linear on a weight laid out once for its kernels, or None where unavailable.

    F.linear hands oneDNN the plain [out, in] weight, which it re-lays out into its
    blocked (AMX tile) format on every call; at decode batches that copy costs about as
    much as the GEMM. Packing once, as torch.compile does on the CPU, leaves the GEMM.
    Same kernels, same results.
    """
    if not torch.backends.mkldnn.is_available() or weight.dim() != 2:
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        op = torch.ops.mkldnn._linear_pointwise.default
        op(torch.zeros(1, weight.shape[1], dtype=weight.dtype), packed, None, "none", [], "")
    except (RuntimeError, AttributeError):  # a torch or CPU without the bf16/fp16 kernels
        return None
    return lambda x, bias=None: op(x, packed, bias, "none", [], "")


def _padded_linear(weight: torch.Tensor, bias: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
    """oneDNN's linear on 2-D activations, prepacked and padded to `padded_rows`.

    On the CPU, torch runs bf16/fp16 GEMMs through oneDNN, which JIT-compiles a kernel
    for each new input shape and keeps it in its primitive cache (up to 1024 entries): a
    server that sees every prompt length grows its native memory by one kernel per new
    length until the cache is full, for hours. Padding the rows bounds the shapes to the
    buckets, so the cache stops growing after the first few requests. Rows are
    independent in a GEMM, so the first ``n`` rows of the padded product are the product.
    The weight is packed once for oneDNN (`_onednn_packed`). fp32 GEMMs go to MKL/BLAS,
    which caches nothing per shape; they run unpadded.
    """
    if not _pads(weight):
        return lambda x: F.linear(x, weight, bias)
    packed = _onednn_packed(weight)
    if packed is None:
        def gemm(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, weight, bias)
    else:
        b = None if bias is None else bias.detach()

        def gemm(x: torch.Tensor) -> torch.Tensor:
            return packed(x.contiguous(), b)

    def fn(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        m = padded_rows(n)
        if m == n:
            return gemm(x)
        return gemm(F.pad(x, (0, 0, 0, m - n)))[:n]

    return fn


def _as_fn(linear: nn.Module):  # type: ignore[no-untyped-def]
    """A projection as a plain callable on 2-D activations (fp Linear or Int8Linear)."""
    if isinstance(linear, nn.Linear):
        return _padded_linear(linear.weight, linear.bias)
    fast = getattr(linear, "forward_2d", None)
    return fast if fast is not None else linear


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF-layout rotation: the head's two halves are the real and imaginary parts."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention over a paged KV cache."""

    def __init__(self, config: LlamaConfig, window: int | None = None) -> None:
        super().__init__()
        # Sliding window: a query at position i sees keys j with i - window < j <= i.
        self.window = window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = config.attn_scale
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.eps = config.rms_norm_eps
        # Qwen3: an RMSNorm over head_dim on every q and k head, before RoPE.
        self.q_norm = nn.Parameter(torch.ones(self.head_dim)) if config.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(self.head_dim)) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = F.rms_norm(q, (self.head_dim,), self.q_norm, self.eps)
            k = F.rms_norm(k, (self.head_dim,), self.k_norm, self.eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if meta is None:
            out = self._causal(q, k, v)
        else:
            assert kv_cache is not None
            k_cache, v_cache = kv_cache
            k_cache.index_copy_(0, meta.slot_mapping, k)
            v_cache.index_copy_(0, meta.slot_mapping, v)
            out = torch.empty_like(q)
            d = meta.num_decodes
            if d:
                out[:d] = self._decode(q[:d], k_cache, v_cache, meta)
            self.prefill_chunks(out, q, k, v, k_cache, v_cache, meta.prefills)
        return self.o_proj(out.reshape(t, self.q_size))

    def _causal(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int = 0
    ) -> torch.Tensor:
        """Causal attention of q (the last len(q) positions) over k/v.

        On the CPU in bf16/fp16, torch's flash attention runs oneDNN micro-kernels that it
        compiles and caches per sequence length (and per query/key length pair with a
        context), without bound: q, k and v are padded at the end to `padded_rows`, as
        the projections are. Real queries never see the padded keys (they lie after every
        real position, so the causal mask hides them); the padded queries' rows are
        dropped. With a sliding window, query i sees keys j with i - window < j <= i.
        """
        lq, lk = q.shape[0], k.shape[0]
        pq, pk = lq, lk
        if _pads(q):
            pq, pk = padded_rows(lq), padded_rows(lk)
            if context_len == 0:
                pq = pk = max(pq, pk)
            q = F.pad(q, (0, 0, 0, 0, 0, pq - lq)) if pq != lq else q
            if pk != lk:
                k = F.pad(k, (0, 0, 0, 0, 0, pk - lk))
                v = F.pad(v, (0, 0, 0, 0, 0, pk - lk))
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, Lq, D]
        kh = k.transpose(0, 1).unsqueeze(0)  # [1, KVH, Lk, D]
        vh = v.transpose(0, 1).unsqueeze(0)
        if context_len == 0 and self.window is None:
            o = F.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, enable_gqa=True, scale=self.scale
            )
        else:
            # Bottom-right aligned causal mask: query i sits at position context_len + i.
            # Padded queries repeat the last real one's row, so none is left without keys.
            rows = torch.arange(pq, device=q.device).clamp(max=lq - 1).unsqueeze(1) + context_len
            cols = torch.arange(pk, device=q.device).unsqueeze(0)
            mask = cols <= rows
            if self.window is not None:
                mask &= cols > rows - self.window
            o = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, enable_gqa=True, scale=self.scale
            )
        return o.squeeze(0).transpose(0, 1)[:lq]

    def prefill_chunks(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        spans: list[PrefillSpan],
    ) -> None:
        """Causal attention of each prefill chunk into ``out``: over its fresh k/v, or over
        its cached context (read back in q's dtype) when it continues an earlier chunk."""
        for span in spans:
            s, e = span.start, span.start + span.length
            if span.context_len == 0:
                out[s:e] = self._causal(q[s:e], k[s:e], v[s:e])
            else:
                assert span.gather_slots is not None
                out[s:e] = self._causal(
                    q[s:e],
                    k_cache[span.gather_slots].to(q.dtype),
                    v_cache[span.gather_slots].to(q.dtype),
                    context_len=span.context_len,
                )

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """One query per sequence over its context, gathered from the paged cache and padded.

        The PyTorch path; the native path reads the cache in place (`paged_decode_attention`).
        """
        assert meta.decode_slots is not None and meta.decode_mask is not None
        kg = k_cache[meta.decode_slots].transpose(1, 2)  # [D, KVH, L, Dh]
        vg = v_cache[meta.decode_slots].transpose(1, 2)
        qh = q.unsqueeze(2)  # [D, H, 1, Dh]
        mask = meta.decode_mask
        if self.window is not None:  # the mask is each sequence's first len positions
            lens = mask.sum(-1, keepdim=True)
            pos = torch.arange(mask.shape[-1], device=mask.device)
            mask = mask & (pos >= lens - self.window)
        o = F.scaled_dot_product_attention(
            qh, kg, vg, attn_mask=mask, enable_gqa=True, scale=self.scale
        )
        return o.squeeze(2)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU on a fused [gate | up] row: gelu_pytorch_tanh(gate) * up (Gemma)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


class MLP(nn.Module):
    """SwiGLU (or GeGLU-tanh) feed-forward with gate and up fused into one matmul."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gelu = config.mlp_act == "gelu_tanh"
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate, bias=False)
        self.down_proj = nn.Linear(self.intermediate, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.gelu:
            return self.down_proj(gelu_tanh_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x)).

    With sandwich norms (Gemma 3) each block's output is normed too, and the MLP input
    has its own norm: x + norm(attn(norm(x))), then + norm(mlp(norm(x))), with
    post_attention_layernorm on the attention output and pre/post_feedforward_layernorm
    around the MLP.
    """

    def __init__(self, config: LlamaConfig, window: int | None = None) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.input_layernorm = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(config.hidden_size))
        sandwich = config.sandwich_norms
        self.pre_feedforward_layernorm = nn.Parameter(torch.ones(config.hidden_size)) if sandwich else None
        self.post_feedforward_layernorm = nn.Parameter(torch.ones(config.hidden_size)) if sandwich else None
        self.self_attn = Attention(config, window)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, meta, kv_cache):  # type: ignore[no-untyped-def]
        n = (x.shape[-1],)
        h = F.rms_norm(x, n, self.input_layernorm, self.eps)
        a = self.self_attn(h, cos, sin, meta, kv_cache)
        if self.pre_feedforward_layernorm is None:
            x = x + a
            return x + self.mlp(F.rms_norm(x, n, self.post_attention_layernorm, self.eps))
        x = x + F.rms_norm(a, n, self.post_attention_layernorm, self.eps)
        m = self.mlp(F.rms_norm(x, n, self.pre_feedforward_layernorm, self.eps))
        return x + F.rms_norm(m, n, self.post_feedforward_layernorm, self.eps)


class LlamaModel(nn.Module):
    """Layers [layer_start, layer_end) of a Llama model, with optional embedding and head."""

    def __init__(
        self,
        config: LlamaConfig,
        layer_start: int = 0,
        layer_end: int | None = None,
        has_embed: bool = True,
        has_head: bool = True,
    ) -> None:
        super().__init__()
        layer_end = config.num_hidden_layers if layer_end is None else layer_end
        if not 0 <= layer_start <= layer_end <= config.num_hidden_layers:
            raise ValueError(
                f"layer range {layer_start}:{layer_end} is outside the model's "
                f"0:{config.num_hidden_layers} layers"
            )
        self.config = config
        self.layer_start, self.layer_end = layer_start, layer_end
        self.has_embed, self.has_head = has_embed, has_head
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size) if has_embed else None
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, config.layer_window(i)) for i in range(layer_start, layer_end)
        )
        self.norm = nn.Parameter(torch.ones(config.hidden_size)) if has_head else None
        self.lm_head = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) if has_head else None
        )
        self.register_buffer("inv_freq", _rope_inv_freq(config), persistent=False)
        # Which layers rotate with the sliding layers' own base (Gemma 3), and its table.
        self.rope_local = [config.layer_rope_local(i) for i in range(layer_start, layer_end)]
        self.register_buffer(
            "inv_freq_local",
            _rope_inv_freq(config, local=True) if any(self.rope_local) else None,
            persistent=False,
        )

    @property
    def num_layers(self) -> int:
        """Number of decoder layers this model part holds."""
        return self.layer_end - self.layer_start

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up projections."""
        dtype = next(self.parameters()).dtype

        def get(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise KeyError(f"weight {name!r} missing from the model files")
            return state_dict[name].to(dtype)

        def norm(name: str) -> torch.Tensor:  # Gemma stores w and scales by (1 + w)
            if self.config.norm_offset_one:
                return (state_dict[name].float() + 1.0).to(dtype) if name in state_dict else get(name)
            return get(name)

        with torch.no_grad():
            if self.embed_tokens is not None:
                self.embed_tokens.weight.copy_(get("model.embed_tokens.weight"))
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{self.layer_start + i}."
                attn = layer.self_attn
                qkv = torch.cat(
                    [get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")], dim=0
                )
                attn.qkv_proj.weight.copy_(qkv)
                attn.o_proj.weight.copy_(get(p + "self_attn.o_proj.weight"))
                if attn.qkv_proj.bias is not None:
                    attn.qkv_proj.bias.copy_(torch.cat(
                        [get(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")]
                    ))
                if attn.o_proj.bias is not None:
                    attn.o_proj.bias.copy_(get(p + "self_attn.o_proj.bias"))
                if attn.q_norm is not None:
                    attn.q_norm.copy_(norm(p + "self_attn.q_norm.weight"))
                    attn.k_norm.copy_(norm(p + "self_attn.k_norm.weight"))
                gate_up = torch.cat(
                    [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], dim=0
                )
                layer.mlp.gate_up_proj.weight.copy_(gate_up)
                layer.mlp.down_proj.weight.copy_(get(p + "mlp.down_proj.weight"))
                layer.input_layernorm.copy_(norm(p + "input_layernorm.weight"))
                layer.post_attention_layernorm.copy_(norm(p + "post_attention_layernorm.weight"))
                if layer.pre_feedforward_layernorm is not None:
                    layer.pre_feedforward_layernorm.copy_(norm(p + "pre_feedforward_layernorm.weight"))
                    layer.post_feedforward_layernorm.copy_(norm(p + "post_feedforward_layernorm.weight"))
            if self.has_head:
                assert self.norm is not None and self.lm_head is not None
                self.norm.copy_(norm("model.norm.weight"))
                head = state_dict.get("lm_head.weight")
                if head is None:  # tied embeddings
                    head = state_dict["model.embed_tokens.weight"]
                self.lm_head.weight.copy_(head.to(dtype))

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype, local: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [T, 1, head_dim] for the given absolute positions."""
        inv_freq = self.inv_freq_local if local else self.inv_freq
        freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata | None = None,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Token ids [T] (with embedding) or hidden states [T, H] in; hidden states out.

        With a head, the output is normalised and ready for `compute_logits`.
        """
        if self.embed_tokens is not None:
            x = self.embed_tokens(inputs)
            if self.config.embed_scale is not None:  # in the model dtype, as transformers
                x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        else:
            x = inputs
        if meta is not None and meta.cos_sin is not None:
            assert kv_caches is not None
            return self._forward_native(x, positions, meta, kv_caches)
        ropes = {False: self.rope(positions, x.dtype)}
        if self.inv_freq_local is not None:
            ropes[True] = self.rope(positions, x.dtype, local=True)
        for i, layer in enumerate(self.layers):
            cos, sin = ropes[self.rope_local[i]]
            x = layer(x, cos, sin, meta, None if kv_caches is None else kv_caches[i])
        if self.norm is not None:
            x = F.rms_norm(x, (x.shape[-1],), self.norm, self.config.rms_norm_eps)
        return x

    def _native_plan(self) -> list[tuple]:
        """Per layer: norm weights, the four projections as plain callables, q/k norms or None.

        Built once (after any quantization swapped the Linear modules) so the native
        forward calls torch ops directly instead of walking nn.Module calls.
        """
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = [
                (
                    layer.input_layernorm,
                    layer.post_attention_layernorm,
                    _as_fn(layer.self_attn.qkv_proj),
                    _as_fn(layer.self_attn.o_proj),
                    _as_fn(layer.mlp.gate_up_proj),
                    _as_fn(layer.mlp.down_proj),
                    layer.self_attn.q_norm,
                    layer.self_attn.k_norm,
                    layer.pre_feedforward_layernorm,
                    layer.post_feedforward_layernorm,
                )
                for layer in self.layers
            ]
            self.__dict__["_plan"] = plan
        return plan

    def store_weights_transposed_(self) -> None:
        """Hold each float projection's weight as the transposed view of an [in, out] tensor.

        Same values and shape, so every caller of F.linear is unchanged; what changes is
        the GEMM MKL runs: x @ W with W stored [in, out] is faster than x @ W^T with W
        stored [out, in] at 8 to 32 rows — the decode batches of a busy server — and no
        slower at 64+ rows (prefill). The measurement is in docs/results.md.
        """
        for mod in self.modules():
            if isinstance(mod, nn.Linear) and mod.weight.is_contiguous() and mod.weight.dim() == 2:
                mod.weight.data = mod.weight.data.t().contiguous().t()
        self.invalidate_plan()

    def invalidate_plan(self) -> None:
        """Forget the cached native plan (after the Linear modules were replaced)."""
        self.__dict__.pop("_plan", None)
        self.__dict__.pop("_head_fn", None)

    def _forward_native(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """The fused CPU path: one flat loop of native ops per layer, residual deferred.

        Each block's residual add is fused into the next RMSNorm (`add_rms_norm_`),
        rotary embedding and the KV write are one op, and decode attention reads the
        paged cache in place.
        """
        ops = torch.ops.strata
        add_norm, rope_cache = raw_op(ops.add_rms_norm_), raw_op(ops.rope_and_cache_)
        paged, silu_mul = raw_op(ops.paged_decode_attention), raw_op(ops.silu_and_mul)
        c = self.config
        eps, nh, nkv, hd = c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads, c.head_size
        qs = nh * hd
        scale = c.attn_scale
        gelu = c.mlp_act == "gelu_tanh"
        t = x.shape[0]
        d = meta.num_decodes
        decode_only = not meta.prefills
        tables, lens, bsz = meta.decode_block_tables, meta.decode_lens, meta.block_size
        slots, cos_sin = meta.slot_mapping, meta.cos_sin
        tables_by_kind = {False: cos_sin}
        if self.inv_freq_local is not None:
            tables_by_kind[True] = self._local_rope_table(cos_sin.device)
        res = torch.zeros_like(x)
        windows = [layer.self_attn.window or 0 for layer in self.layers]  # 0: the whole context
        plan = self._native_plan()
        lora = meta.lora
        for i, (w_in, w_post, qkv_fn, o_fn, gu_fn, down_fn, q_norm, k_norm, w_pre_ff, w_post_ff) in enumerate(plan):
            kc, vc = kv_caches[i]
            h = add_norm(x, res, w_in, eps)  # x += res: x is the residual stream
            qkv = qkv_fn(h)
            if lora is not None:
                lora.add(i, "qkv", h, qkv)
            if q_norm is not None:  # per-head q/k RMSNorm, in place before rope
                for part, n, w in ((qkv[:, :qs], nh, q_norm), (qkv[:, qs : qs + nkv * hd], nkv, k_norm)):
                    heads = part.view(t, n, hd)
                    heads.copy_(F.rms_norm(heads, (hd,), w, eps))
            rope_cache(qkv, positions, tables_by_kind[self.rope_local[i]], kc, vc, slots, nh, nkv)
            q = qkv[:, :qs].view(t, nh, hd)
            if decode_only:
                attn = paged(q, kc, vc, tables, lens, bsz, scale, windows[i])
            else:
                attn = self._mixed_attention(self.layers[i].self_attn, q, qkv, t, d, kc, vc, meta, scale)
            a = o_fn(attn.view(t, qs))
            if lora is not None:
                lora.add(i, "o", attn.view(t, qs), a)
            if w_pre_ff is None:
                h = add_norm(a, x, w_post, eps)  # a += x
            else:  # sandwich norms: the attention output is normed before its residual add
                a = F.rms_norm(a, (a.shape[-1],), w_post, eps)
                h = add_norm(a, x, w_pre_ff, eps)  # a += x
            gu = gu_fn(h)
            if lora is not None:
                lora.add(i, "gate_up", h, gu)
            act = gelu_tanh_and_mul(gu) if gelu else silu_mul(gu)
            x = down_fn(act)
            if lora is not None:
                lora.add(i, "down", act, x)
            if w_post_ff is not None:
                x = F.rms_norm(x, (x.shape[-1],), w_post_ff, eps)
            res = a
        if self.norm is not None:
            return add_norm(x, res, self.norm, c.rms_norm_eps)
        return x + res

    def _mixed_attention(
        self,
        attn: Attention,
        q: torch.Tensor,
        qkv: torch.Tensor,
        t: int,
        d: int,
        kc: torch.Tensor,
        vc: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Decodes through the paged kernel, prefill chunks through causal SDPA (one layer)."""
        nkv, hd, qs, kvs = attn.num_kv_heads, attn.head_dim, attn.q_size, attn.kv_size
        out = torch.empty((t, attn.num_heads, hd), dtype=q.dtype, device=q.device)
        if d:
            out[:d] = torch.ops.strata.paged_decode_attention(
                q[:d], kc, vc, meta.decode_block_tables, meta.decode_lens, meta.block_size, scale,
                attn.window or 0,
            )
        k = qkv[:, qs : qs + kvs].view(t, nkv, hd)
        v = qkv[:, qs + kvs :].view(t, nkv, hd)
        attn.prefill_chunks(out, q, k, v, kc, vc, meta.prefills)
        return out

    def rope_table(self, local: bool = False) -> torch.Tensor:
        """[max_positions, head_dim] float32: cos of each frequency, then sin (native ops).

        ``local``: the table of the sliding layers' own base (Gemma 3).
        """
        inv_freq = self.inv_freq_local if local else self.inv_freq
        pos = torch.arange(self.config.max_position_embeddings, dtype=torch.float64)
        freqs = pos.unsqueeze(1) * inv_freq.double().cpu().unsqueeze(0)
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float().contiguous()

    def _local_rope_table(self, device: torch.device) -> torch.Tensor:
        """The local-base table, built once per device (the runner holds only the global one)."""
        cached = self.__dict__.get("_local_table")
        if cached is None or cached.device != device:
            cached = self.rope_table(local=True).to(device)
            self.__dict__["_local_table"] = cached
        return cached

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (fp32) of normalised hidden states."""
        assert self.lm_head is not None, "this model part has no head"
        head = self.lm_head
        n = hidden.shape[0]
        pads = isinstance(head, nn.Linear) and _pads(head.weight) and hidden.dim() == 2
        m = padded_rows(n) if pads else n
        if pads and not head._forward_hooks:  # hooks (calibration) need the module call
            fn = self.__dict__.get("_head_fn")
            if fn is None:
                fn = self.__dict__["_head_fn"] = _padded_linear(head.weight, head.bias)
            logits = fn(hidden).float()
        elif m != n:
            logits = head(F.pad(hidden, (0, 0, 0, m - n)))[:n].float()
        else:
            logits = head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
