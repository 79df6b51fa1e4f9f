"""LoRA adapters in the engine: PEFT's own outputs, mixed batches, prefix cache, slots, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from strata.engine.engine import EngineConfig, build_engine_core
from strata.engine.lora import (
    LoraError,
    LoraManager,
    attach_loras,
    parse_lora_modules,
    read_adapter,
)
from strata.engine.options import EngineOptions
from strata.engine.sampling import SamplingParams
from tests.engine.lora_adapters import make_adapter, peft_model

PROMPTS = ("The capital of France is a city where", "def fibonacci(n):\n    ")
NEW = 8


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, bundled_hf_dir: Path) -> dict[str, Path]:
    """Two adapters: every projection at rank 8, and q/v/down at rank 4 with rsLoRA."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "one": make_adapter(bundled_hf_dir, root / "one", seed=1),
        "two": make_adapter(bundled_hf_dir, root / "two", seed=2,
                            targets=("q_proj", "v_proj", "down_proj"), r=4, rslora=True),
    }


def _core(hf_dir: Path, adapters: dict[str, Path], dtype: str = "float32"):  # type: ignore[no-untyped-def]
    return build_engine_core(EngineConfig(
        model=str(hf_dir), dtype=dtype, device="cpu", threads=1, num_kv_blocks=64, block_size=16,
        max_model_len=512, max_num_seqs=16, enable_lora=True, max_loras=3, max_lora_rank=8,
        lora_modules=[f"{n}={p}" for n, p in adapters.items()]))


@pytest.fixture(scope="module")
def core(bundled_hf_dir: Path, adapters: dict[str, Path]):  # type: ignore[no-untyped-def]
    return _core(bundled_hf_dir, adapters)


def _run(core, jobs: list[tuple[list[int], int]], **params) -> dict[int, list]:  # type: ignore[no-untyped-def]
    """Add every job at once (one batch), run to the end; outputs per job index."""
    outs: dict[int, list] = {i: [] for i in range(len(jobs))}
    base = 1000 + max(core.states, default=0)
    for i, (ids, lora_id) in enumerate(jobs):
        core.add(base + i, ids, SamplingParams(max_tokens=NEW, temperature=0.0, lora_id=lora_id,
                                               **params), 0.0)
    while core.has_work:
        for o in core.step():
            outs[o.seq_id - base].append(o)
    return outs


