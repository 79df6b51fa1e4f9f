"""The engine loop: a background thread stepping EngineCore, bridged to asyncio.

The HTTP side never touches the scheduler: it submits requests and aborts
through a queue and reads per-request output queues, the narrow seam vLLM v1
keeps between its API server and engine core. The thread releases the GIL
inside torch ops, so the event loop keeps serving while the model runs.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import itertools
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from strata.engine.core import EngineCore, RequestError, SeqOutput, SequenceFailed
from strata.engine.dtype_choice import choose_dtype
from strata.engine.gguf_loader import weight_blocks
from strata.engine.kernels import load_paged_attention
from strata.engine.lora import attach_loras
from strata.engine.model import LlamaModel
from strata.engine.options import EngineConfig
from strata.engine.prefix_registry import RouteKeys
from strata.engine.quant import (
    CALIBRATION_TEXT,
    FileBlocks,
    attach_hybrid_blocks,
    int8_supported,
    quantize_model,
)
from strata.engine.runner import ModelRunner, kv_bytes_per_block
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import SchedulerConfig
from strata.engine.threads import governor_for
from strata.engine.tokenizer import load_tokenizer
from strata.engine.weights import load_config, load_state_dict, resolve_model

log = logging.getLogger("strata.engine")


def pick_device(device: str) -> torch.device:
    """cuda when asked or available under auto, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _matmul_tflops(dtype: torch.dtype, m: int = 64, k: int = 576, n: int = 1536) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    reps = 50
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e12


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Resolve "auto" by measurement: bf16 only where this CPU runs it faster (AMX)."""
    table = {
        "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
        "int8": torch.float32,  # int8 weights, fp32 activations and KV cache
    }
    if dtype != "auto":
        if dtype not in table:
            raise ValueError(
                f"dtype must be auto, float32, bfloat16, float16 or int8; got {dtype!r}"
            )
        return table[dtype]
    if device.type == "cuda":
        return torch.bfloat16
    fp32 = _matmul_tflops(torch.float32)
    bf16 = _matmul_tflops(torch.bfloat16)
    choice = torch.bfloat16 if bf16 > 1.25 * fp32 else torch.float32
    log.info("dtype auto: fp32 %.3f TFLOP/s, bf16 %.3f TFLOP/s -> %s", fp32, bf16, choice)
    return choice


def pick_kv_dtype(kv_cache_dtype: str, dtype: str, compute: torch.dtype, native: bool) -> torch.dtype:
    """The KV cache's storage dtype.

    auto: float16 under int8 weights on the native CPU path (decode attention at high
    concurrency is bound by reading the cache, and fp16 halves its bytes, as llama.cpp's
    default f16 cache does); otherwise the model's compute dtype, as in vLLM.
    """
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if kv_cache_dtype == "auto":
        return torch.float16 if dtype == "int8" and native else compute
    if kv_cache_dtype not in table:
        raise ValueError(
            f"kv_cache_dtype must be auto, float32, float16 or bfloat16; got {kv_cache_dtype!r}"
        )
    kv = table[kv_cache_dtype]
    if kv != compute and not (native and compute == torch.float32 and kv == torch.float16):
        raise ValueError(
            f"kv_cache_dtype {kv_cache_dtype} needs the model to run in that dtype, or float32 "
            "activations on the native CPU kernels with a float16 cache"
        )
    return kv


def default_model_name(path: Path) -> str:
    """The API's model id: the file or directory name without a quantization suffix."""
    stem = path.stem if path.is_file() else path.name
    return re.sub(r"[.-](Q\d\w*|IQ\d\w*|F16|F32|BF16)$", "", stem, flags=re.IGNORECASE)


