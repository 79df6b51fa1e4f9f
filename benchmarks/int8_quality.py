"""How much `--dtype int8` changes the bundled model's predictions, against its fp32 weights.

    python benchmarks/int8_quality.py [--tokens 512] [--text FILE]

Teacher-forced over a held-out text (default: docs/architecture.md, not the calibration
text), for each weight format: perplexity, mean KL(fp32 || variant) of the next-token
distributions, and top-1 agreement with fp32. Variants: fp32 (the reference, the
dequantized Q4_1 GGUF), plain W8A8 on every projection (fbgemm, per-tensor activations),
strata's int8 (SmoothQuant folded into the norms, fp16 down projection), and bf16 as
`--dtype auto` serves it on a bf16 CPU (bf16 GEMMs for batched rows, the file's blocks for
1-3 rows).
"""

from __future__ import annotations

import argparse
import copy
import functools
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from strata.engine.gguf_loader import weight_blocks
from strata.engine.model import LlamaModel
from strata.engine.quant import (
    CALIBRATION_TEXT,
    FileBlocks,
    Int8Linear,
    attach_hybrid_blocks,
    blocks_available,
    quantize_model,
)
from strata.engine.tokenizer import load_tokenizer
from strata.engine.weights import load_config, load_state_dict, resolve_model

REPO = Path(__file__).resolve().parents[1]


def plain_w8a8(model: LlamaModel) -> LlamaModel:
    """Every projection and the head as per-tensor-activation W8A8, no smoothing."""
    m = copy.deepcopy(model)
    for layer in m.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            setattr(parent, name, Int8Linear(getattr(parent, name)))
    m.lm_head = Int8Linear(m.lm_head)
    m.invalidate_plan()
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=REPO / "docs" / "architecture.md")
    p.add_argument("--tokens", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    path = resolve_model(None)
    config = load_config(path)
    tok = load_tokenizer(path)
    model = LlamaModel(config)
    model.load_weights(load_state_dict(path, config, dtype=torch.float32))
    model.eval()
    ids = torch.tensor(tok.encode(args.text.read_text())[: args.tokens])
    pos = torch.arange(len(ids))

    def logits(m: LlamaModel) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(m.compute_logits(m(ids, pos)).float(), dim=-1)

    ref = logits(model)
    strata_int8 = copy.deepcopy(model)
    quantize_model(strata_int8, tok.encode(CALIBRATION_TEXT))
    table = Table(title=f"{len(ids)} tokens of {args.text.name}")
    for col in ("weights", "perplexity", "KL vs fp32", "top-1 = fp32"):
        table.add_column(col)
    variants = [("fp32 (dequantized Q4_1)", model), ("plain W8A8", plain_w8a8(model)),
                ("strata int8, batched (fbgemm)", strata_int8)]
    if blocks_available():
        decode = copy.deepcopy(model)
        # Every call through the block kernels, as a single decoding sequence's steps run.
        blocks = FileBlocks(functools.partial(weight_blocks, path, config))
        quantize_model(decode, tok.encode(CALIBRATION_TEXT), blocks=blocks, small_max_tokens=1 << 30)
        variants.append(("strata int8, batch-1 decode (file's Q4_1/Q8_0 blocks)", decode))
    variants.append(("bf16, batched (auto on a bf16 CPU)", copy.deepcopy(model).to(torch.bfloat16)))
    if blocks_available():
        hybrid = copy.deepcopy(model).to(torch.bfloat16)
        attach_hybrid_blocks(hybrid, blocks, small_max_tokens=1 << 30)
        variants.append(("bf16 auto, batch-1 decode (file's blocks, no smoothing)", hybrid))
    rows = []
    for name, m in variants:
        lp = ref if m is model else logits(m)
        ppl = float((-lp[:-1].gather(1, ids[1:, None]).mean()).exp())
        kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
        top1 = float((lp.argmax(-1) == ref.argmax(-1)).float().mean())
        table.add_row(name, f"{ppl:.2f}", f"{kl:.4f}", f"{top1:.1%}")
        rows.append(f"| {name} | {ppl:.2f} | {kl:.4f} | {top1:.1%} |")
    Console().print(table)
    print("\n| weights | perplexity | KL vs fp32 | top-1 = fp32 |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
