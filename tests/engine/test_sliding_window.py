"""Sliding-window attention (Mistral): plain forward, native kernel and the paged path
against transformers, which masks keys j of query i to i - window < j <= i."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM

from strata.engine.kernels import load_paged_attention
from strata.engine.kv_cache import BlockManager
from strata.engine.model import LlamaModel
from strata.engine.model_config import LlamaConfig
from strata.engine.runner import ModelRunner
from strata.engine.sampling import SamplingParams
from strata.engine.scheduler import Scheduler, SchedulerConfig
from strata.engine.sequence import Sequence

VOCAB = 256
WINDOW = 16


def mistral_pair(window: int | None = WINDOW, seed: int = 0) -> tuple[MistralForCausalLM, LlamaModel]:
    """A tiny random Mistral (head_dim 64, so fp32 decode takes the AVX-512 kernel) and ours."""
    torch.manual_seed(seed)
    hf = MistralConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=window, tie_word_embeddings=False,
    )
    ref = MistralForCausalLM(hf).eval()
    cfg = LlamaConfig.from_hf_dict(hf.to_dict())
    assert cfg.sliding_window == window
    ours = LlamaModel(cfg).eval()
    ours.load_weights(ref.state_dict())
    return ref, ours


def test_config_windows_per_layer() -> None:
    base = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 4,
            "num_attention_heads": 2}
    mistral = LlamaConfig.from_hf_dict({**base, "model_type": "mistral", "sliding_window": 32})
    assert [mistral.layer_window(i) for i in range(4)] == [32] * 4
    assert LlamaConfig.from_hf_dict({**base, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    # Qwen2: off unless use_sliding_window; then only the layers from max_window_layers on.
    qwen = {**base, "model_type": "qwen2", "sliding_window": 32, "max_window_layers": 2}
    assert LlamaConfig.from_hf_dict(qwen).sliding_window is None
    on = LlamaConfig.from_hf_dict({**qwen, "use_sliding_window": True})
    assert [on.layer_window(i) for i in range(4)] == [None, None, 32, 32]
    # Explicit layer_types (Gemma 3's alternation) win.
    types = ["sliding_attention", "full_attention"] * 2
    alt = LlamaConfig.from_hf_dict({**base, "model_type": "mistral", "sliding_window": 8, "layer_types": types})
    assert [alt.layer_window(i) for i in range(4)] == [8, None, 8, None]
    # Exported configs read back with the same windows (Qwen2's with its switch on).
    for cfg in (mistral, on):
        back = LlamaConfig.from_hf_dict(cfg.to_hf_dict())
        assert [back.layer_window(i) for i in range(4)] == [cfg.layer_window(i) for i in range(4)]
    llama = LlamaConfig(**{**base, "num_key_value_heads": 2}, sliding_window=8)
    assert llama.to_hf_dict()["model_type"] == "mistral"
    with pytest.raises(ValueError, match="per-layer"):
        alt.to_hf_dict()
    # Blocks before the window are dead only when no layer reads the whole context.
    assert (mistral.kv_window, on.kv_window, alt.kv_window) == (32, None, None)


@pytest.mark.parametrize("length", [12, 70])
def test_logits_match_transformers(length: int) -> None:
    ref, ours = mistral_pair()
    ids = torch.randint(0, VOCAB, (1, length))
    with torch.no_grad():
        expected = ref(ids).logits[0]
        got = ours.compute_logits(ours(ids[0], torch.arange(length)))
        _, full = mistral_pair(window=None)
        unwindowed = full.compute_logits(full(ids[0], torch.arange(length)))
    assert (expected - got).abs().max().item() < 1e-4
    # Past the window the mask must matter (or this test could not fail); within it, not.
    moved = (expected - unwindowed).abs().max().item()
    assert moved > 1e-2 if length > WINDOW else moved < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 32], ids=["avx-head", "generic-head"])
@pytest.mark.parametrize("window", [1, 5, 16, 200])
def test_paged_kernel_honours_the_window(window: int, head_dim: int, dtype: torch.dtype) -> None:
    assert load_paged_attention(), "the native kernel must build on CI machines"
    g = torch.Generator().manual_seed(window)
    bs, heads, kv_heads, lens = 4, 8, 2, [1, 3, 17, 40, 61]
    max_blocks = -(-max(lens) // bs)
    num_blocks = len(lens) * max_blocks
    tables = torch.randperm(num_blocks, generator=g).view(len(lens), max_blocks).int()
    kc = torch.randn(num_blocks * bs, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(num_blocks * bs, kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    got = torch.ops.strata.paged_decode_attention(
        q, kc, vc, tables, torch.tensor(lens, dtype=torch.int32), bs, head_dim**-0.5, window
    )
    for s, n in enumerate(lens):
        pos = torch.arange(n)
        slots = tables[s].long()[pos // bs] * bs + pos % bs
        keep = pos > n - 1 - window  # the query sits at position n - 1
        k, v = kc[slots][keep].float(), vc[slots][keep].float()
        want = F.scaled_dot_product_attention(
            q[s].float().unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1), enable_gqa=True
        ).squeeze(1)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert (got[s].float() - want).abs().max().item() < tol, (s, n)


def _greedy_paged(model: LlamaModel, prompts: list[list[int]], max_tokens: int, *, native: bool,
                  dtype: torch.dtype, window: int | None = None,
                  late: tuple[int, list[int]] | None = None) -> tuple[list[tuple[list[int], torch.Tensor]], Scheduler, int]:
    """Greedy tokens and their logits [max_tokens, vocab] through the real scheduler and
    runner: small chunks, so prefill continues over cached context, then decode past the
    window. ``window`` makes the block manager give back blocks before it; ``late`` is a
    (step, prompt) added while the others run. Also returns the scheduler and the most
    blocks in use at once."""
    runner = ModelRunner(model, num_blocks=128, block_size=4, dtype=dtype, native_attention=native)
    blocks = BlockManager(128, 4, sliding_window=window)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=13), blocks)
    seqs = [Sequence(i, p, SamplingParams(max_tokens=max_tokens)) for i, p in enumerate(prompts)]
    rows: list[list[torch.Tensor]] = [[] for _ in range(len(seqs) + 1)]
    for s in seqs:
        sched.add(s)
    step = peak = 0
    while sched.num_unfinished:
        step += 1
        if late is not None and step == late[0]:
            seqs.append(Sequence(len(seqs), late[1], SamplingParams(max_tokens=max_tokens)))
            sched.add(seqs[-1])
        batch = sched.step()
        peak = max(peak, blocks.num_blocks - blocks.num_free_blocks)
        inputs = runner.prepare(batch)
        logits = runner.logits(runner.forward(inputs), inputs.sample_rows)
        sampled = [e for e in batch.entries if e.samples]
        sched.on_step_done(batch)
        for row, e in zip(logits, sampled, strict=True):
            rows[e.seq.seq_id].append(row)
            e.seq.output_token_ids.append(int(row.argmax()))
            if len(e.seq.output_token_ids) >= max_tokens:
                sched.finish(e.seq, "length")
    assert blocks.num_free_blocks == 128
    return [(s.output_token_ids, torch.stack(r)) for s, r in zip(seqs, rows, strict=False)], sched, peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("native", [True, False], ids=["native-attention", "torch-attention"])
def test_paged_greedy_tokens_match_transformers(native: bool, dtype: torch.dtype) -> None:
    """fp32: transformers' greedy tokens exactly. bf16: each step's logits within bf16
    rounding of transformers' fp32 logits on the same tokens (ignoring the window moves
    them by more than their own size)."""
    if native:
        assert load_paged_attention(), "the native kernel must build on CI machines"
    ref, ours = mistral_pair()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (41, 57, 80)]
    max_tokens = 10
    got, _, _ = _greedy_paged(ours.to(dtype), prompts, max_tokens, native=native, dtype=dtype)
    for prompt, (tokens, logits) in zip(prompts, got, strict=True):
        with torch.no_grad():
            want = ref(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        rel = ((logits - want).abs().max() / want.abs().max()).item()
        if dtype == torch.float32:
            assert rel < 1e-5
            with torch.no_grad():
                greedy = ref.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                      min_new_tokens=max_tokens, pad_token_id=0)
            assert tokens == greedy[0, len(prompt):].tolist()
        else:
            assert rel < 0.05


def test_layer_range_parts_keep_each_layers_window() -> None:
    """Stages hold layer ranges: a part must take its layers' windows by absolute index
    (with alternating sliding/global layers, a relative index would swap them)."""
    torch.manual_seed(0)
    hf = MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=6,
    )
    sd = MistralForCausalLM(hf).eval().state_dict()
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    cfg = LlamaConfig.from_hf_dict({**hf.to_dict(), "layer_types": types})
    assert [cfg.layer_window(i) for i in range(3)] == [6, None, 6]
    whole = LlamaModel(cfg).eval()
    head = LlamaModel(cfg, 0, 1, has_head=False).eval()
    tail = LlamaModel(cfg, 1, 3, has_embed=False).eval()
    for part in (whole, head, tail):
        part.load_weights(sd)
    ids, pos = torch.randint(0, VOCAB, (30,)), torch.arange(30)
    with torch.no_grad():
        got = tail.compute_logits(tail(head(ids, pos), pos))
        want = whole.compute_logits(whole(ids, pos))
    assert [a.self_attn.window for a in tail.layers] == [None, 6]
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["native-attention", "torch-attention"])
def test_blocks_before_the_window_are_given_back(native: bool) -> None:
    """With every layer sliding, a running sequence holds only its window's blocks; the
    tokens are unchanged, and the given-back blocks stay a valid prefix-cache hit for a
    sequence that arrives later with the same prefix."""
    if native:
        assert load_paged_attention(), "the native kernel must build on CI machines"
    ref, ours = mistral_pair()
    assert ours.config.kv_window == WINDOW
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (41, 57, 80)]
    late = (12, prompts[0][:36] + [7] * 8)  # 9 full blocks of seq 0, by then given back
    kept, _, peak_kept = _greedy_paged(ours, prompts, 10, native=native, dtype=torch.float32, late=late)
    freed, sched, peak_freed = _greedy_paged(ours, prompts, 10, native=native, dtype=torch.float32,
                                             window=WINDOW, late=late)
    # A window of 16 over blocks of 4, plus a 13-token chunk: at most 9 live blocks a
    # sequence, against up to 23 for the longest one when nothing is given back.
    assert peak_freed < peak_kept - 20, (peak_freed, peak_kept)
    for (a_tokens, a_logits), (b_tokens, b_logits) in zip(kept, freed, strict=True):
        assert a_tokens == b_tokens
        assert torch.allclose(a_logits, b_logits, atol=1e-5)
    for prompt, (tokens, logits) in zip([*prompts, late[1]], freed, strict=True):
        with torch.no_grad():
            want = ref(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        assert ((logits - want).abs().max() / want.abs().max()).item() < 1e-5
    assert sched.blocks.stats().hit_tokens == 36  # the late one found seq 0's given-back blocks


def test_release_keeps_the_window_and_frees_once() -> None:
    blocks = BlockManager(16, 4, sliding_window=6)
    seq = Sequence(0, list(range(30)), SamplingParams(max_tokens=1))
    blocks.match_prefix(seq)
    assert blocks.allocate(seq, 30)
    seq.num_computed_tokens = 30
    blocks.commit(seq)
    blocks.release_before_window(seq)
    # The next query (position 30) sees keys 25..30: blocks 0-5 (positions 0..23) are dead.
    assert seq.num_released_blocks == 6 and blocks.num_free_blocks == 16 - 2
    blocks.release_before_window(seq)  # idempotent
    assert blocks.num_free_blocks == 16 - 2
    blocks.free_sequence(seq)
    assert blocks.num_free_blocks == 16 and seq.num_released_blocks == 0
    assert all(r == 0 for r in blocks.ref_counts)


def test_engine_serves_a_mistral_dir_as_transformers_does(tmp_path, bundled_gguf) -> None:  # type: ignore[no-untyped-def]
    """The user's path: a Mistral directory written by transformers, loaded and served by
    the engine (which gives back blocks before the window), greedy as transformers."""
    from strata.engine.engine import EngineConfig, build_engine_core
    from strata.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(bundled_gguf)
    torch.manual_seed(5)
    hf = MistralConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=8,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_ids[0],
    )
    ref = MistralForCausalLM(hf).eval()
    ref.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    core = build_engine_core(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu", threads=1,
                                          num_kv_blocks=64, block_size=4, max_num_batched_tokens=16))
    assert core.blocks.sliding_window == 8
    prompt = torch.randint(0, tokenizer.vocab_size, (45,), generator=torch.Generator().manual_seed(6)).tolist()
    core.add(0, prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), now=0.0)
    tokens: list[int] = []
    most_blocks = 0
    while core.has_work:
        for out in core.step():
            tokens += out.token_ids
        most_blocks = max(most_blocks, core.blocks.num_blocks - core.blocks.num_free_blocks)
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                            min_new_tokens=12, pad_token_id=0)[0, len(prompt):].tolist()
    assert tokens == want
    assert most_blocks <= 8  # a window of 8 and a 16-token chunk, not the 57 tokens' 15 blocks
