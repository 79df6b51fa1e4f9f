"""What the frames of a stage pipeline carry, and how a stage rebuilds its step from them.

The head turns one scheduled micro-batch into a STEP frame: hidden states plus the
attention metadata every stage needs (positions, KV slots, decode block tables,
prefill spans) as raw integer tensors. All stages of one path share the head's block
namespace, so the head's block tables address every stage's own KV tensors. Non-tensor
metadata (sequence ids, span bounds, sampling parameters of newly seen sequences, the
remaining route) is small JSON. The tail answers with a RESULT frame of sampled tokens.

A stage checks every index a STEP carries against its own capacity (`check_step`)
before any of it reaches a kernel: the native KV write and paged attention do no
bounds checks of their own, so an unchecked slot would be a write outside the cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from strata.engine.model import AttentionMetadata, PrefillSpan
from strata.engine.runner import StepInputs
from strata.engine.sampler import TokenLogprobs
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import Batch
from strata.stages.transport import ERROR, RESULT, STEP, Frame, split_addr

CONTROL = 5  # head <-> stage housekeeping: forget finished sequences, drain notices


def params_to_json(p: SamplingParams) -> dict[str, Any]:
    """SamplingParams as JSON-safe values (logit_bias keys become strings)."""
    d = dataclasses.asdict(p)
    d["stop"] = list(p.stop)
    d["stop_token_ids"] = list(p.stop_token_ids)
    d["logit_bias"] = {str(k): v for k, v in p.logit_bias.items()}
    return d


def params_from_json(d: dict[str, Any]) -> SamplingParams:
    """Inverse of `params_to_json`; validation runs again in SamplingParams."""
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"sampling params carry unknown fields {sorted(unknown)}")
    d = dict(d)
    d["stop"] = tuple(d.get("stop", ()))
    d["stop_token_ids"] = tuple(d.get("stop_token_ids", ()))
    d["logit_bias"] = {int(k): float(v) for k, v in d.get("logit_bias", {}).items()}
    return SamplingParams(**d)


@dataclass
class NewSeq:
    """What the tail needs of a sequence it has not seen: how to sample it."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class StepMessage:
    """One micro-batch as it travels head -> stage -> ... -> tail."""

    hidden: torch.Tensor  # [T, H] residual stream after the sender's layers
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    num_decodes: int
    decode_block_tables: torch.Tensor  # [D, max_blocks] int32
    decode_lens: torch.Tensor  # [D] int32
    spans: list[tuple[int, int, int]]  # prefill (flat start, length, context_len)
    gather_slots: torch.Tensor  # int64, slots of every span with context_len > 0, in order
    sample_rows: list[int]
    sample_seq_ids: list[int]  # sequence of each sample row
    extra_rows: list[int]  # rows whose full logits the head wants (prompt logprobs)
    seq_ids: list[int]  # every sequence in the micro-batch
    block_size: int
    hops: list[str] = field(default_factory=list)  # data addresses after the receiver's
    new_seqs: dict[int, NewSeq] = field(default_factory=dict)
    kv_free: dict[str, int] = field(default_factory=dict)  # head's view, per replica address
    stage_s: dict[str, float] = field(default_factory=dict)  # compute seconds so far, per stage

    @property
    def num_tokens(self) -> int:
        """Tokens in the flattened batch."""
        return int(self.positions.shape[0])

    def to_frame(self, step_id: int) -> Frame:
        """The STEP frame (tensors raw, the rest small JSON)."""
        meta = {
            "num_decodes": self.num_decodes,
            "spans": self.spans,
            "sample_rows": self.sample_rows,
            "sample_seq_ids": self.sample_seq_ids,
            "extra_rows": self.extra_rows,
            "seq_ids": self.seq_ids,
            "block_size": self.block_size,
            "hops": self.hops,
            "kv_free": self.kv_free,
            "stage_s": self.stage_s,
            "new": {
                str(sid): {
                    "params": params_to_json(n.params),
                    "prompt": n.prompt_token_ids,
                    "outputs": n.output_token_ids,
                }
                for sid, n in self.new_seqs.items()
            },
        }
        tensors = {
            "hidden": self.hidden,
            "positions": self.positions,
            "slots": self.slot_mapping,
            "dec_tables": self.decode_block_tables,
            "dec_lens": self.decode_lens,
            "gather": self.gather_slots,
        }
        return Frame(STEP, step_id, meta, tensors)

    @classmethod
    def from_frame(cls, frame: Frame) -> StepMessage:
        """Parse a STEP frame; fails with a message naming what is missing."""
        if frame.kind != STEP:
            raise ValueError(f"expected a step frame, got kind {frame.kind}")
        m, t = frame.meta, frame.tensors
        missing = {"hidden", "positions", "slots", "dec_tables", "dec_lens", "gather"} - set(t)
        if missing:
            raise ValueError(f"step frame {frame.step_id} lacks tensors {sorted(missing)}")
        new = {
            int(sid): NewSeq(params_from_json(v["params"]), list(v["prompt"]), list(v["outputs"]))
            for sid, v in m.get("new", {}).items()
        }
        return cls(
            hidden=t["hidden"],
            positions=t["positions"],
            slot_mapping=t["slots"],
            num_decodes=int(m["num_decodes"]),
            decode_block_tables=t["dec_tables"],
            decode_lens=t["dec_lens"],
            spans=[(int(a), int(b), int(c)) for a, b, c in m["spans"]],
            gather_slots=t["gather"],
            sample_rows=list(m["sample_rows"]),
            sample_seq_ids=list(m["sample_seq_ids"]),
            extra_rows=list(m["extra_rows"]),
            seq_ids=list(m["seq_ids"]),
            block_size=int(m["block_size"]),
            hops=list(m.get("hops", [])),
            new_seqs=new,
            kv_free={str(k): int(v) for k, v in m.get("kv_free", {}).items()},
            stage_s={str(k): float(v) for k, v in m.get("stage_s", {}).items()},
        )

    def forwarded(self, hidden: torch.Tensor, stage: str, compute_s: float) -> StepMessage:
        """The step for the next stage (sent to ``self.hops[0]``): its input, this stage timed."""
        return dataclasses.replace(
            self, hidden=hidden, hops=self.hops[1:], stage_s={**self.stage_s, stage: compute_s}
        )

    def step_inputs(
        self, device: torch.device, native: bool, cos_sin: torch.Tensor | None
    ) -> StepInputs:
        """Rebuild the runner's StepInputs for this stage's own KV tensors."""
        d = self.num_decodes
        tables: torch.Tensor | None = None
        lens: torch.Tensor | None = None
        decode_slots = decode_mask = None
        if d:
            if native:
                tables, lens = self.decode_block_tables, self.decode_lens
            else:
                bs = self.block_size
                lens_t = self.decode_lens.long()
                pos = torch.arange(int(lens_t.max()))
                decode_slots = (self.decode_block_tables.long()[:, pos // bs] * bs + pos % bs).to(device)
                decode_mask = (pos.unsqueeze(0) < lens_t.unsqueeze(1))[:, None, None, :].to(device)
        spans: list[PrefillSpan] = []
        g = 0
        for start, length, ctx in self.spans:
            gather = None
            if ctx > 0:
                n = ctx + length
                gather = self.gather_slots[g : g + n].to(device)
                g += n
            spans.append(PrefillSpan(start, length, ctx, gather))
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device),
            num_decodes=d,
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            decode_block_tables=tables,
            decode_lens=lens,
            block_size=self.block_size,
            cos_sin=cos_sin if native else None,
            prefills=spans,
        )
        return StepInputs(
            input_ids=torch.empty(0, dtype=torch.long, device=device),
            positions=self.positions.to(device),
            meta=meta,
            sample_rows=self.sample_rows,
            entries=[],
        )


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


