"""Write a GGUF model as a standard Hugging Face directory (weights, config, tokenizer).

Its own module because it needs both the weights and the tokenizer, while the tokenizer
module only needs the cache location: keeping it in ``weights`` made the two import each
other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from strata.engine.tokenizer import load_tokenizer
from strata.engine.weights import load_config, load_state_dict


def export_hf_dir(gguf_path: Path, out_dir: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write a GGUF model as a standard HF directory that vLLM and transformers can load."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"export dtype {dtype} is not supported; use float32, bfloat16 or float16.")
    config = load_config(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = load_state_dict(gguf_path, config, dtype=dtype)
    if config.tie_word_embeddings:
        del weights["lm_head.weight"]  # HF checkpoints store a tied head once
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen: dict[str, object] = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    load_tokenizer(gguf_path).save_pretrained(out_dir)
    return out_dir