def _reference(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:  # type: ignore[no-untyped-def]
    """peft's greedy continuation and its log-probabilities of the first new token."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
        logits = model(torch.tensor([ids])).logits[0, -1]
    return out[0, len(ids):].tolist(), torch.log_softmax(logits.float(), -1)


def test_adapters_and_base_in_one_batch_match_peft(core, bundled_hf_dir: Path,  # type: ignore[no-untyped-def]
                                                   adapters: dict[str, Path]) -> None:
    loras = core.runner.loras
    names = {"base": 0, "one": loras.resolve("one"), "two": loras.resolve("two")}
    prompts = [core.tokenizer.encode(p) for p in PROMPTS]
    # Interleaved: adapters' rows are not contiguous in the batch, and groups have 2 rows.
    jobs = [(ids, lid) for ids in prompts for lid in names.values()]
    outs = _run(core, jobs, logprobs=5)
    models = {lid: peft_model(bundled_hf_dir, adapters.get(n)) for n, lid in names.items()}
    for j, (ids, lid) in enumerate(jobs):
        name = next(n for n, v in names.items() if v == lid)
        want, lp = _reference(models[lid], ids)
        got = [t for o in outs[j] for t in o.token_ids]
        assert got == want, (name, j)
        first = outs[j][0].logprobs[0]
        for tok, value in first.top:
            assert abs(value - float(lp[tok])) < 2e-3, (name, tok)
    assert loras.loaded()[0].refs == 0  # every finished sequence let go of its adapter


def test_bfloat16_engine_follows_peft(bundled_hf_dir: Path, adapters: dict[str, Path]) -> None:
    core = _core(bundled_hf_dir, adapters, "bfloat16")
    ids = core.tokenizer.encode(PROMPTS[0])
    lid = core.runner.loras.resolve("one")
    outs = _run(core, [(ids, lid), (ids, 0)], logprobs=3)
    want, lp = _reference(peft_model(bundled_hf_dir, adapters["one"]), ids)
    got = [t for o in outs[0] for t in o.token_ids]
    assert got[:3] == want[:3]
    for tok, value in outs[0][0].logprobs[0].top:
        assert abs(value - float(lp[tok])) < 0.15


def test_prefix_cache_is_keyed_on_the_adapter(core) -> None:  # type: ignore[no-untyped-def]
    ids = core.tokenizer.encode("A shared system prompt that is long enough to fill blocks. " * 6)
    one = core.runner.loras.resolve("one")
    cached = lambda lid: _run(core, [(ids, lid)])[0][0].num_cached_tokens  # noqa: E731
    cached(0)
    assert cached(one) == 0  # the base model's KV is not the adapter's
    assert cached(one) >= 64  # the adapter's own is shared
    assert cached(0) >= 64


def test_unload_waits_for_users_and_a_reload_gets_a_new_id(core, adapters: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    loras = core.runner.loras
    lid = loras.resolve("two")
    core.add(1, core.tokenizer.encode("hello"), SamplingParams(max_tokens=4, lora_id=lid), 0.0)
    with pytest.raises(LoraError) as busy:
        loras.unload("two")
    assert busy.value.status == 409
    core.abort(1)
    loras.unload("two")
    assert loras.resolve("two") is None
    with pytest.raises(ValueError, match="unloaded"):
        core.add(2, [1, 2, 3], SamplingParams(max_tokens=2, lora_id=lid), 0.0)
    assert not core.states
    loras.load(read_adapter("two", adapters["two"], core.runner.model.config, 8))
    assert loras.resolve("two") not in (None, lid)
    with pytest.raises(LoraError, match="unload"):  # three slots: one, two, and this one
        loras.load(read_adapter("three", adapters["one"], core.runner.model.config, 8))
        loras.load(read_adapter("four", adapters["one"], core.runner.model.config, 8))
    loras.unload("three")


def test_bad_adapters_are_refused_by_name(tmp_path: Path, core, adapters: dict[str, Path],  # type: ignore[no-untyped-def]
                                          tiny_hf_dir: Path) -> None:
    config = core.runner.model.config

    def refused(path: Path, match: str, max_rank: int = 8) -> None:
        with pytest.raises(LoraError, match=match) as e:
            read_adapter("x", path, config, max_rank)
        assert e.value.status == 400

    refused(tmp_path / "missing", "not a directory")
    refused(adapters["one"], "max-lora-rank", max_rank=4)
    bad = shutil.copytree(adapters["two"], tmp_path / "dora")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    refused(bad, "DoRA")
    (bad / "adapter_config.json").write_text("{not json")
    refused(bad, "not valid JSON")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    refused(bad, "safetensors")
    other = make_adapter(tiny_hf_dir, tmp_path / "tiny", seed=3)  # another base model's shapes
    refused(other, "another base model")


def test_options_are_checked_before_anything_loads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --enable-lora"):
        attach_loras(None, EngineOptions(lora_modules=["a=/x"]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="int8"):
        attach_loras(None, EngineOptions(enable_lora=True, dtype="int8"))  # type: ignore[arg-type]
    assert [s.name for s in parse_lora_modules(["a=/x b=/y", '{"name": "c", "path": "/z"}'])] == ["a", "b", "c"]
    for bad in (["a"], ["a=/x a=/y"], ['{"name": "c"}']):
        with pytest.raises(LoraError):
            parse_lora_modules(bad)


def test_grouped_delta_equals_the_per_row_sum(bundled_hf_dir: Path) -> None:
    """The gathered bmm of a batch equals each row's own x @ A @ B (base rows untouched)."""
    from strata.engine.weights import load_config

    config = load_config(bundled_hf_dir)
    m = LoraManager(config, num_layers=1, layer_start=0, max_loras=4, max_rank=4, dtype=torch.float32)
    torch.manual_seed(0)
    for proj in m.a:
        m.a[proj].normal_()
        m.b[proj].normal_()
    from strata.engine.lora import LoadedLora
    for slot, lid in ((1, 11), (2, 12), (3, 13)):
        m.by_id[lid] = LoadedLora(f"l{lid}", Path("."), lid, slot, 4)
    layouts = {
        # (first row, rows, lora id): a decode of 13, a base row, a prefill of 11, a decode
        # of 11, a prefill of 13: padded groups over slots 1..3 (slot 2 unused).
        "padded": [(0, 1, 13), (1, 1, 0), (2, 5, 11), (7, 1, 11), (8, 3, 13)],
        "no pads": [(0, 1, 13), (1, 1, 11), (2, 1, 0), (3, 1, 12)],  # gathered, not masked
        "one adapter": [(0, 3, 11), (3, 1, 11)],  # every row, in order: no gather at all
    }
    for name, rows in layouts.items():
        num_rows = sum(n for _, n, _ in rows)
        batch = m.batch(rows, num_rows)
        assert batch is not None
        assert (batch.mask is None) == (name != "padded")
        assert (batch.gidx is None) == (name == "one adapter")
        x = torch.randn(num_rows, config.hidden_size)
        y = torch.randn(num_rows, m.b["qkv"].shape[-1])
        want = y.clone()
        for start, n, lid in rows:
            if lid:
                s = m.by_id[lid].slot
                want[start:start + n] += x[start:start + n] @ m.a["qkv"][0, s] @ m.b["qkv"][0, s]
        batch.add(0, "qkv", x, y)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-3, msg=name)
    assert m.batch([(0, 4, 0)], 4) is None
