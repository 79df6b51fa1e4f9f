"""Batch -> tensors -> model -> hidden states or logits, on one device.

The runner owns the KV-cache tensors (one flat slot array per layer) and turns a
scheduler Batch into the flattened token batch and AttentionMetadata the model
expects. It is shared by whole engines and by layer-range stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from strata.engine.kernels import load_paged_attention
from strata.engine.model import (
    AttentionMetadata,
    LlamaModel,
    PrefillSpan,
    _padded_linear,
    padded_rows,
)
from strata.engine.scheduler import Batch, ScheduledSeq

if TYPE_CHECKING:
    from strata.engine.lora import LoraManager


@dataclass
class StepInputs:
    """Flattened tensors of one step, in batch order (decodes, then prefill chunks)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: list[int]  # flat index of the last token of each sampling entry
    entries: list[ScheduledSeq]


def kv_bytes_per_block(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block across this model part's layers."""
    c = model.config
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * c.num_key_value_heads * c.head_size * elem


# The largest row bucket built at start-up: a step's tokens rarely exceed it on a CPU, and
# the warm-up's attention grows with its square.
WARM_UP_MAX_ROWS = 4096


def row_buckets(max_rows: int) -> list[int]:
    """Every row count `padded_rows` gives for 1..max_rows, in order (without trying each)."""
    out: list[int] = []
    m = 0
    while m < max_rows:
        m = padded_rows(m + 1)
        out.append(m)
    return out


class ModelRunner:
    """Runs a (part of a) model over paged-KV batches."""

    def __init__(
        self,
        model: LlamaModel,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        native_attention: bool | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.device = torch.device(device)
        if native_attention is None:
            native_attention = self.device.type == "cpu" and load_paged_attention()
        self.native_attention = native_attention
        if self.kv_dtype != dtype and not native_attention:
            raise ValueError("a KV cache dtype other than the model's needs the native CPU kernels")
        self.cos_sin = model.rope_table().to(self.device) if native_attention else None
        if self.device.type == "cpu" and dtype == torch.float32:
            model.store_weights_transposed_()
        self.loras: LoraManager | None = None  # resident LoRA adapters (strata.engine.lora)
        c = model.config
        shape = (num_blocks * block_size, c.num_key_value_heads, c.head_size)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
            )
            for _ in range(model.num_layers)
        ]

    @torch.inference_mode()
    def warm_up(self, max_rows: int) -> int:
        """Build the GEMM and attention kernels of every row bucket up to ``max_rows`` now.

        In bf16/fp16 on the CPU, oneDNN and torch's flash attention compile a kernel the
        first time they see a shape and keep it; the model pads rows to `padded_rows`, so
        the set is small and known. Building it at start-up spares the first requests of
        each size the compile and puts the kernels' memory in the process's baseline,
        instead of letting it arrive over the first minutes of traffic. One call per
        distinct weight shape and bucket (the layers share shapes); returns the calls made.
        Buckets above `WARM_UP_MAX_ROWS` (rare on a CPU) are built when first used.
        """
        weights = {}
        for mod in self.model.modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, torch.nn.Linear) and w is not None and w.dim() == 2:
                weights.setdefault((tuple(w.shape), w.dtype, w.stride()), w)
        if not any(w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
                   for w in weights.values()):
            return 0  # fp32 GEMMs cache nothing per shape; int8 ones are fbgemm's
        buckets = row_buckets(min(max_rows, WARM_UP_MAX_ROWS))
        calls = 0
        for w in weights.values():
            gemm = _padded_linear(w)  # the path (and weight layout) serving calls run
            for m in buckets:
                gemm(torch.zeros(m, w.shape[1], dtype=w.dtype, device=w.device))
                calls += 1
        if self.model.layers:
            attn, c = self.model.layers[0].self_attn, self.model.config
            for m in buckets:
                q = torch.zeros(m, c.num_attention_heads, c.head_size, dtype=self.dtype, device=self.device)
                kv = torch.zeros(m, c.num_key_value_heads, c.head_size, dtype=self.dtype, device=self.device)
                attn._causal(q, kv, kv)
                calls += 1
        return calls

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        bs = self.block_size
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // bs] * bs + pos % bs

    def prepare(self, batch: Batch) -> StepInputs:
        """Build the flat token batch and attention metadata for `batch`."""
        entries = batch.entries
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        sample_rows: list[int] = []
        d = len(batch.decodes)
        decode_slots = decode_mask = tables = lens_t = None
        if d:
            bs = self.block_size
            starts = [e.start for e in batch.decodes]
            lens = [s + 1 for s in starts]
            nblocks = max(starts) // bs + 1
            # One tensor from padded Python rows: a tensor and a copy per sequence cost
            # more than the rest of the step's bookkeeping at batch 64.
            rows: list[list[int]] = []
            last_slots = []
            for e, start in zip(batch.decodes, starts, strict=True):
                bt = e.seq.block_table
                n = start // bs + 1  # blocks holding positions 0..start
                rows.append(bt[:n] + [0] * (nblocks - n) if n < nblocks else bt[:n])
                ids.append(e.seq.token_at(start))
                last_slots.append(bt[n - 1] * bs + start % bs)
            tables = torch.tensor(rows, dtype=torch.int32)
            sample_rows.extend(range(d))
            slot_parts.append(torch.tensor(last_slots, dtype=torch.long))
            positions.append(torch.tensor(starts, dtype=torch.long))
            lens_t = torch.tensor(lens, dtype=torch.int32)
            if not self.native_attention:
                lmax = max(lens)
                pos = torch.arange(lmax)
                decode_slots = tables.long()[:, pos // bs] * bs + pos % bs
                decode_mask = (pos.unsqueeze(0) < lens_t.unsqueeze(1))[:, None, None, :]
                tables = lens_t = None
        spans: list[PrefillSpan] = []
        offset = d
        for e in batch.prefills:
            end = e.start + e.num_tokens
            ids.extend(e.seq.tokens(e.start, end))
            positions.append(torch.arange(e.start, end))
            if e.start == 0:
                slots = self._slots(e.seq.block_table, 0, end)
                slot_parts.append(slots)
                gather = None
            else:
                all_slots = self._slots(e.seq.block_table, 0, end)
                slot_parts.append(all_slots[e.start :])
                gather = all_slots.to(self.device)
            spans.append(PrefillSpan(offset, e.num_tokens, e.start, gather))
            if e.samples:
                sample_rows.append(offset + e.num_tokens - 1)
            offset += e.num_tokens
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_parts).to(dev),
            num_decodes=d,
            decode_slots=None if decode_slots is None else decode_slots.to(dev),
            decode_mask=None if decode_mask is None else decode_mask.to(dev),
            decode_block_tables=tables,
            decode_lens=lens_t,
            block_size=self.block_size,
            cos_sin=self.cos_sin,
            prefills=spans,
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.cat(positions).to(dev),
            meta=meta,
            sample_rows=sample_rows,
            entries=entries,
        )

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model part; token ids feed the embedding, else `hidden_in` is used."""
        x = inputs.input_ids if self.model.has_embed else hidden_in
        assert x is not None, "a stage without embedding needs hidden states in"
        if self.loras is not None:
            inputs.meta.lora = self.loras.for_step(inputs.entries, inputs.meta, len(inputs.positions))
        return self.model(x, inputs.positions, inputs.meta, self.kv_caches)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: list[int] | torch.Tensor) -> torch.Tensor:
        """fp32 logits of the selected flat rows, on the CPU."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, idx)).cpu()
