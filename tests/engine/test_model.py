"""The model against transformers' LlamaForCausalLM, and the paged path against the plain one."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from strata.engine.kernels import load_paged_attention
from strata.engine.kv_cache import BlockManager
from strata.engine.model import LlamaModel
from strata.engine.model_config import LlamaConfig
from strata.engine.runner import ModelRunner
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import Scheduler, SchedulerConfig
from strata.engine.sequence import Sequence


def tiny_pair(tied: bool = True, rope_scaling: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    hf = HFConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tied, rope_theta=50000.0, rope_scaling=rope_scaling,
        rms_norm_eps=1e-5,
    )
    ref = LlamaForCausalLM(hf).eval()
    cfg = LlamaConfig.from_hf_dict(hf.to_dict())
    ours = LlamaModel(cfg).eval()
    ours.load_weights(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    "rope_scaling",
    [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}],
)
def test_logits_match_transformers(tied: bool, rope_scaling: dict | None) -> None:
    ref, ours = tiny_pair(tied, rope_scaling)
    ids = torch.randint(0, 256, (1, 97))
    with torch.no_grad():
        expected = ref(ids).logits[0]
        got = ours.compute_logits(ours(ids[0], torch.arange(97)))
    assert (expected - got).abs().max().item() < 1e-3


def test_layer_range_parts_compose_to_the_whole() -> None:
    ref, whole = tiny_pair()
    sd = ref.state_dict()
    cfg = whole.config
    head = LlamaModel(cfg, 0, 1, has_embed=True, has_head=False)
    mid = LlamaModel(cfg, 1, 2, has_embed=False, has_head=False)
    tail = LlamaModel(cfg, 2, 3, has_embed=False, has_head=True)
    for part in (head, mid, tail):
        part.load_weights(sd)
        assert part.num_layers == 1
    ids = torch.randint(0, 256, (40,))
    pos = torch.arange(40)
    with torch.no_grad():
        h = tail(mid(head(ids, pos), pos), pos)
        assert torch.allclose(tail.compute_logits(h), whole.compute_logits(whole(ids, pos)), atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        LlamaModel(cfg, 2, 5)


@pytest.mark.parametrize("native", [True, False], ids=["native-attention", "torch-attention"])
def test_paged_chunked_prefill_and_decode_match_reference(native: bool) -> None:
    """Drive the real scheduler and runner; every sampled position's logits must match."""
    _, model = tiny_pair()
    if native:
        assert load_paged_attention(), "the native kernel must build on CI machines"
    runner = ModelRunner(model, num_blocks=64, block_size=4, dtype=torch.float32, native_attention=native)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=13), BlockManager(64, 4))
    g = torch.Generator().manual_seed(1)
    seqs = []
    for i, n in enumerate([9, 30, 4, 17]):
        prompt = torch.randint(0, 256, (n,), generator=g).tolist()
        s = Sequence(i, prompt, SamplingParams(max_tokens=6))
        sched.add(s)
        seqs.append(s)
    # A fifth sequence shares a cached prefix with the second one.
    shared = Sequence(9, seqs[1].prompt_token_ids[:24] + [1, 2, 3], SamplingParams(max_tokens=6))
    step = 0
    while sched.num_unfinished:
        step += 1
        if step == 8:
            sched.add(shared)
            seqs.append(shared)
        batch = sched.step()
        inputs = runner.prepare(batch)
        hidden = runner.forward(inputs)
        logits = runner.logits(hidden, inputs.sample_rows)
        sampled = [e for e in batch.entries if e.samples]
        sched.on_step_done(batch)
        for row, e in zip(logits, sampled, strict=True):
            s = e.seq
            all_ids = torch.tensor(s.prompt_token_ids + s.output_token_ids)
            with torch.no_grad():
                ref = model.compute_logits(model(all_ids, torch.arange(len(all_ids))))[-1]
            assert (row - ref).abs().max().item() < 1e-4, f"seq {s.seq_id} at {len(all_ids)}"
            s.output_token_ids.append(int(row.argmax()))
            if len(s.output_token_ids) >= s.params.max_tokens:
                sched.finish(s, "length")
    assert shared.num_cached_tokens == 24
    assert sched.blocks.num_free_blocks == 64


def test_transposed_weight_storage_keeps_the_function() -> None:
    """ModelRunner on CPU fp32 stores projections as [in, out] (a faster MKL GEMM at
    decode batch sizes): same values, same logits, weights are transposed views."""
    _, ours = tiny_pair(tied=False)
    ids = torch.randint(0, 256, (33,))
    pos = torch.arange(33)
    with torch.no_grad():
        before = ours.compute_logits(ours(ids, pos))
    ModelRunner(ours, num_blocks=8, block_size=16, dtype=torch.float32)
    w = ours.layers[0].mlp.gate_up_proj.weight
    assert w.shape == (320, 64) and w.stride() == (1, 320)
    assert ours.lm_head.weight.stride() == (1, 256)
    with torch.no_grad():
        after = ours.compute_logits(ours(ids, pos))
    assert torch.allclose(before, after, atol=1e-5)


