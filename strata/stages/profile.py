"""Measure what each part of a model costs per step, for `plan.balanced_split`.

Times every decoder layer, the embedding and the LM head (with greedy sampling) on a
decode-like batch on this machine's device and threads. Loads the whole model once.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from strata.engine.model import LlamaModel
from strata.engine.weights import load_config, load_state_dict
from strata.stages.plan import LayerCosts


def _median_s(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


@torch.inference_mode()
def measure_layer_costs(
    path: Path, batch_tokens: int = 8, reps: int = 5, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LayerCosts:
    """Median seconds of each layer, the embedding and the head on `batch_tokens` tokens."""
    config = load_config(path)
    model = LlamaModel(config)
    model.load_weights(load_state_dict(path, config, dtype=torch.float32))
    model = model.to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch_tokens,), device=device)
    positions = torch.arange(batch_tokens, device=device)
    x = model.embed_tokens(ids) if model.embed_tokens is not None else None
    assert x is not None
    cos, sin = model.rope(positions, x.dtype)
    layer_s = tuple(
        _median_s(lambda layer=layer: layer(x, cos, sin, None, None), reps) for layer in model.layers
    )
    embed_s = _median_s(lambda: model.embed_tokens(ids), reps)  # type: ignore[misc]
    normed = torch.nn.functional.rms_norm(x, (x.shape[-1],), model.norm, config.rms_norm_eps)
    head_s = _median_s(lambda: model.compute_logits(normed).argmax(dim=-1), reps)
    return LayerCosts(layer_s, embed_s, head_s)
