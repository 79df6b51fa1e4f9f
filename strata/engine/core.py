"""The synchronous engine core: scheduler + runner + sampler + detokenizer, one step at a time.

`EngineCore.step()` runs one iteration and returns per-sequence output deltas.
It owns no thread and no event loop; `strata.engine.engine.AsyncEngine` drives
it from a background thread and the HTTP server consumes its outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from strata.engine.guided import GrammarBackend
from strata.engine.kv_cache import BlockManager
from strata.engine.prefix_registry import PrefixRegistry, RouteKeys
from strata.engine.runner import ModelRunner
from strata.engine.sampler import Sampler, SampleRequest, TokenLogprobs, logprobs_of
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import Batch, Scheduler, SchedulerConfig
from strata.engine.sequence import Sequence
from strata.engine.threads import ThreadGovernor
from strata.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from strata.load import LoadReport
from strata.load_meter import LoadMeter
from strata.routing.prompt import PromptEstimator

log = logging.getLogger("strata.engine")


class RequestError(ValueError):
    """A request the engine cannot serve as asked (maps to HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class SequenceFailed(RuntimeError):
    """One sequence failed inside the engine step (a fault, not its input): HTTP 500.

    The step goes on for the other sequences; this one is aborted and its blocks freed.
    """


@dataclass
class SeqOutput:
    """What one step produced for one sequence."""

    seq_id: int
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class _SeqState:
    """Per-sequence output-side state the scheduler does not need."""

    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    text: str = ""  # full output text so far (after stop-string truncation)
    emitted: int = 0  # characters of `text` already handed out
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False
    matcher: Any = None  # an llguidance LLMatcher for a constrained sequence


class EngineCore:
    """One model replica's batching loop body."""

    supports_guided = True  # structured output (a stage pipeline's head samples remotely)

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        scheduler_config: SchedulerConfig,
        model_name: str,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.config = scheduler_config
        self.blocks = BlockManager(
            runner.num_blocks, runner.block_size, enable_prefix_caching,
            sliding_window=runner.model.config.kv_window,
        )
        self.scheduler = Scheduler(scheduler_config, self.blocks)
        # Routing keys the prefix cache holds, for gateways (None without prefix caching),
        # hashed in the gateways' default chunks (a gateway chunking otherwise ignores them).
        self.route_estimator = PromptEstimator()
        self.prefixes: PrefixRegistry | None = None
        if enable_prefix_caching:
            self.prefixes = PrefixRegistry(self.blocks.block_size,
                                           chunk_bytes=self.route_estimator.chunk_bytes,
                                           chunk_tokens=self.route_estimator.chunk_tokens)
            self.blocks.evicted = []
        self.sampler = Sampler()
        self.grammar = GrammarBackend(tokenizer, runner.model.config.vocab_size)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self.states: dict[int, _SeqState] = {}
        self.meter = LoadMeter(time.monotonic())
        self.threads: ThreadGovernor | None = None  # compute threads (build_engine_core sets it)
        self.draining = False
        # Sequences that failed inside a step, for the loop to tell their consumers.
        self.failures: list[tuple[int, BaseException]] = []

    # -- requests -------------------------------------------------------------
    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Raise RequestError when a prompt or its budget cannot ever fit."""
        max_len = self.config.max_model_len
        if num_prompt_tokens == 0:
            raise RequestError("the prompt is empty; send at least one token", "prompt")
        if num_prompt_tokens + params.max_tokens > max_len:
            raise RequestError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {num_prompt_tokens + params.max_tokens} tokens "
                f"({num_prompt_tokens} in the messages, {params.max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                "max_tokens",
            )
        bs = self.runner.block_size
        need = -(-(num_prompt_tokens + params.max_tokens) // bs)
        if need > self.blocks.num_blocks:
            raise RequestError(
                f"the request needs {need} KV blocks but this replica has only "
                f"{self.blocks.num_blocks}; reduce max_tokens or the prompt",
                "max_tokens",
            )
        if params.guided is not None and not self.supports_guided:
            raise RequestError(
                f"{params.guided.param}: structured output is not supported by a stage "
                "pipeline; send it to a whole-model engine", params.guided.param)
        vocab = self.runner.model.config.vocab_size
        for t in params.stop_token_ids:
            if not 0 <= t < vocab:
                raise RequestError(
                    f"stop_token_ids contains {t}, outside the vocabulary [0, {vocab})",
                    "stop_token_ids",
                )
        for t in params.logit_bias:
            if not 0 <= t < vocab:
                raise RequestError(
                    f"logit_bias has token id {t}, outside the vocabulary [0, {vocab})",
                    "logit_bias",
                )

    def add(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, now: float,
            route_keys: RouteKeys = ()) -> None:
        """Queue a validated sequence; ``route_keys`` name its prefix for the gateways."""
        vocab = self.runner.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        self.check_request(len(prompt_ids), params)
        seq = Sequence(seq_id, list(prompt_ids), params, arrival_time=now)
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        detok = IncrementalDetokenizer(
            self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens
        )
        st = _SeqState(seq, detok, gen)
        if params.guided is not None:
            try:
                st.matcher = self.grammar.matcher(params.guided)
            except ValueError as e:
                raise RequestError(str(e), params.guided.param) from e
        if params.prompt_logprobs is not None:
            st.prompt_logprobs = [None]
        # Everything that can fail is built: register last, so a failed add leaves nothing.
        if params.lora_id:
            self._acquire_lora(params.lora_id)
        self.states[seq_id] = st
        try:
            self.scheduler.add(seq)
        except BaseException:
            del self.states[seq_id]
            self._release_lora(params)
            raise
        if self.prefixes is not None:
            self.prefixes.admit(seq_id, route_keys)

    def abort(self, seq_id: int) -> bool:
        """Drop a sequence and free its KV blocks; False if it was unknown or done."""
        st = self.states.pop(seq_id, None)
        if st is not None:
            self._release_lora(st.seq.params)
        if self.prefixes is not None:
            self.prefixes.release(seq_id)
        return self.scheduler.abort(seq_id) is not None

    def _acquire_lora(self, lora_id: int) -> None:
        """Count a sequence on its LoRA adapter (which cannot be unloaded under it)."""
        loras = self.runner.loras
        if loras is None:
            raise RequestError("this engine serves no LoRA adapters (start it with --enable-lora)", "model")
        try:
            loras.acquire(lora_id)
        except ValueError as e:
            raise RequestError(str(e), "model") from e

    def _release_lora(self, params: SamplingParams) -> None:
        if params.lora_id and self.runner.loras is not None:
            self.runner.loras.release(params.lora_id)

    def take_failures(self) -> list[tuple[int, BaseException]]:
        """Sequences failed since the last call, with the error for their consumer."""
        out, self.failures = self.failures, []
        return out

    def _fail(self, seq_id: int, exc: BaseException) -> None:
        """Fail one sequence alone: log it, free its blocks, queue the error for its client."""
        if isinstance(exc, RequestError):
            err: BaseException = exc
        else:
            log.error("sequence %d failed; the others go on", seq_id, exc_info=exc)
            err = SequenceFailed(f"generation failed for this sequence: {exc!r}")
        self.abort(seq_id)
        self.failures.append((seq_id, err))

    @property
    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return self.scheduler.num_unfinished > 0

    # -- the step ---------------------------------------------------------------
    def step(self) -> list[SeqOutput]:
        """Schedule, run the model, sample, detokenize, and check stop conditions."""
        if self.threads is not None:
            self.threads.tick()
        t0 = time.perf_counter()
        batch = self.scheduler.step()
        for seq in batch.preempted:
            st = self.states.get(seq.seq_id)
            if st is not None:
                st.pending_logprobs.clear()
        if not batch:
            return []
        inputs = self.runner.prepare(batch)
        sample_entries = [e for e in batch.entries if e.samples]
        # Grammar masks are computed in a worker while the model runs (strata.engine.guided).
        masks = self.grammar.start_masks([self.states[e.seq.seq_id].matcher for e in sample_entries])
        hidden = self.runner.forward(inputs)
        rows = list(inputs.sample_rows)
        plp_ranges = self._prompt_logprob_rows(batch, len(batch.decodes))
        extra = [r for rng in plp_ranges.values() for r in range(*rng)]
        logits = self.runner.logits(hidden, rows + extra)
        mask = masks.result() if masks is not None else None
        failed: dict[int, BaseException] = {}
        reqs = []
        for i, e in enumerate(sample_entries):
            st = self.states[e.seq.seq_id]
            if mask is not None and i in mask.errors:
                failed[e.seq.seq_id] = SequenceFailed(f"structured output: {mask.errors[i]}")
            reqs.append(
                SampleRequest(
                    e.seq.params,
                    e.seq.prompt_token_ids,
                    e.seq.output_token_ids,
                    self.eos_token_ids,
                    st.generator,
                    mask.banned[i] if mask is not None else None,
                )
            )
        tokens, lps = self._sample(logits[: len(rows)], reqs, sample_entries, failed)
        if extra:
            self._collect_prompt_logprobs(batch, plp_ranges, logits[len(rows) :], failed)
        self.scheduler.on_step_done(batch)
        if self.prefixes is not None:
            self._follow_prefix_cache(batch)
        outputs = self._append_sampled(sample_entries, tokens, lps, failed)
        self._account(batch, len(sample_entries), time.perf_counter() - t0)
        return outputs

    def _follow_prefix_cache(self, batch: Batch) -> None:
        """Tell the prefix registry what this step evicted and which prompts it prefilled."""
        prefixes, evicted = self.prefixes, self.blocks.evicted
        assert prefixes is not None and evicted is not None
        if evicted:
            prefixes.evict(evicted)
            evicted.clear()
        for e in batch.prefills:
            if e.samples:
                prefixes.bind(e.seq.seq_id, e.seq.block_hashes)

    def _append_sampled(
        self,
        entries: list,
        tokens: list[int],
        lps: list[TokenLogprobs | None],
        failed: dict[int, BaseException],
    ) -> list[SeqOutput]:
        """Append each sampled token; a sequence that raises (or already failed) fails alone."""
        outputs: list[SeqOutput] = []
        for e, tok, lp in zip(entries, tokens, lps, strict=True):
            if e.seq.seq_id in failed:
                continue
            try:
                out = self._append_token(e.seq, tok, lp)
            except Exception as exc:  # noqa: BLE001 - fails this sequence alone
                failed[e.seq.seq_id] = exc
                continue
            if out is not None:
                outputs.append(out)
        for seq_id, exc in failed.items():
            self._fail(seq_id, exc)
        return outputs

    def _sample(
        self,
        logits: torch.Tensor,
        reqs: list[SampleRequest],
        entries: list,
        failed: dict[int, BaseException],
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Sample the batch; if that raises, sample row by row so one bad row fails alone."""
        if not reqs:
            return [], []
        try:
            return self.sampler(logits, reqs)
        except Exception:  # noqa: BLE001 - narrowed to the rows that raise below
            log.warning("batched sampling failed; sampling the %d rows one by one", len(reqs))
        tokens: list[int] = []
        lps: list[TokenLogprobs | None] = []
        for i, (req, e) in enumerate(zip(reqs, entries, strict=True)):
            try:
                tok, lp = self.sampler(logits[i : i + 1], [req])
            except Exception as exc:  # noqa: BLE001 - fails this sequence alone
                failed[e.seq.seq_id] = exc
                tok, lp = [0], [None]
            tokens += tok
            lps += lp
        return tokens, lps

    def _prompt_logprob_rows(self, batch: Batch, offset: int) -> dict[int, tuple[int, int]]:
        ranges: dict[int, tuple[int, int]] = {}
        for e in batch.prefills:
            st = self.states.get(e.seq.seq_id)
            if st is not None and st.prompt_logprobs is not None and not st.prompt_logprobs_sent:
                if e.start < e.seq.num_prompt_tokens:
                    ranges[e.seq.seq_id] = (offset, offset + e.num_tokens)
            offset += e.num_tokens
        return ranges

    def _collect_prompt_logprobs(
        self,
        batch: Batch,
        ranges: dict[int, tuple[int, int]],
        logits: torch.Tensor,
        failed: dict[int, BaseException] | None = None,
    ) -> None:
        lp_all = torch.log_softmax(logits, dim=-1)
        i = 0
        for e in batch.prefills:
            rng = ranges.get(e.seq.seq_id)
            if rng is None:
                continue
            try:
                st = self.states[e.seq.seq_id]
                assert st.prompt_logprobs is not None
                n_prompt = e.seq.num_prompt_tokens
                top_n = e.seq.params.prompt_logprobs or 0
                for j in range(e.num_tokens):
                    nxt = e.start + j + 1
                    if nxt < n_prompt and len(st.prompt_logprobs) == nxt:
                        tok = e.seq.prompt_token_ids[nxt]
                        st.prompt_logprobs.append(logprobs_of(lp_all[i + j], tok, top_n))
            except Exception as exc:  # noqa: BLE001 - fails this sequence alone
                if failed is None:
                    raise
                failed[e.seq.seq_id] = exc
            i += rng[1] - rng[0]

    def _append_token(self, seq: Sequence, token: int, lp: TokenLogprobs | None) -> SeqOutput | None:
        st = self.states.get(seq.seq_id)
        if st is None:
            return None
        seq.output_token_ids.append(token)
        if lp is not None:
            st.pending_logprobs.append(lp)
        p = seq.params
        n_out = len(seq.output_token_ids)
        finish: str | None = None
        stop_reason: str | int | None = None
        is_stop_token = n_out >= p.min_tokens and (
            (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids
        )
        if is_stop_token:
            finish = "stop"
            stop_reason = token if token in p.stop_token_ids else None
        else:
            st.text += st.detok.add(token)
            if st.matcher is not None and self._advance_grammar(st.matcher, token):
                finish = "stop"  # the grammar is complete: nothing else may follow
        if finish is None and p.stop and n_out >= p.min_tokens:
            hit = self._find_stop(st, p)
            if hit is not None:
                finish, stop_reason = "stop", hit
        if finish is None and (n_out >= p.max_tokens or seq.num_tokens >= self.config.max_model_len):
            finish = "length"
        if finish is not None and not isinstance(stop_reason, str):
            st.text += st.detok.flush()
        # Hold back a possible stop-string prefix until it is resolved.
        hold = 0 if finish else max((len(s) for s in p.stop), default=1) - 1
        upto = max(st.emitted, len(st.text) - hold)
        delta = st.text[st.emitted : upto]
        st.emitted = upto
        out = SeqOutput(
            seq_id=seq.seq_id,
            token_ids=[token],
            text=delta,
            finished=finish is not None,
            finish_reason=finish,
            stop_reason=stop_reason,
            logprobs=st.pending_logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=n_out,
        )
        st.pending_logprobs = []
        if st.prompt_logprobs is not None and not st.prompt_logprobs_sent:
            out.prompt_logprobs = st.prompt_logprobs
            st.prompt_logprobs_sent = True
        if finish is not None:
            self.scheduler.finish(seq, finish)
            del self.states[seq.seq_id]
            self._release_lora(seq.params)
            if self.prefixes is not None:
                self.prefixes.release(seq.seq_id)
        return out

    @staticmethod
    def _advance_grammar(matcher: Any, token: int) -> bool:
        """Feed the accepted token to the sequence's grammar; True once it is complete."""
        if not matcher.consume_token(token):
            raise SequenceFailed(f"structured output: token {token} broke the grammar: "
                                 f"{matcher.get_error()}")
        return bool(matcher.is_stopped())

    @staticmethod
    def _find_stop(st: _SeqState, p: SamplingParams) -> str | None:
        longest = max(len(s) for s in p.stop)
        # Only the tail can contain a new match: text emitted before was checked already.
        search_from = max(0, st.emitted - longest)
        best: tuple[int, str] | None = None
        for s in p.stop:
            i = st.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        st.text = st.text[: i + len(s)] if p.include_stop_str_in_output else st.text[:i]
        st.emitted = min(st.emitted, len(st.text))
        return s

    def _account(self, batch: Batch, n_sampled: int, step_s: float) -> None:
        prompt = batch.num_prefill_tokens
        self.meter.record(time.monotonic(), step_s, prompt, prompt + len(batch.decodes), n_sampled)

    def load_report(self, ready: bool = True) -> LoadReport:
        """This replica's load right now."""
        meter = self.meter
        prompt_rate, gen_rate = meter.rates(time.monotonic())
        max_len = self.config.max_model_len
        slot_free = min((min(s.params.max_tokens - len(s.output_token_ids), max_len - s.num_tokens)
                         for s in self.scheduler.running), default=0)
        return LoadReport(
            model=self.model_name,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            waiting_prompt_tokens=self.scheduler.waiting_prompt_tokens(),
            free_kv_blocks=self.blocks.num_free_blocks,
            total_kv_blocks=self.blocks.num_blocks,
            block_size=self.blocks.block_size,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            prefix_hit_rate=self.blocks.stats().hit_rate,
            prompt_tokens_per_s=prompt_rate,
            generation_tokens_per_s=gen_rate,
            decode_step_s=meter.decode_step_s,
            prefill_token_s=meter.prefill_token_s,
            ready=ready,
            draining=self.draining,
            slot_free_tokens=max(0, slot_free),
            lora_adapters=tuple(self.runner.loras.names()) if self.runner.loras is not None else (),
        )