class _Shapes(TorchDispatchMode):
    """Records the row counts (and weight shapes) of the GEMMs and attention torch runs."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: set[int] = set()
        self.gemms: set[tuple[int, tuple[int, ...]]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        # Under inference mode the mode sees linear/SDPA whole; otherwise their parts.
        if name in ("linear", "_linear_pointwise", "mm", "addmm", "scaled_dot_product_attention",
                    "_scaled_dot_product_flash_attention_for_cpu"):
            x = args[1] if name == "addmm" else args[0]
            self.rows.add(x.shape[-2])
            if name in ("linear", "_linear_pointwise"):  # the latter: oneDNN, prepacked weight
                self.gemms.add((x.shape[0], tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


def test_bf16_shapes_are_bucketed_and_keep_the_function() -> None:
    """oneDNN compiles and caches a kernel per GEMM/attention shape in bf16 (native memory
    that grows with every new prompt length): the runner must reach torch with a few
    padded row counts only, and the padding must not change what the model computes."""
    from strata.engine.model import padded_rows

    _, model = tiny_pair()
    model = model.to(torch.bfloat16)
    runner = ModelRunner(model, num_blocks=512, block_size=4, dtype=torch.bfloat16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=96), BlockManager(512, 4))
    g = torch.Generator().manual_seed(2)
    lengths = list(range(17, 200, 7))
    for i, n in enumerate(lengths):
        sched.add(Sequence(i, torch.randint(0, 256, (n,), generator=g).tolist(), SamplingParams(max_tokens=1)))
    mode = _Shapes()
    worst = 0.0
    while sched.num_unfinished:
        batch = sched.step()
        inputs = runner.prepare(batch)
        with mode:
            hidden = runner.forward(inputs)
            logits = runner.logits(hidden, inputs.sample_rows)
        sampled = [e for e in batch.entries if e.samples]
        sched.on_step_done(batch)
        for row, e in zip(logits, sampled, strict=True):
            ids = torch.tensor(e.seq.prompt_token_ids)
            with torch.no_grad():
                ref = model.compute_logits(model(ids, torch.arange(len(ids))))[-1]
            worst = max(worst, (row - ref).abs().max().item() / ref.abs().max().item())
            sched.finish(e.seq, "length")
    assert worst < 0.05  # bf16 against bf16: the same function up to rounding
    assert mode.rows, "no GEMM was seen: the probe is broken"
    assert all(r == padded_rows(r) for r in mode.rows), sorted(mode.rows)
    # Up to 16 rows (decode batches, sampled rows) run as they are; above, every prompt
    # length and chunk split would be its own shape without the padding.
    large = {r for r in mode.rows if r > 16}
    assert len(large) <= 8, sorted(large)


def test_warm_up_builds_every_gemm_shape_serving_uses() -> None:
    """The start-up warm-up must cover every (rows, weight) GEMM a bf16 runner then runs."""
    _, model = tiny_pair()
    model = model.to(torch.bfloat16)
    runner = ModelRunner(model, num_blocks=512, block_size=4, dtype=torch.bfloat16)
    warm = _Shapes()
    with warm:
        assert runner.warm_up(96) > 0
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=96), BlockManager(512, 4))
    g = torch.Generator().manual_seed(3)
    for i, n in enumerate(range(3, 160, 11)):
        sched.add(Sequence(i, torch.randint(0, 256, (n,), generator=g).tolist(), SamplingParams(max_tokens=3)))
    served = _Shapes()
    while sched.num_unfinished:
        batch = sched.step()
        inputs = runner.prepare(batch)
        with served:
            logits = runner.logits(runner.forward(inputs), inputs.sample_rows)
        sampled = [e for e in batch.entries if e.samples]
        sched.on_step_done(batch)
        for row, e in zip(logits, sampled, strict=True):
            e.seq.output_token_ids.append(int(row.argmax()))
            if len(e.seq.output_token_ids) >= e.seq.params.max_tokens:
                sched.finish(e.seq, "length")
    used = {g for g in served.gemms if g[0] > 0}
    assert used, "no GEMM was seen: the probe is broken"
    assert used <= warm.gemms, sorted(used - warm.gemms)
    # fp32 GEMMs go to BLAS, which builds nothing per shape: no warm-up.
    _, fp32 = tiny_pair()
    assert ModelRunner(fp32, num_blocks=8, block_size=4, dtype=torch.float32).warm_up(96) == 0


def test_row_buckets_are_padded_rows_few_and_close() -> None:
    from strata.engine.model import padded_rows
    from strata.engine.runner import row_buckets

    for top in (1, 16, 17, 100, 512, 3000):
        assert row_buckets(top) == sorted({padded_rows(n) for n in range(1, top + 1)})
    assert len(row_buckets(4096)) <= 16 + 8 * 8
    for n in range(17, 5000):
        assert n <= padded_rows(n) <= max(n * 1.125, n + 15)
