"""Sampling parameters of one sequence, validated once at the API edge."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# torch.Generator.manual_seed takes int64 (and uint64); top_k and token ids are int32 at most.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class GuidedDecoding:
    """A compiled output constraint (strata.engine.guided): its kind, the request field it
    came from (named in errors) and its llguidance grammar (JSON text)."""

    kind: str  # json, json_object, regex, choice, grammar
    param: str
    grammar: str


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and when to stop; mirrors vLLM's SamplingParams fields we honour."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    lora_id: int = 0  # the LoRA adapter (strata.engine.lora) the sequence runs under; 0: none
    logprobs: int | None = None  # top-N logprobs per generated token (0 = sampled only)
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    guided: GuidedDecoding | None = None  # structured output: masks from this grammar

    def __post_init__(self) -> None:
        # The API edge checks these too; checking here again keeps every other way in
        # (stage protocol, embedded use) from reaching torch with a value it cannot take.
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not 1 <= self.max_tokens <= INT32_MAX:
            raise ValueError(f"max_tokens must be in [1, {INT32_MAX}], got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not -1 <= self.top_k <= INT32_MAX:
            raise ValueError(
                f"top_k must be -1 or 0 (disabled) or in [1, {INT32_MAX}], got {self.top_k}"
            )
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must fit a signed 64-bit integer, got {self.seed}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
            )
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {value}")
        for t in self.stop_token_ids:
            if not 0 <= t <= INT32_MAX:
                raise ValueError(f"stop_token_ids must be token ids, got {t}")
        for t, v in self.logit_bias.items():
            if not 0 <= t <= INT32_MAX:
                raise ValueError(f"logit_bias keys must be token ids, got {t}")
            if not (math.isfinite(v) and -100 <= v <= 100):
                raise ValueError(f"logit_bias[{t}] must be in [-100, 100], got {v}")

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax, as in OpenAI's API."""
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        """Whether any token-history penalty applies."""
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1.0
        )
