"""PEFT LoRA adapters with random (non-zero) weights on a Hugging Face base directory."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_model(base_dir: Path, adapter: Path | None = None):  # type: ignore[no-untyped-def]
    """The transformers base model, with ``adapter`` applied by peft when given."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return base if adapter is None else PeftModel.from_pretrained(base, adapter).eval()


def make_adapter(base_dir: Path, out: Path, seed: int, targets: tuple[str, ...] = ALL_TARGETS,
                 r: int = 8, alpha: int = 16, rslora: bool = False) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    ``init_lora_weights=False`` gives B random weights too, so the adapter changes the
    model's output (PEFT's default zero B would make every adapter the base model).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                     use_rslora=rslora)
    get_peft_model(base, cfg).save_pretrained(out)
    return out
