"""Turns a batch of logits into next tokens, honouring each sequence's SamplingParams."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from strata.engine.kernels import load_paged_attention, raw_op
from strata.engine.sampling import SamplingParams


@functools.cache
def _native_argmax() -> object | None:
    """The native op, resolved on first use (importing this module builds nothing)."""
    return raw_op(torch.ops.strata.argmax_rows) if load_paged_attention() else None


def _argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax, torch.argmax's answer; the native op for float32 CPU logits
    (torch's CPU reduction reads the logits slowly for this shape, and greedy decode runs it
    every step)."""
    if logits.dtype == torch.float32 and logits.device.type == "cpu" and (op := _native_argmax()) is not None:
        return op(logits)  # type: ignore[operator]
    return logits.argmax(dim=-1)


@dataclass
class TokenLogprobs:
    """The sampled token's logprob, its rank, and the top-N alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class SampleRequest:
    """What the sampler needs of one row: params, history and how many tokens it has made."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: tuple[int, ...]
    generator: torch.Generator | None = None
    # Structured output: True where the grammar bans a token (strata.engine.guided).
    banned: torch.Tensor | None = None


def logprobs_of(logprobs_row: torch.Tensor, token_id: int, top_n: int) -> TokenLogprobs:
    """Logprob, rank (1 = most likely) and top-N of one position's distribution."""
    lp = float(logprobs_row[token_id])
    rank = int((logprobs_row > logprobs_row[token_id]).sum()) + 1
    top: list[tuple[int, float]] = []
    if top_n > 0:
        vals, idx = logprobs_row.topk(top_n)
        top = list(zip(idx.tolist(), vals.tolist(), strict=True))
    return TokenLogprobs(token_id, lp, rank, top)


class Sampler:
    """Stateless apart from the per-request generators the caller owns."""

    def __call__(
        self, logits: torch.Tensor, rows: list[SampleRequest]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Sample one token per row of logits [N, V] (fp32)."""
        n, vocab = logits.shape
        want_lp = [r.params.logprobs is not None for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        if any(
            r.params.logit_bias or r.params.needs_penalties
            or len(r.output_token_ids) < r.params.min_tokens
            for r in rows
        ):
            logits = logits.clone()  # edited in place below; the caller's stays intact
        for i, r in enumerate(rows):
            p = r.params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
            if len(r.output_token_ids) < p.min_tokens:
                banned = [t for t in (*r.eos_token_ids, *p.stop_token_ids) if t < vocab]
                if banned:
                    logits[i, banned] = float("-inf")
            if p.needs_penalties:
                self._penalize(logits[i], r)
        logits = self._ban(logits, rows)

        greedy_rows = [r.params.greedy for r in rows]
        if all(greedy_rows):  # the common serving case: one argmax, no masks or copies
            tokens = _argmax_rows(logits)
            rand_idx: list[int] = []
        else:
            greedy = torch.tensor(greedy_rows)
            tokens = torch.empty(n, dtype=torch.long)
            if bool(greedy.any()):
                tokens[greedy] = _argmax_rows(logits[greedy])
            rand_idx = (~greedy).nonzero().flatten().tolist()
        if rand_idx:
            sub = logits[rand_idx]
            temps = torch.tensor([rows[i].params.temperature for i in rand_idx]).unsqueeze(1)
            probs = torch.softmax(sub / temps, dim=-1)
            probs = self._truncate(probs, [rows[i].params for i in rand_idx])
            noise = torch.empty_like(probs)
            for j, i in enumerate(rand_idx):
                noise[j].exponential_(generator=rows[i].generator)
            # Exponential race: argmax p/q with q ~ Exp(1) samples from p exactly.
            tokens[rand_idx] = (probs / noise).argmax(dim=-1)

        token_list = tokens.tolist()
        lps: list[TokenLogprobs | None] = []
        for i, r in enumerate(rows):
            if raw_logprobs is None or r.params.logprobs is None:
                lps.append(None)
            else:
                lps.append(logprobs_of(raw_logprobs[i], token_list[i], r.params.logprobs))
        return token_list, lps

    @staticmethod
    def _ban(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
        """The logits with each grammar's banned tokens at -inf, in one out-of-place op
        (the caller's logits stay intact); rows without a grammar pass unchanged."""
        masked = [i for i, r in enumerate(rows) if r.banned is not None]
        if not masked:
            return logits
        ban = torch.stack([rows[i].banned for i in masked])  # type: ignore[misc]
        if len(masked) == len(rows):
            return logits.masked_fill(ban, float("-inf"))
        idx = torch.tensor(masked)
        return logits.index_put((idx,), logits[idx].masked_fill(ban, float("-inf")))

    @staticmethod
    def _penalize(row: torch.Tensor, r: SampleRequest) -> None:
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_token_ids) | set(r.output_token_ids)))
            if len(seen):
                vals = row[seen]
                row[seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
        if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
            out = torch.tensor(r.output_token_ids)
            counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
            row -= p.frequency_penalty * counts
            row -= p.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _truncate(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Apply top-k, top-p and min-p by zeroing excluded probabilities."""
        vocab = probs.shape[-1]
        # A top_k at or past the vocabulary keeps everything: the same as disabled.
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if any(min_p):
            thresh = torch.tensor(min_p).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(probs < thresh, torch.zeros_like(probs), probs)
        if any(top_k) or any(x < 1.0 for x in top_p):
            sorted_p, sorted_idx = probs.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab).unsqueeze(0)
            k = torch.tensor([k if k else vocab for k in top_k]).unsqueeze(1)
            drop = ranks >= k
            cum = sorted_p.cumsum(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always keep the first).
            drop |= (cum - sorted_p) >= torch.tensor(top_p).unsqueeze(1)
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_p)
        return probs
