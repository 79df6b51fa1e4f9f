"""Session-wide model fixtures: the real bundled GGUF and tiny random-weight Llama directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strata.engine.hf_export import export_hf_dir
from strata.engine.tokenizer import load_tokenizer
from strata.engine.weights import bundled_model_path


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct Q4_1 file (downloaded and verified once per cache)."""
    return bundled_model_path()


def _tiny_llama_dir(out: Path, bundled: Path, *, tied: bool) -> Path:
    """A 2-layer Llama with random weights that shares the bundled model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(bundled)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_ids[0],
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).eval()
    # Default init leaves the RMSNorm weights at exactly 1; perturb them so that a loader
    # that mixed up the norms would be caught.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, bundled_gguf: Path) -> Path:
    """Tiny tied-embedding Llama HF directory (2 layers, hidden 64, 4/2 heads, real vocab)."""
    return _tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), bundled_gguf, tied=True)


@pytest.fixture(scope="session")
def tiny_hf_dir_untied(tmp_path_factory: pytest.TempPathFactory, bundled_gguf: Path) -> Path:
    """Like tiny_hf_dir, but with a separate lm_head matrix."""
    return _tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama-untied"), bundled_gguf, tied=False)


@pytest.fixture(scope="session")
def bundled_hf_dir(tmp_path_factory: pytest.TempPathFactory, bundled_gguf: Path) -> Path:
    """The bundled model exported once as an fp32 Hugging Face directory."""
    return export_hf_dir(bundled_gguf, tmp_path_factory.mktemp("smollm2-hf"))
