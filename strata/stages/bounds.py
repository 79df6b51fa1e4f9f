"""What a STEP may address on a stage, checked before anything reaches a kernel.

The native KV write (`rope_and_cache_`) and the paged attention kernel do no bounds
checks of their own, so an unchecked slot, position or block-table entry from the wire
would be a write or read outside the KV cache or the RoPE table. `check_step` checks
every index, shape and dtype of a `StepMessage` against the stage's `StepLimits` (its
KV namespace, as the head sized it, and the head's batch limits) first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strata.stages.protocol import StepMessage
from strata.stages.transport import split_addr


@dataclass(frozen=True)
class StepLimits:
    """What a stage can hold: its KV namespace (sized by the head) and the head's batch limits."""

    num_blocks: int
    block_size: int
    max_model_len: int  # positions and context lengths stay below this (and the RoPE table)
    hidden_size: int
    max_num_tokens: int  # tokens in one micro-batch (the head's max_num_batched_tokens)
    max_num_seqs: int

    @property
    def num_slots(self) -> int:
        """KV slots (tokens) of the cache: every slot index must be below this."""
        return self.num_blocks * self.block_size

    @property
    def max_blocks_per_seq(self) -> int:
        """Block-table columns a sequence of max_model_len tokens needs."""
        return -(-self.max_model_len // self.block_size)

    def max_frame_bytes(self) -> int:
        """The largest STEP frame these limits allow, plus slack; checked on the length prefix.

        Hidden states at fp32 (the widest dtype a stage takes), the per-token and
        per-sequence index tensors, the prefill gather slots of every sequence at full
        length, and the JSON metadata, whose bulk is the prompt and output token ids of
        sequences the tail has not seen yet.
        """
        t, s, n = self.max_num_tokens, self.max_num_seqs, self.max_model_len
        tensors = t * self.hidden_size * 4 + t * 16 + s * (self.max_blocks_per_seq + 1) * 4
        gather = s * n * 8
        meta = s * n * 2 * 12 + t * 64
        return tensors + gather + meta + (1 << 20)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _index_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...],
                  upper: int, lower: int = 0) -> None:
    if t.dtype != dtype:
        raise ValueError(f"step tensor {name!r} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"step tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < lower or hi >= upper:
            raise ValueError(f"step tensor {name!r} holds values in [{lo}, {hi}], "
                             f"outside [{lower}, {upper})")


def _rows(name: str, rows: list[int], n: int) -> None:
    for r in rows:
        if not isinstance(r, int) or not 0 <= r < n:
            raise ValueError(f"step {name} has row {r!r}, outside [0, {n})")


def check_step(msg: StepMessage, lim: StepLimits) -> None:
    """Raise ValueError naming the field unless every shape, dtype and index of `msg` fits `lim`.

    Rows are laid out as the head's runner lays them out: the decodes first, then each
    prefill span back to back, so the spans must tile the rows after the decodes.
    """
    t = msg.num_tokens
    if msg.block_size != lim.block_size:
        raise ValueError(f"step uses block size {msg.block_size}, this stage has {lim.block_size}")
    if not 1 <= t <= lim.max_num_tokens:
        raise ValueError(f"step has {t} tokens, outside [1, {lim.max_num_tokens}]")
    h = msg.hidden
    if h.dtype not in _FLOATS or tuple(h.shape) != (t, lim.hidden_size):
        raise ValueError(f"step hidden states are {h.dtype} {tuple(h.shape)}, expected a float "
                         f"tensor of shape {(t, lim.hidden_size)}")
    _index_tensor("positions", msg.positions, torch.int64, (t,), lim.max_model_len)
    _index_tensor("slots", msg.slot_mapping, torch.int64, (t,), lim.num_slots)
    d = msg.num_decodes
    if not 0 <= d <= min(t, lim.max_num_seqs):
        raise ValueError(f"step has {d} decodes for {t} tokens (max_num_seqs {lim.max_num_seqs})")
    if d:
        nb = int(msg.decode_block_tables.shape[-1]) if msg.decode_block_tables.dim() == 2 else -1
        if not 1 <= nb <= lim.max_blocks_per_seq:
            raise ValueError(f"decode block tables have shape {tuple(msg.decode_block_tables.shape)}, "
                             f"expected ({d}, 1..{lim.max_blocks_per_seq})")
        _index_tensor("dec_tables", msg.decode_block_tables, torch.int32, (d, nb), lim.num_blocks)
        _index_tensor("dec_lens", msg.decode_lens, torch.int32, (d,),
                      min(nb * lim.block_size, lim.max_model_len) + 1, lower=1)
    elif msg.decode_block_tables.numel() or msg.decode_lens.numel():
        raise ValueError("a step without decodes carries decode block tables")
    row, gather = d, 0
    for span in msg.spans:
        start, length, ctx = span
        if start != row or length < 1 or ctx < 0 or ctx + length > lim.max_model_len:
            raise ValueError(f"prefill span {span} does not fit: spans must tile rows "
                             f"{d}..{t} after the decodes, with context + length <= "
                             f"{lim.max_model_len}")
        row += length
        if ctx > 0:
            gather += ctx + length
    if row != t:
        raise ValueError(f"decodes and prefill spans cover {row} rows of {t}")
    _index_tensor("gather", msg.gather_slots, torch.int64, (gather,), lim.num_slots)
    _rows("sample_rows", msg.sample_rows, t)
    _rows("extra_rows", msg.extra_rows, t)
    if len(msg.sample_seq_ids) != len(msg.sample_rows):
        raise ValueError(f"step samples {len(msg.sample_rows)} rows for "
                         f"{len(msg.sample_seq_ids)} sequences")
    if len(msg.seq_ids) > lim.max_num_seqs:
        raise ValueError(f"step has {len(msg.seq_ids)} sequences, above max_num_seqs {lim.max_num_seqs}")
    if len(msg.hops) > 64:
        raise ValueError(f"step names {len(msg.hops)} hops")
    for hop in msg.hops:
        split_addr(hop)