def step_message(
    batch: Batch,
    inputs: StepInputs,
    hidden: torch.Tensor,
    block_size: int,
    extra_rows: list[int],
) -> StepMessage:
    """Describe a head-side step for the stages after the head (hops/new set by the caller)."""
    d = len(batch.decodes)
    if d:
        lens = [e.start + 1 for e in batch.decodes]
        nblocks = -(-max(lens) // block_size)
        tables = torch.zeros((d, nblocks), dtype=torch.int32)
        for i, e in enumerate(batch.decodes):
            n = -(-lens[i] // block_size)
            tables[i, :n] = torch.tensor(e.seq.block_table[:n], dtype=torch.int32)
        lens_t = torch.tensor(lens, dtype=torch.int32)
    else:
        tables = torch.zeros((0, 0), dtype=torch.int32)
        lens_t = torch.zeros(0, dtype=torch.int32)
    spans = [(s.start, s.length, s.context_len) for s in inputs.meta.prefills]
    gathers = [
        s.gather_slots.cpu() for s in inputs.meta.prefills
        if s.context_len > 0 and s.gather_slots is not None
    ]
    gather = torch.cat(gathers) if gathers else torch.zeros(0, dtype=torch.long)
    return StepMessage(
        hidden=hidden,
        positions=inputs.positions.cpu(),
        slot_mapping=inputs.meta.slot_mapping.cpu(),
        num_decodes=d,
        decode_block_tables=tables,
        decode_lens=lens_t,
        spans=spans,
        gather_slots=gather,
        sample_rows=list(inputs.sample_rows),
        sample_seq_ids=[e.seq.seq_id for e in batch.entries if e.samples],
        extra_rows=list(extra_rows),
        seq_ids=[e.seq.seq_id for e in batch.entries],
        block_size=block_size,
    )


def _lp_to_json(lp: TokenLogprobs | None) -> list[Any] | None:
    if lp is None:
        return None
    return [lp.token_id, lp.logprob, lp.rank, [[t, v] for t, v in lp.top]]


def _lp_from_json(v: list[Any] | None) -> TokenLogprobs | None:
    if v is None:
        return None
    return TokenLogprobs(int(v[0]), float(v[1]), int(v[2]), [(int(t), float(x)) for t, x in v[3]])


@dataclass
class StepResult:
    """The tail's answer to one STEP: a token per sample row, plus optional logits rows."""

    tokens: list[int]
    logprobs: list[TokenLogprobs | None]
    prompt_logits: torch.Tensor | None = None  # fp32 [len(extra_rows), vocab]
    stage_s: dict[str, float] = field(default_factory=dict)  # compute seconds per stage

    def to_frame(self, step_id: int) -> Frame:
        """The RESULT frame."""
        meta = {
            "tokens": self.tokens,
            "logprobs": [_lp_to_json(lp) for lp in self.logprobs],
            "stage_s": self.stage_s,
        }
        tensors = {} if self.prompt_logits is None else {"prompt_logits": self.prompt_logits}
        return Frame(RESULT, step_id, meta, tensors)

    @classmethod
    def from_frame(cls, frame: Frame) -> StepResult:
        """Parse a RESULT frame."""
        m = frame.meta
        return cls(
            tokens=[int(t) for t in m["tokens"]],
            logprobs=[_lp_from_json(v) for v in m["logprobs"]],
            prompt_logits=frame.tensors.get("prompt_logits"),
            stage_s={str(k): float(v) for k, v in m.get("stage_s", {}).items()},
        )


def error_frame(step_id: int, stage: str, replica: str, message: str) -> Frame:
    """An ERROR frame: the step could not run or be forwarded by `stage` at `replica`."""
    return Frame(ERROR, step_id, {"stage": stage, "replica": replica, "message": message})


def control_frame(**meta: Any) -> Frame:
    """A CONTROL frame (drop finished sequences, announce draining)."""
    return Frame(CONTROL, 0, dict(meta))
