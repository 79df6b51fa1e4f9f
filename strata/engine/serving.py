"""OpenAI request -> engine sequences -> OpenAI responses (streamed or whole).

Holds the API semantics (n, echo, logprobs, usage, stop reasons) apart from the
HTTP wiring in server.py, so both stay short.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from strata.engine.core import RequestError, SeqOutput
from strata.engine.engine import AsyncEngine
from strata.engine.guided import decoding_of
from strata.engine.prefix_registry import RouteKeys
from strata.engine.route_keys import id_route_keys, locate, text_route_keys
from strata.engine.sampler import TokenLogprobs
from strata.engine.sampling import GuidedDecoding, SamplingParams
from strata.engine.tokenizer import Tokenizer
from strata.engine.tool_calls import (
    ChoiceTools,
    ToolConfig,
    ToolMode,
    forced_decoding,
    parser_for,
    template_for,
    template_messages,
)
from strata.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    OpenAIError,
    RequestLimits,
    new_id,
    now_s,
    sse,
)
from strata.routing.prompt import chat_routing_text

# One sequence to run: (choice index, prompt ids, sampling, the prompt's routing keys).
Job = tuple[int, list[int], SamplingParams, RouteKeys]


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    seed_offset: int = 0,
    guided: GuidedDecoding | None = None,
) -> SamplingParams:
    """Map request fields onto SamplingParams; ValueErrors become 400s."""
    bias: dict[int, float] = {}
    for k, v in (req.logit_bias or {}).items():
        if not (k.isascii() and k.isdigit()):
            raise OpenAIError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias")
        bias[int(k)] = float(v)
    seed = None
    if req.seed is not None:
        # Choice j of n gets seed + j, wrapped into int64 so that the last seeds stay valid.
        seed = (req.seed + seed_offset + 2**63) % 2**64 - 2**63
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty or 1.0,
            stop=tuple(req.stop_list()),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=bias,
            skip_special_tokens=req.skip_special_tokens,
            guided=guided,
        )
    except ValueError as e:
        # SamplingParams' messages start with the field's name.
        raise OpenAIError(str(e), param=str(e).split(" ", 1)[0]) from e


@dataclass
class _Choice:
    """Accumulated state of one choice."""

    index: int
    prompt_idx: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class Serving:
    """Turns validated requests into engine calls and OpenAI-shaped results."""

    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Tokenizer,
        model_name: str,
        limits: RequestLimits | None = None,
        tools: ToolConfig | None = None,
    ) -> None:
        self.engine = engine
        self.tools = tools or ToolConfig()
        self.limits = limits or RequestLimits()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = engine.core.config.max_model_len
        core = engine.core
        # Routing keys are computed only where a prefix registry reports them.
        self.route_estimator = core.route_estimator if core.prefixes is not None else None
        self._token_text = lru_cache(maxsize=65536)(self._decode_one)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # -- shared -----------------------------------------------------------------
    def check_model(self, name: str | None) -> int:
        """The LoRA id of ``name`` (0: the base model; None means the default); 404 for a
        model this replica does not serve."""
        if name is None or name == self.model_name:
            return 0
        loras = getattr(self.engine.core.runner, "loras", None)  # a stage head has none
        lora_id = loras.resolve(name) if loras is not None else None
        if lora_id is None:
            raise OpenAIError(
                f"The model `{name}` does not exist.", 404, "NotFoundError", "model"
            )
        return lora_id

    @staticmethod
    def _under_lora(jobs: list[Job], lora_id: int) -> list[Job]:
        """The jobs run under a LoRA adapter: its id in their sampling parameters, and no
        routing keys (their KV is the adapter's, not the base model's that gateways track)."""
        if not lora_id:
            return jobs
        return [(i, ids, replace(p, lora_id=lora_id), ()) for i, ids, p, _ in jobs]

    def tokenize_prompt(self, prompt: str | list[int], add_special_tokens: bool = False) -> list[int]:
        """Token ids of a text or token-id prompt, checked against the vocabulary.

        ``add_special_tokens``: a text gets the tokenizer's special tokens (its BOS, where
        it has one), as vLLM does for completions; token ids are taken as they are.
        """
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = list(prompt)
            vocab = self.tokenizer.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise OpenAIError(
                    f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})",
                    param="prompt",
                )
        if not ids:
            raise OpenAIError("the prompt is empty; send at least one token", param="prompt")
        return ids

    def default_max_tokens(
        self, requested: int | None, n_prompt: int, prompt_param: str = "messages"
    ) -> int:
        """vLLM's rule: absent max_tokens means the rest of the context."""
        if requested is not None:
            return requested
        rest = self.max_model_len - n_prompt
        if rest < 1:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {n_prompt}.",
                param=prompt_param,
            )
        return rest

    def guided_of(self, req: CompletionRequest | ChatCompletionRequest,
                  forced: GuidedDecoding | None = None) -> GuidedDecoding | None:
        """The request's output constraint, compiled and checked against this tokenizer (400s)."""
        guided = forced or decoding_of(req)
        if guided is not None:
            self.check_grammar(guided)
        return guided

    def check_grammar(self, guided: GuidedDecoding) -> None:
        """400 naming the field whose grammar this tokenizer cannot use."""
        try:
            self.engine.core.grammar.validate(guided)
        except ValueError as e:
            raise OpenAIError(str(e), param=guided.param) from e

    def tool_mode(self, req: ChatCompletionRequest) -> ToolMode | None:
        """How tool calls come out of this request's output (None: they do not)."""
        if not req.tools or req.tool_choice == "none":
            return None
        if isinstance(req.tool_choice, NamedToolChoice):
            return ToolMode("named", name=req.tool_choice.function.name)
        if req.tool_choice == "required":
            return ToolMode("required")
        template = template_for(self.tools, self.tokenizer.chat_template, True)
        parser = parser_for(self.tools, template or self.tokenizer.chat_template)
        if not self.tools.enable_auto_tool_choice or parser is None:
            raise OpenAIError(
                "\"auto\" tool choice needs --enable-auto-tool-choice and a --tool-call-parser "
                "that knows this model's format; or send tool_choice \"required\", a named "
                "function, or \"none\"", param="tool_choice")
        return ToolMode("auto", parser=parser, parallel=req.parallel_tool_calls is not False)

    def check_fan_out(self, n_prompts: int, n: int) -> None:
        """Cap the sequences one request creates (prompts x n), before any tokenizing."""
        cap = self.limits.max_seqs_per_request
        if n_prompts * n > cap:
            raise OpenAIError(
                f"this request would create {n_prompts} prompts x n={n} = {n_prompts * n} "
                f"sequences; this server takes at most {cap} per request: send fewer prompts "
                "or a smaller n, or split the request",
                param="n" if n > 1 else "prompt",
            )

    def _lp_completion(self, lps: list[TokenLogprobs | None], offset0: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        off = offset0
        for lp in lps:
            if lp is None:  # the first prompt token has no logprob
                continue
            tok = self._token_text(lp.token_id)
            tokens.append(tok)
            token_lps.append(lp.logprob)
            tops.append({self._token_text(t): v for t, v in lp.top} if lp.top else None)
            offsets.append(off)
            off += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _lp_chat(self, lps: list[TokenLogprobs]) -> dict[str, Any]:
        content = []
        for lp in lps:
            tok = self._token_text(lp.token_id)
            content.append(
                {
                    "token": tok,
                    "logprob": lp.logprob,
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {
                            "token": self._token_text(t),
                            "logprob": v,
                            "bytes": list(self._token_text(t).encode()),
                        }
                        for t, v in lp.top
                    ],
                }
            )
        return {"content": content}

    async def _fan_in(self, jobs: list[Job]) -> AsyncIterator[tuple[int, SeqOutput]]:
        """Run several sequences and yield (choice index, output) as they arrive."""
        if len(jobs) == 1:
            idx, ids, params, keys = jobs[0]
            async for out in self.engine.generate(ids, params, keys):
                yield idx, out
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(idx: int, ids: list[int], params: SamplingParams, keys: RouteKeys) -> None:
            try:
                async for out in self.engine.generate(ids, params, keys):
                    await q.put((idx, out))
            except BaseException as e:  # noqa: BLE001 - re-raised by the consumer
                await q.put((idx, e))

        tasks = [asyncio.create_task(pump(*job)) for job in jobs]
        remaining = len(jobs)
        try:
            while remaining:
                idx, item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield idx, item
                if item.finished:
                    remaining -= 1
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- completions --------------------------------------------------------------
    def _prompt_with_keys(self, prompt: str | list[int],
                          special: bool) -> tuple[list[int], RouteKeys]:
        """A completion prompt's ids and routing keys (none without a prefix registry)."""
        est = self.route_estimator
        if est is None:
            return self.tokenize_prompt(prompt, special), ()
        if isinstance(prompt, str):
            data = prompt.encode()
            if len(data) < est.chunk_bytes:
                return self.tokenize_prompt(prompt, special), ()
            ids, ends = self.tokenizer.encode_with_ends(prompt, special)
            return ids, text_route_keys(est, data, [(0, len(data), 0)], ends)
        ids = self.tokenize_prompt(prompt)
        return ids, id_route_keys(est, ids)

    def prepare_completion(
        self, req: CompletionRequest
    ) -> tuple[list[list[int]], list[Job]]:
        """Tokenize prompts and build one job per (prompt, n)."""
        lora_id = self.check_model(req.model)
        self.check_fan_out(len(req.prompts()), req.n)
        prepared = [self._prompt_with_keys(p, req.add_special_tokens) for p in req.prompts()]
        prompts = [ids for ids, _ in prepared]
        want_prompt_lp = req.prompt_logprobs
        guided = self.guided_of(req)
        if req.echo and req.logprobs is not None:
            want_prompt_lp = max(req.logprobs, want_prompt_lp or 0)
        jobs = []
        for pi, (ids, keys) in enumerate(prepared):
            max_tokens = self.default_max_tokens(req.max_tokens or 16, len(ids), "prompt")
            for j in range(req.n):
                params = sampling_params(req, max_tokens, req.logprobs, want_prompt_lp, j, guided)
                self.check_engine(len(ids), params)
                jobs.append((pi * req.n + j, ids, params, keys))
        return prompts, self._under_lora(jobs, lora_id)

    def check_engine(self, n_prompt: int, params: SamplingParams) -> None:
        """Engine-side limits (context length, KV capacity) as 400s."""
        try:
            self.engine.check(n_prompt, params)
        except RequestError as e:
            raise OpenAIError(str(e), param=e.param) from e

    async def completion(self, req: CompletionRequest) -> dict[str, Any]:
        """Whole (non-streaming) completion response."""
        prompts, jobs = self.prepare_completion(req)
        choices = {idx: _Choice(idx, idx // req.n) for idx, *_ in jobs}
        prompt_lps: dict[int, list] = {}
        cached = {}
        async for idx, out in self._fan_in(jobs):
            c = choices[idx]
            c.text += out.text
            c.token_ids += out.token_ids
            c.logprobs += out.logprobs
            if out.prompt_logprobs is not None:
                prompt_lps[idx] = out.prompt_logprobs
            cached[c.prompt_idx] = out.num_cached_tokens
            if out.finished:
                c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        result = []
        for idx in sorted(choices):
            c = choices[idx]
            text, lp_list = c.text, list(c.logprobs)
            if req.echo:
                prompt = req.prompts()[c.prompt_idx]
                ptext = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
                text = ptext + text
                if req.logprobs is not None:
                    plp = prompt_lps.get(idx, [])
                    lp_list = list(plp) + lp_list
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._lp_completion(lp_list, 0)
            result.append(
                {
                    "index": idx,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        n_prompt = sum(len(p) for p in prompts)
        n_out = sum(len(c.token_ids) for c in choices.values())
        return {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now_s(),
            "model": req.model or self.model_name,
            "choices": result,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_out,
                "total_tokens": n_prompt + n_out,
                "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
            },
        }

    async def completion_stream(
        self, req: CompletionRequest, prepared: tuple[list[list[int]], list]
    ) -> AsyncIterator[bytes]:
        """SSE frames of a streaming completion."""
        prompts, jobs = prepared
        rid, created = new_id("cmpl"), now_s()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        n_out = 0
        cached: dict[int, int] = {}
        offsets: dict[int, int] = {}
        n_prompt = sum(len(p) for p in prompts)
        if req.echo:
            for idx, *_ in jobs:
                prompt = req.prompts()[idx // req.n]
                ptext = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
                offsets[idx] = len(ptext)
                if req.logprobs is None:
                    yield sse(self._chunk(rid, created, idx, ptext, None, None, None, req.model))
        async for idx, out in self._fan_in(jobs):
            n_out += len(out.token_ids)
            cached[idx // req.n] = out.num_cached_tokens
            logprobs = None
            text = out.text
            if req.logprobs is not None:
                lps: list[TokenLogprobs | None] = list(out.logprobs)
                if req.echo and out.prompt_logprobs is not None:
                    prompt = req.prompts()[idx // req.n]
                    ptext = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
                    text = ptext + text
                    lps = list(out.prompt_logprobs) + lps
                    offsets[idx] = 0
                logprobs = self._lp_completion(lps, offsets.get(idx, 0))
                offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in logprobs["tokens"])
            chunk = self._chunk(
                rid, created, idx, text, logprobs, out.finish_reason, out.stop_reason, req.model
            )
            if continuous:
                chunk["usage"] = self._usage(n_prompt, n_out, cached)
            yield sse(chunk)
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": req.model or self.model_name,
                    "choices": [],
                    "usage": self._usage(n_prompt, n_out, cached),
                }
            )
        yield SSE_DONE

    @staticmethod
    def _usage(n_prompt: int, n_out: int, cached: dict[int, int]) -> dict[str, Any]:
        return {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
        }

    def _chunk(self, rid, created, idx, text, logprobs, finish, stop_reason, model=None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model or self.model_name,  # the adapter's name under LoRA
            "choices": [
                {
                    "index": idx,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "stop_reason": stop_reason,
                }
            ],
        }

    # -- chat ---------------------------------------------------------------------
    def prepare_chat(
        self, req: ChatCompletionRequest
    ) -> tuple[list[int], list[Job], str]:
        """Render the chat template, tokenize, and build n jobs."""
        lora_id = self.check_model(req.model)
        self.check_fan_out(1, req.n)
        add_generation_prompt, continue_final_message, kwargs = req.template_kwargs()
        self.tool_mode(req)  # 400 before any work for a tool choice this replica cannot do
        template = template_for(self.tools, self.tokenizer.chat_template, bool(req.tools))
        if req.tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        try:
            messages = template_messages(req)
            prompt = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=template,
                **kwargs,
            )
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from e
        ids, keys = self._chat_prompt_with_keys(req, prompt)
        requested = req.max_completion_tokens or req.max_tokens
        max_tokens = self.default_max_tokens(requested, len(ids))
        top = (req.top_logprobs or 0) if req.logprobs else None
        guided = self.guided_of(req, forced_decoding(req, self.check_grammar))
        jobs = []
        for j in range(req.n):
            params = sampling_params(req, max_tokens, top, None, j, guided)
            self.check_engine(len(ids), params)
            jobs.append((j, ids, params, keys))
        # vLLM's chat echo: the last message is prepended when it is the assistant's own.
        last = ""
        if req.echo and messages and messages[-1]["role"] == "assistant":
            last = messages[-1]["content"]
        return ids, self._under_lora(jobs, lora_id), last

    def _chat_prompt_with_keys(
        self, req: ChatCompletionRequest, prompt: str
    ) -> tuple[list[int], RouteKeys]:
        """The rendered prompt's ids and the routing keys of the messages it was made of."""
        est = self.route_estimator
        if est is None:
            return self.tokenize_prompt(prompt, req.add_special_tokens), ()
        # The raw role and content, as a gateway reads them from the request body.
        routing, contents = chat_routing_text(
            [{"role": m.role, "content": m.content} for m in req.messages])
        if len(routing) < est.chunk_bytes:
            return self.tokenize_prompt(prompt, req.add_special_tokens), ()
        ids, ends = self.tokenizer.encode_with_ends(prompt, req.add_special_tokens)
        return ids, text_route_keys(est, routing, locate(contents, prompt), ends)

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """Whole (non-streaming) chat completion response."""
        ids, jobs, echo_text = self.prepare_chat(req)
        choices = {idx: _Choice(idx, 0) for idx, *_ in jobs}
        cached = 0
        async for idx, out in self._fan_in(jobs):
            c = choices[idx]
            c.text += out.text
            c.token_ids += out.token_ids
            c.logprobs += out.logprobs
            cached = out.num_cached_tokens
            if out.finished:
                c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        n_out = sum(len(c.token_ids) for c in choices.values())
        mode = self.tool_mode(req)
        result = []
        for c in (choices[i] for i in sorted(choices)):
            message: dict[str, Any] = {"role": "assistant", "content": echo_text + c.text}
            finish = c.finish_reason
            if mode is not None:
                message, finish = ChoiceTools(mode).message(echo_text + c.text, finish)
            result.append({
                "index": c.index,
                "message": message,
                "logprobs": self._lp_chat(c.logprobs) if req.logprobs else None,
                "finish_reason": finish,
                "stop_reason": c.stop_reason,
            })
        return {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": now_s(),
            "model": req.model or self.model_name,
            "choices": result,
            "usage": self._usage(len(ids), n_out, {0: cached}),
        }

    async def chat_stream(
        self, req: ChatCompletionRequest, prepared: tuple[list[int], list, str]
    ) -> AsyncIterator[bytes]:
        """SSE frames of a streaming chat completion."""
        ids, jobs, echo_text = prepared
        rid, created = new_id("chatcmpl"), now_s()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        def chunk(idx: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
            choice = {"index": idx, "delta": delta, "logprobs": None, "finish_reason": None}
            choice.update(extra)
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model or self.model_name,
                "choices": [choice],
            }

        for idx, *_ in jobs:
            yield sse(chunk(idx, {"role": "assistant", "content": ""}))
            if echo_text:
                yield sse(chunk(idx, {"content": echo_text}))
        n_out, cached = 0, 0
        mode = self.tool_mode(req)
        tools = {idx: ChoiceTools(mode) for idx, *_ in jobs} if mode is not None else {}
        async for idx, out in self._fan_in(jobs):
            n_out += len(out.token_ids)
            cached = out.num_cached_tokens
            extra: dict[str, Any] = {}
            if req.logprobs:
                extra["logprobs"] = self._lp_chat(out.logprobs)
            finish = out.finish_reason
            if idx in tools:
                deltas = tools[idx].feed(out.text)
                if out.finished:
                    last, finish = tools[idx].finish(finish)
                    deltas += last
            else:
                deltas = [{"content": out.text}] if out.text else []
            if out.finished:
                extra["finish_reason"] = finish
                extra["stop_reason"] = out.stop_reason
            if not deltas and not out.finished and not req.logprobs:
                continue
            for delta in deltas[:-1]:  # all but the last alone; the last carries the extras
                yield sse(chunk(idx, delta))
            c = chunk(idx, deltas[-1] if deltas else {}, **extra)
            if continuous:
                c["usage"] = self._usage(len(ids), n_out, {0: cached})
            yield sse(c)
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": req.model or self.model_name,
                    "choices": [],
                    "usage": self._usage(len(ids), n_out, {0: cached}),
                }
            )
        yield SSE_DONE
