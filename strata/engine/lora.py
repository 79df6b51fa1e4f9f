"""LoRA adapters over one base model: PEFT loading, resident slots, the batched delta.

An engine with LoRA enabled holds up to ``max_loras`` adapters at once, each in a slot of
stacked, zero-padded A/B tensors per projection and layer (as Punica and S-LoRA do). A
request names an adapter by its ``model``; its sequence carries the adapter's id, which
also salts its prefix-cache hashes (`strata.engine.kv_cache`), so the same prompt under
another adapter never shares KV.

strata fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``: an adapter's
per-module A matrices sit side by side in the fused projection's A (rank ``R`` each), and
its B matrices block-diagonally in the fused B, each over its module's output columns, so
one shrink and one expand serve the fused projection exactly. The scaling (``alpha / r``,
or ``alpha / sqrt(r)`` with rsLoRA) is folded into B at load.

In one step the rows of all adapters (and base rows) share the base GEMM; the delta is
added per adapter group: the step's rows are gathered into a padded ``[k, G, in]`` block
(k: the contiguous slot range spanning the step's adapters, G: the largest group), one
``bmm`` shrinks by the slots' A, one expands by their B, and ``index_add_`` adds the
result to the projection's output rows. Base-only steps pay nothing.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from strata.engine.model import AttentionMetadata, padded_rows
from strata.engine.model_config import LlamaConfig
from strata.engine.scheduler import ScheduledSeq

if TYPE_CHECKING:
    from strata.engine.options import EngineOptions
    from strata.engine.runner import ModelRunner

# PEFT's module name -> (strata's fused projection, index of the part inside it).
_TARGETS = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
PROJECTIONS = ("qkv", "o", "gate_up", "down")
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class LoraError(ValueError):
    """An adapter request that cannot be honoured as given (HTTP ``status``)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora-modules`` entry: the name requests use, and the PEFT directory."""

    name: str
    path: Path


def parse_lora_modules(items: Sequence[str]) -> list[LoraSpec]:
    """``name=path`` entries (each flag value may hold several, space-separated), or vLLM's
    JSON form ``{"name": ..., "path": ...}``."""
    specs: list[LoraSpec] = []
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                data = json.loads(item)
                specs.append(LoraSpec(str(data["name"]), Path(data["path"])))
            except (ValueError, KeyError, TypeError) as e:
                raise LoraError(f"--lora-modules {item!r}: JSON needs 'name' and 'path' ({e})") from None
            continue
        for part in item.split():
            name, sep, path = part.partition("=")
            if not sep or not name or not path:
                raise LoraError(f"--lora-modules {part!r}: write name=path")
            specs.append(LoraSpec(name, Path(path)))
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise LoraError(f"--lora-modules names {sorted(dup)} more than once")
    return specs


def _shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each PEFT target module."""
    h, hd = config.hidden_size, config.head_size
    q, kv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


