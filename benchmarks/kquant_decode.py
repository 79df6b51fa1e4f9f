"""Batch-1 decode time of `--dtype int8` on GGUF block formats: the file's blocks vs fbgemm.

    python benchmarks/kquant_decode.py [--threads 2] [--rounds 30] [--output FILE]

For each weight format (Q4_1, Q4_K, Q4_K_M's mix, Q5_K, Q6_K, Q8_0) a random-weight Llama
of one shape (hidden 1024, feed-forward 2816, 8 layers, vocabulary 16384: about 100M
parameters; K-quants need rows in multiples of 256) is written as a GGUF by the tests'
writer, loaded as the engine loads it, and quantized twice: with the file's blocks
attached (what batch <= SMALL_MAX_TOKENS decode runs) and without (fbgemm int8 / fp16 for
every call, the peer). The time is one token through every layer and the LM head, with no
KV context, so it is the weight-reading part of a decode step; rounds of the two
alternate, and the median and the best are reported (the best is the steadier figure on
a machine that others share).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' GGUF writer

from strata.engine.gguf_loader import weight_blocks  # noqa: E402
from strata.engine.model import LlamaModel  # noqa: E402
from strata.engine.quant import FileBlocks, blocks_available, quantize_model  # noqa: E402
from strata.engine.weights import load_config, load_state_dict  # noqa: E402
from tests.engine.kquants import write_gguf  # noqa: E402

SHAPE = (1024, 2816, 8, 16, 4, 16384)
FORMATS = ("Q4_1", "Q4_K", "Q4_K_M", "Q5_K", "Q6_K", "Q8_0")


def _step_s(model: LlamaModel) -> float:
    ids, pos = torch.tensor([5]), torch.tensor([0])
    with torch.inference_mode():
        t = time.perf_counter()
        model.compute_logits(model(ids, pos))
        return time.perf_counter() - t


def measure(fmt: str, workdir: Path, rounds: int) -> dict[str, float | str]:
    path = write_gguf(workdir / f"{fmt}.gguf", fmt, shape=SHAPE)
    config = load_config(path)
    base = LlamaModel(config)
    base.load_weights(load_state_dict(path, config, dtype=torch.float32))
    base.eval()
    calib = list(range(3, 200))
    peer, ours = copy.deepcopy(base), base
    quantize_model(peer, calib)
    quantize_model(ours, calib, blocks=FileBlocks(functools.partial(weight_blocks, path, config)))
    for m in (peer, ours):
        for _ in range(3):
            _step_s(m)
    blocks_t, fbgemm_t = [], []
    for _ in range(rounds):
        blocks_t.append(_step_s(ours))
        fbgemm_t.append(_step_s(peer))
    path.unlink()
    return {"format": fmt, "blocks_ms": 1e3 * statistics.median(blocks_t), "blocks_best_ms": 1e3 * min(blocks_t),
            "fbgemm_ms": 1e3 * statistics.median(fbgemm_t), "fbgemm_best_ms": 1e3 * min(fbgemm_t)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--formats", nargs="*", default=list(FORMATS))
    parser.add_argument("--output", type=Path, default=None, help="write JSON here")
    args = parser.parse_args()
    if not blocks_available():
        raise SystemExit("the block kernels need AVX-512 VNNI; nothing to compare here")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(fmt, Path(tmp), args.rounds) for fmt in args.formats]
    table = Table(title=f"batch-1 step, {args.threads} threads, hidden {SHAPE[0]}, {SHAPE[2]} layers, "
                        f"vocabulary {SHAPE[5]} (median of {args.rounds})")
    for col in ("format", "file blocks ms (best)", "fbgemm int8 ms (best)", "fbgemm / blocks (best)"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["format"]), f"{r['blocks_ms']:.2f} ({r['blocks_best_ms']:.2f})",
                      f"{r['fbgemm_ms']:.2f} ({r['fbgemm_best_ms']:.2f})",
                      f"{float(r['fbgemm_ms']) / float(r['blocks_ms']):.2f}x "
                      f"({float(r['fbgemm_best_ms']) / float(r['blocks_best_ms']):.2f}x)")
    Console().print(table)
    if args.output:
        args.output.write_text(json.dumps({"threads": args.threads, "shape": SHAPE, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