def build_engine_core(cfg: EngineConfig) -> EngineCore:
    """Load the model and tokenizer and size the KV cache."""
    device = pick_device(cfg.device)
    governor = governor_for(cfg.threads, device.type)
    path = resolve_model(cfg.model, cache_dir=cfg.cache_dir)
    config = load_config(path)
    # LoRA runs over float weights only (strata.engine.lora).
    choice = choose_dtype(cfg.dtype, device, config, allow_int8=not cfg.enable_lora)
    dtype = choice.torch_dtype
    tokenizer = load_tokenizer(path, cache_dir=cfg.cache_dir)
    state = load_state_dict(path, config, dtype=torch.float32)
    model = LlamaModel(config)
    model.load_weights(state)
    del state
    model = model.to(device=device, dtype=dtype).eval()
    if choice.name == "int8":
        if device.type != "cpu" or not int8_supported():
            raise ValueError("dtype int8 needs a CPU with torch's x86 int8 backend (fbgemm)")
        blocks = None
        if config.extra.get("source_format") == "gguf":
            # Decode at batch 1 computes from the file's own quantized blocks.
            blocks = FileBlocks(functools.partial(weight_blocks, path, config))
        quantize_model(model, tokenizer.encode(CALIBRATION_TEXT), blocks=blocks)
    elif choice.file_blocks and device.type == "cpu" and config.extra.get("source_format") == "gguf":
        # auto: 1-3 row calls (batch-1 decode) on the file's own blocks, batches on the float GEMM.
        attach_hybrid_blocks(model, FileBlocks(functools.partial(weight_blocks, path, config)))
    native = device.type == "cpu" and load_paged_attention()
    kv_dtype = pick_kv_dtype(cfg.kv_cache_dtype, choice.name, dtype, native)
    per_block = kv_bytes_per_block(model, cfg.block_size, kv_dtype)
    num_blocks = cfg.kv_blocks(per_block)
    max_len = min(cfg.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    runner = ModelRunner(model, num_blocks, cfg.block_size, dtype, device, kv_dtype=kv_dtype)
    attach_loras(runner, cfg)  # LoRA slots and --lora-modules, with --enable-lora
    # The kernels of every row bucket now, not over the first minutes of traffic.
    runner.warm_up(max(cfg.max_num_batched_tokens, cfg.max_num_seqs))
    name = cfg.served_model_name or default_model_name(path)
    sched = SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, max_len)
    log.info(
        "engine: %s, %s on %s, %d threads, %d KV blocks of %d tokens (%.0f MiB, %s)",
        name, "int8" if choice.name == "int8" else dtype, device, torch.get_num_threads(), num_blocks,
        cfg.block_size,
        num_blocks * per_block / 2**20, kv_dtype,
    )
    core = EngineCore(runner, tokenizer, sched, name, cfg.prefix_caching)
    core.threads = governor
    return core


@functools.cache
def _malloc_trim() -> object | None:
    """glibc's malloc_trim, or None where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS; False where that is not possible.

    Each step allocates and frees prompt-length-sized buffers (prefill activations,
    logits, tokenizer work) from many threads; glibc keeps those freed pages in its
    arenas, so an engine's RSS creeps up over a long run although nothing stays alive.
    """
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)  # type: ignore[operator]
    return True


