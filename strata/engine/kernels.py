"""Native CPU kernels, compiled once per machine on first use (torch's JIT extension cache).

Only what torch lacks: decode attention that reads the paged KV cache in place, and
fused element-wise ops that replace many tiny torch calls per layer.
If the compiler is missing the engine falls back to gather + SDPA and says so.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger("strata.kernels")
_lock = threading.Lock()
_state: dict[str, bool] = {}


def load_paged_attention() -> bool:
    """Build/load the native ops (paged attention, fused rope/norm/activation); True if loaded."""
    with _lock:
        if "paged" in _state:
            return _state["paged"]
        try:
            from torch.utils.cpp_extension import load

            csrc = Path(__file__).with_name("csrc")
            # torch's JIT cache hashes the sources and flags, not included headers:
            # the header's hash goes into the flags so editing it rebuilds.
            header = hashlib.sha256((csrc / "vec.h").read_bytes()).hexdigest()[:16]
            load(
                name="strata_cpu_kernels",
                sources=[str(csrc / name) for name in ("paged_attention.cpp", "fused_ops.cpp", "q4_linear.cpp")],
                extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DSTRATA_VEC_H={header}"],
                extra_include_paths=[str(csrc)],
                is_python_module=False,
                verbose=False,
            )
            ok = all(
                hasattr(torch.ops.strata, op)
                for op in ("paged_decode_attention", "rope_and_cache_", "add_rms_norm_", "silu_and_mul",
                           "q4_linear", "q8_linear", "argmax_rows")
            )
        except Exception as e:  # noqa: BLE001 - reported, and the torch path still works
            log.warning("native paged attention unavailable (%s); using gather + SDPA", e)
            ok = False
        _state["paged"] = ok
        return ok


def raw_op(op: object) -> object:
    """An op's C++ entry point, skipping torch's Python dispatch checks (a fixed cost per
    call, which adds up over the many small ops of each layer).

    Takes an op packet (``torch.ops.strata.silu_and_mul``) or overload (``.default``).
    Our hot-path ops carry no tensor subclasses or fake script objects, so those checks
    never apply; without the private ``_op`` attribute the overload itself is returned.
    """
    overload = getattr(op, "default", op)
    return getattr(overload, "_op", overload)
