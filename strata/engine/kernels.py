"""Native CPU kernels, compiled once per machine on first use (torch's JIT extension cache).

Only what torch lacks: decode attention that reads the paged KV cache in place.
If the compiler is missing the engine falls back to gather + SDPA and says so.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger("strata.kernels")
_lock = threading.Lock()
_state: dict[str, bool] = {}


def load_paged_attention() -> bool:
    """Build/load the paged decode-attention op; True when torch.ops.strata has it."""
    with _lock:
        if "paged" in _state:
            return _state["paged"]
        try:
            from torch.utils.cpp_extension import load

            src = Path(__file__).with_name("csrc") / "paged_attention.cpp"
            load(
                name="strata_paged_attention",
                sources=[str(src)],
                extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                is_python_module=False,
                verbose=False,
            )
            ok = hasattr(torch.ops.strata, "paged_decode_attention")
        except Exception as e:  # noqa: BLE001 - reported, and the torch path still works
            log.warning("native paged attention unavailable (%s); using gather + SDPA", e)
            ok = False
        _state["paged"] = ok
        return ok