class AsyncEngine:
    """Runs EngineCore in a thread; `generate` streams one sequence's outputs."""

    # Seconds without work after which the loop returns freed heap pages to the OS (once
    # per idle spell: a trim walks the whole heap, so it is kept off the busy path).
    idle_trim_s = 1.0
    # Errors of a request itself when adding it (passed to its consumer as they are).
    _request_errors: tuple[type[Exception], ...] = (RequestError,)
    _loop_name = "engine loop"
    _log = log

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[tuple[int, list[int], SamplingParams, float, RouteKeys]] = []
        self._aborts: list[int] = []
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None
        self.release_memory = release_free_memory  # replaceable, for tests
        self._trimmed = True  # freed heap pages handed back since the loop last stepped

    def start(self) -> None:
        """Run the engine loop in a background thread (tests, embedded use)."""
        self._thread = threading.Thread(target=self.run, name="strata-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the engine loop after the current step."""
        self._stopped = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def run(self) -> None:
        """The engine loop, in the calling thread, until `stop` or a fatal error.

        `strata engine` runs it in the process's main thread, the thread that built the
        model, and serves HTTP from another: libgomp keeps one worker pool per thread that
        opens parallel regions, and with more pool threads than cores it stops spinning
        between regions and sleeps instead (a futex wake per op, which made every decode step
        markedly slower when the loop ran in a second thread; docs/results.md).
        """
        self._run()

    def _run(self) -> None:
        """Take the new requests and aborts, apply them, `_advance`; until stopped or dead."""
        try:
            while not self._stopped:
                with self._lock:
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                    self._wake.clear()
                errors = self._apply_requests(adds, aborts)
                self._advance(bool(adds or aborts), errors)
        except BaseException as e:  # noqa: BLE001 - surfaced to every waiter and /health
            self._log.exception("%s died", self._loop_name)
            self.dead = e
            self._deliver([(sid, e) for sid in list(self._queues)])

    def _apply_requests(self, adds: list[tuple[int, list[int], SamplingParams, float, RouteKeys]],
                        aborts: list[int]) -> list[tuple[int, BaseException]]:
        """Abort, then add, in the engine thread; returns the sequences that could not be added.

        An error in `_request_errors` is the request's own (its consumer gets it as is); any
        other fails that request alone, and the loop goes on.
        """
        core = self.core
        errors: list[tuple[int, BaseException]] = []
        for sid in aborts:
            core.abort(sid)
        for sid, ids, params, now, keys in adds:
            if sid in self._queues:
                try:
                    core.add(sid, ids, params, now, keys)
                except self._request_errors as e:
                    errors.append((sid, e))
                except Exception as e:  # noqa: BLE001 - fails this request alone
                    self._log.exception("adding sequence %d failed; the loop goes on", sid)
                    errors.append((sid, SequenceFailed(f"could not add the sequence: {e!r}")))
        return errors

    def _advance(self, received: bool, errors: list[tuple[int, BaseException]]) -> None:
        """One turn of the loop once new requests are applied (``received``: there were
        some; ``errors``: the ones that failed): deliver, then step, or wait for work.

        The hook a pipelined engine overrides (`strata.stages.head_engine.HeadEngine`).
        """
        if errors:
            self._deliver(list(errors))
        core = self.core
        if not core.has_work:
            woke = self._wake.wait(timeout=self.idle_trim_s)
            if not woke and not self._trimmed and not self._stopped:
                self.release_memory()
                self._trimmed = True
            return
        self._trimmed = False
        outputs = core.step()
        failures = core.take_failures()
        if outputs or failures:
            self._deliver([(o.seq_id, o) for o in outputs] + failures)

    def _deliver(self, items: list[tuple[int, SeqOutput | BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for sid, item in items:
            entry = self._queues.get(sid)
            if entry is None:
                continue
            loop, q = entry
            by_loop.setdefault(loop, []).append((q, item))
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(_put_all, pairs)

    @property
    def active(self) -> int:
        """Sequences whose consumer is still reading them."""
        return len(self._queues)

    def abort_all(self, error: BaseException) -> int:
        """End every sequence now: its consumer gets ``error``, its KV blocks are freed.

        Thread-safe; a graceful stop calls it when the drain timeout has passed.
        """
        sids = list(self._queues)
        with self._lock:
            self._aborts.extend(sids)
            self._wake.set()
        self._deliver([(sid, error) for sid in sids])
        return len(sids)

    def check(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """Validate a request up front so errors become 400s before streaming starts."""
        self.core.check_request(num_prompt_tokens, params)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       route_keys: RouteKeys = ()) -> AsyncIterator[SeqOutput]:
        """Yield output deltas until the sequence finishes; aborts it if the caller stops.

        ``route_keys`` name the prompt's prefix for the gateways (strata.engine.route_keys).
        """
        if self.dead is not None:
            raise RuntimeError("the engine loop has died; restart this replica")
        sid = next(self._ids)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[sid] = (asyncio.get_running_loop(), q)
        with self._lock:
            self._adds.append((sid, prompt_ids, params, time.monotonic(), route_keys))
            self._wake.set()
        finished = False
        outputs = 0
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                outputs += 1
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(sid, None)
            if not finished:
                # As vLLM does: every abort is logged, with how far the sequence got.
                log.info("aborted sequence %d after %d outputs: its consumer stopped (client gone)", sid, outputs)
                with self._lock:
                    self._aborts.append(sid)
                    self._wake.set()


def _put_all(pairs: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in pairs:
        q.put_nowait(item)
