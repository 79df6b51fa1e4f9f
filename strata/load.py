"""The one load report that engines and stages publish (GET /load).

The gateway's router and the autoscaler both read it, so it is small, flat and
versioned by field names only. Rates are measured by the replica itself over a
recent window, which is what lets routing policies avoid hand-tuned constants.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A replica's load at one instant; all counts are non-negative."""

    model: str
    running: int  # sequences in the running batch
    waiting: int  # sequences queued, not yet scheduled
    waiting_prompt_tokens: int  # prompt tokens still to prefill (queued + partially prefilled)
    free_kv_blocks: int
    total_kv_blocks: int
    block_size: int  # tokens per KV block
    max_num_seqs: int
    max_num_batched_tokens: int
    prefix_hit_rate: float  # cached prompt tokens / prompt tokens, lifetime
    prompt_tokens_per_s: float  # measured prefill rate over the recent window
    generation_tokens_per_s: float  # measured output rate over the recent window
    decode_step_s: float  # recent mean wall time of one engine step that decoded
    prefill_token_s: float  # recent mean seconds per prefilled token (0 when unknown)
    ready: bool = True
    draining: bool = False
    stage: str = ""  # "a:b" for a layer-range stage, "" for a whole engine
    # Output tokens left to the running sequence nearest its max_tokens: a sequence slot
    # frees within that many decode steps (0: unknown). Every gateway reads the same bound
    # on how long a full replica keeps a new request waiting.
    slot_free_tokens: int = 0
    # LoRA adapters the replica holds now (requests name them as their model); gateways
    # re-read /v1/models when this set changes, so dynamically loaded ones are routed to.
    lora_adapters: tuple[str, ...] = ()

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (0..1)."""
        if self.total_kv_blocks <= 0:
            return 0.0
        return 1.0 - self.free_kv_blocks / self.total_kv_blocks

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived kv_usage included for readers."""
        d = asdict(self)
        d["kv_usage"] = self.kv_usage
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadReport:
        """Parse a /load body, ignoring unknown keys so old and new replicas interoperate."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
