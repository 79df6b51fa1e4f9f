"""What the frames of a stage pipeline carry, and how a stage rebuilds its step from them.

The head turns one scheduled micro-batch into a STEP frame: hidden states plus the
attention metadata every stage needs (positions, KV slots, decode block tables,
prefill spans) as raw integer tensors. All stages of one path share the head's block
namespace, so the head's block tables address every stage's own KV tensors. Non-tensor
metadata (sequence ids, span bounds, sampling parameters of newly seen sequences, the
remaining route) is small JSON. The tail answers with a RESULT frame of sampled tokens.

A stage checks every index a STEP carries against its own capacity before any of it
reaches a kernel (`strata.stages.bounds`).
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
from strata.stages.transport import ERROR, RESULT, STEP, Frame

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