@dataclass(frozen=True)
class LoraWeights:
    """An adapter read from disk and checked against the base model, not yet in a slot."""

    name: str
    path: Path
    rank: int
    scaling: float
    # (layer, PEFT module) -> (A [r, in], B [out, r]), fp32
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def read_adapter(name: str, path: Path | str, config: LlamaConfig, max_rank: int) -> LoraWeights:
    """Read a PEFT LoRA directory; LoraError (400) naming what is wrong and the fix."""
    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise LoraError(f"LoRA adapter {name!r}: {path} is not a directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except OSError as e:
        raise LoraError(f"LoRA adapter {name!r}: cannot read {CONFIG_FILE} in {path} ({e.strerror})") from None
    except ValueError as e:
        raise LoraError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"LoRA adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save (full modules)"),
                     ("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern"),
                     ("fan_in_fan_out", "fan_in_fan_out")):
        if cfg.get(key):
            raise LoraError(f"LoRA adapter {name!r}: {why} is not supported; train a plain LoRA")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"LoRA adapter {name!r}: bias {cfg['bias']!r} is not supported; only 'none'")
    try:
        rank = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", rank))
    except (KeyError, TypeError, ValueError):
        raise LoraError(f"LoRA adapter {name!r}: {CONFIG_FILE} needs an integer 'r'") from None
    if not 0 < rank <= max_rank:
        raise LoraError(f"LoRA adapter {name!r}: rank {rank} is outside 1..--max-lora-rank ({max_rank}); "
                        "start the engine with a larger --max-lora-rank")
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    if not w_file.is_file():
        hint = " (a pickled adapter_model.bin is not loaded; save with safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise LoraError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} missing in {path}{hint}")
    try:
        raw = load_file(str(w_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"LoRA adapter {name!r}: cannot read {WEIGHTS_FILE} ({e})") from None
    shapes = _shapes(config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in _TARGETS:
            raise LoraError(f"LoRA adapter {name!r}: tensor {key!r} targets a module strata cannot "
                            f"adapt; target only {', '.join(_TARGETS)}")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= config.num_hidden_layers:
            raise LoraError(f"LoRA adapter {name!r}: {key!r} names layer {layer}, but the base model "
                            f"has {config.num_hidden_layers}")
        fan_in, fan_out = shapes[module]
        want = (rank, fan_in) if ab == "A" else (fan_out, rank)
        if tuple(t.shape) != want:
            raise LoraError(f"LoRA adapter {name!r}: {key!r} has shape {tuple(t.shape)}, the base model "
                            f"needs {want}; was it trained on another base model?")
        halves.setdefault((layer, module), {})[ab] = t.float()
    tensors = {}
    for k, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise LoraError(f"LoRA adapter {name!r}: layer {k[0]} {k[1]} has lora_A or lora_B only")
        tensors[k] = (pair["A"], pair["B"])
    if not tensors:
        raise LoraError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    return LoraWeights(name, path, rank, scaling, tensors)


@dataclass
class LoadedLora:
    """An adapter in a slot: its id (unique for the process's life), slot, and users."""

    name: str
    path: Path
    lora_id: int
    slot: int
    rank: int
    refs: int = 0  # sequences added to the engine and not yet finished or aborted


class LoraManager:
    """The resident adapters of one engine: slots of stacked A/B per projection and layer.

    Thread-safe: the HTTP side loads and unloads, the engine thread adds and finishes
    sequences. A slot is written only while free (no sequence names its adapter), so a
    forward running meanwhile never reads a half-written adapter of its own.
    """

    def __init__(self, config: LlamaConfig, num_layers: int, layer_start: int, max_loras: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        if max_loras < 1 or max_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be >= 1")
        self.config = config
        self.layer_start, self.num_layers = layer_start, num_layers
        self.max_loras, self.max_rank = max_loras, max_rank
        shapes = _shapes(config)
        # Per fused projection: in_features, and each part's (module, first out column, width).
        self.parts: dict[str, list[tuple[str, int, int]]] = {p: [] for p in PROJECTIONS}
        self.fan_in: dict[str, int] = {}
        for module, (proj, _) in _TARGETS.items():
            fan_in, fan_out = shapes[module]
            parts = self.parts[proj]
            col = sum(w for _, _, w in parts)
            parts.append((module, col, fan_out))
            self.fan_in[proj] = fan_in
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for proj, parts in self.parts.items():
            r = len(parts) * max_rank
            out = sum(w for _, _, w in parts)
            self.a[proj] = torch.zeros(num_layers, max_loras, self.fan_in[proj], r, dtype=dtype, device=device)
            self.b[proj] = torch.zeros(num_layers, max_loras, r, out, dtype=dtype, device=device)
        self.lock = threading.Lock()
        self.by_name: dict[str, LoadedLora] = {}
        self.by_id: dict[int, LoadedLora] = {}
        self._next_id = 1

    @property
    def bytes(self) -> int:
        """Memory the slots hold."""
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    # -- loading ----------------------------------------------------------------
    def load(self, weights: LoraWeights) -> LoadedLora:
        """Put an adapter in a free slot; LoraError if its name is taken or no slot is free."""
        with self.lock:
            if weights.name in self.by_name:
                raise LoraError(f"The lora adapter '{weights.name}' has already been loaded.")
            used = {lo.slot for lo in self.by_name.values()}
            free = [s for s in range(self.max_loras) if s not in used]
            if not free:
                raise LoraError(f"all {self.max_loras} LoRA slots are taken (--max-loras); unload an "
                                "adapter first or start the engine with a larger --max-loras")
            slot = free[0]
            lora = LoadedLora(weights.name, weights.path, self._next_id, slot, weights.rank)
            self._next_id += 1
        # The slot is free and unnamed: no sequence reads it while it is written.
        self._fill(slot, weights)
        with self.lock:
            self.by_name[lora.name] = lora
            self.by_id[lora.lora_id] = lora
        return lora

    def _fill(self, slot: int, weights: LoraWeights) -> None:
        rank, rmax = weights.rank, self.max_rank
        with torch.no_grad():
            for proj in PROJECTIONS:
                self.a[proj][:, slot].zero_()
                self.b[proj][:, slot].zero_()
            for (layer, module), (a, b) in weights.tensors.items():
                i = layer - self.layer_start
                if not 0 <= i < self.num_layers:
                    continue  # a layer this model part does not hold
                proj, part = _TARGETS[module]
                _, col, width = self.parts[proj][part]
                r0 = part * rmax
                self.a[proj][i, slot, :, r0:r0 + rank].copy_(a.t())
                self.b[proj][i, slot, r0:r0 + rank, col:col + width].copy_(b.t() * weights.scaling)

    def unload(self, name: str) -> None:
        """Free an adapter's slot; 404 when unknown, 409 while sequences still use it."""
        with self.lock:
            lora = self.by_name.get(name)
            if lora is None:
                raise LoraError(f"The lora adapter '{name}' cannot be found.", 404)
            if lora.refs:
                raise LoraError(f"The lora adapter '{name}' is in use by {lora.refs} request(s); "
                                "unload it once they finish", 409)
            del self.by_name[name]
            del self.by_id[lora.lora_id]

    def names(self) -> list[str]:
        """Loaded adapters' names, in load order."""
        with self.lock:
            return sorted(self.by_name, key=lambda n: self.by_name[n].lora_id)

    def loaded(self) -> list[LoadedLora]:
        """The loaded adapters, in load order."""
        with self.lock:
            return sorted(self.by_name.values(), key=lambda lo: lo.lora_id)

    def resolve(self, name: str) -> int | None:
        """The id of the adapter called ``name`` now, or None."""
        lora = self.by_name.get(name)
        return None if lora is None else lora.lora_id

    # -- sequences ----------------------------------------------------------------
    def acquire(self, lora_id: int) -> None:
        """A sequence of adapter ``lora_id`` enters the engine; LoraError 404 if it is gone."""
        with self.lock:
            lora = self.by_id.get(lora_id)
            if lora is None:
                raise LoraError(f"the LoRA adapter (id {lora_id}) was unloaded before the request "
                                "started", 404)
            lora.refs += 1

    def release(self, lora_id: int) -> None:
        """A sequence of adapter ``lora_id`` left the engine (finished or aborted)."""
        with self.lock:
            lora = self.by_id.get(lora_id)
            if lora is not None and lora.refs > 0:
                lora.refs -= 1

    # -- the step ------------------------------------------------------------------
    def for_step(self, entries: Sequence[ScheduledSeq], meta: AttentionMetadata,
                 num_rows: int) -> LoraBatch | None:
        """The adapter groups of one step's flattened batch (None: no row has an adapter)."""
        return self.batch(_step_rows(entries, meta), num_rows)

    def batch(self, row_ids: Sequence[tuple[int, int, int]], num_rows: int) -> LoraBatch | None:
        """The step's grouping from (first row, row count, lora id) per scheduled sequence.

        None when no row has an adapter: the step runs the base model alone.
        """
        slot_of = {}
        starts, counts, slots = [], [], []
        for start, count, lora_id in row_ids:
            if not lora_id:
                continue
            slot = slot_of.get(lora_id)
            if slot is None:
                lora = self.by_id.get(lora_id)
                if lora is None:  # unloaded under a running sequence cannot happen: refs hold it
                    raise RuntimeError(f"LoRA id {lora_id} is not loaded")
                slot = slot_of[lora_id] = lora.slot
            starts.append(start)
            counts.append(count)
            slots.append(slot)
        if not slots:
            return None
        lo, hi = min(slots), max(slots) + 1
        counts_t = torch.tensor(counts)
        # Rows of each sequence, and their slot relative to lo; then sorted by slot.
        row_slot = torch.repeat_interleave(torch.tensor(slots) - lo, counts_t)
        seq_start = torch.repeat_interleave(torch.tensor(starts), counts_t)
        first = torch.cumsum(counts_t, 0) - counts_t
        rows = seq_start + torch.arange(len(row_slot)) - torch.repeat_interleave(first, counts_t)
        order = torch.argsort(row_slot, stable=True)
        rows, row_slot = rows[order], row_slot[order]
        k = hi - lo
        per_slot = torch.bincount(row_slot, minlength=k)
        g = padded_rows(int(per_slot.max()))
        pos = torch.arange(len(rows)) - (torch.cumsum(per_slot, 0) - per_slot)[row_slot]
        flat = row_slot * g + pos
        gidx = torch.zeros(k * g, dtype=torch.long)
        gidx[flat] = rows
        dtype, device = self.a["qkv"].dtype, self.a["qkv"].device
        assert int(rows.max()) < num_rows
        if k * g == len(rows):  # no pads: nothing to mask; in batch order: nothing to gather
            identity = k * g == num_rows and bool((gidx == torch.arange(num_rows)).all())
            return LoraBatch(self.a, self.b, lo, hi, g, None if identity else gidx.to(device), None)
        mask = torch.zeros(k * g, dtype=dtype)
        mask[flat] = 1
        return LoraBatch(self.a, self.b, lo, hi, g, gidx.to(device), mask.view(k, g, 1).to(device))


@dataclass
class LoraBatch:
    """One step's adapter groups: which rows, padded per slot, and the slot range."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    lo: int
    hi: int
    group: int  # padded rows per slot
    # [k * group] row of each place (pads: row 0, masked out); None: the batch's own rows,
    # in order (one adapter for every row, no pads), so nothing is gathered or scattered.
    gidx: torch.Tensor | None
    mask: torch.Tensor | None  # [k, group, 1] 1 for a real row, 0 for a pad; None: no pads

    def add(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y += x @ A @ B`` of each row's adapter, in place, for one projection of one layer."""
        k = self.hi - self.lo
        a = self.a[proj][layer, self.lo:self.hi]
        xg = x if self.gidx is None else x.index_select(0, self.gidx)
        xa = torch.bmm(xg.view(k, self.group, x.shape[-1]).to(a.dtype), a)
        if self.mask is not None:
            xa.mul_(self.mask)
        d = torch.bmm(xa, self.b[proj][layer, self.lo:self.hi]).view(k * self.group, -1).to(y.dtype)
        if self.gidx is None:
            y.add_(d)
        else:
            y.index_add_(0, self.gidx, d)


def _step_rows(entries: Sequence[ScheduledSeq], meta: AttentionMetadata) -> list[tuple[int, int, int]]:
    """(first row, rows, lora id) of each scheduled sequence in the flattened batch."""
    d = meta.num_decodes
    out = [(i, 1, e.seq.params.lora_id) for i, e in enumerate(entries[:d])]
    out += [(span.start, span.length, e.seq.params.lora_id)
            for e, span in zip(entries[d:], meta.prefills, strict=True)]
    return out


def attach_loras(runner: ModelRunner, options: EngineOptions) -> LoraManager | None:
    """Give the runner its LoRA slots and load ``--lora-modules`` (with ``--enable-lora``).

    LoRA runs on the native CPU path, over float weights: an int8 engine refuses it
    rather than add float deltas to outputs its own tests never checked.
    """
    if not options.enable_lora:
        if options.lora_modules:
            raise ValueError("--lora-modules needs --enable-lora")
        return None
    if options.dtype == "int8":
        raise ValueError("--enable-lora: LoRA adapters run over float weights; use --dtype "
                         "float32 or bfloat16, not int8")
    if not runner.native_attention:
        raise ValueError("--enable-lora: LoRA adapters need the native CPU path (device cpu with "
                         "strata's compiled kernels)")
    model = runner.model
    # The slots are float32 whatever the model's dtype: the delta's GEMMs are small (rank
    # rows or columns), and the CPU runs small float32 GEMMs several times faster than
    # bfloat16 ones; the activations are converted in and out, which costs less.
    manager = LoraManager(model.config, model.num_layers, model.layer_start, options.max_loras,
                          options.max_lora_rank, torch.float32, runner.device)
    specs = parse_lora_modules(options.lora_modules)
    if len(specs) > options.max_loras:
        raise ValueError(f"--lora-modules names {len(specs)} adapters but --max-loras is "
                         f"{options.max_loras}; raise --max-loras")
    for spec in specs:
        manager.load(read_adapter(spec.name, spec.path, model.config, options.max_lora_rank))
    runner.loras = manager
    return manager
