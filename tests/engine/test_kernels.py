"""The native paged decode-attention kernel against torch's SDPA on gathered K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strata.engine.kernels import load_paged_attention

# (query dtype, cache dtype): same dtype, or an fp16 cache under fp32 queries.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float16),
]


@pytest.mark.parametrize(("dtype", "cache_dtype"), DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4), (8, 1), (12, 1)])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
# Small blocks; the kernel's 16-key score chunks with full and partial chunks; two chunks
# per block, and long contexts that end mid-chunk.
@pytest.mark.parametrize(
    ("bs", "context_lens"),
    [(4, [1, 3, 4, 17, 30, 61]), (16, [1, 15, 16, 33, 200, 1001]), (32, [5, 31, 32, 47, 130, 999])],
)
def test_paged_decode_attention_matches_sdpa(
    dtype: torch.dtype,
    cache_dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    bs: int,
    context_lens: list[int],
) -> None:
    assert load_paged_attention()
    g = torch.Generator().manual_seed(0)
    seqs, num_blocks = 6, 80
    kc = torch.randn(num_blocks * bs, kv_heads, head_dim, generator=g).to(cache_dtype)
    vc = torch.randn(num_blocks * bs, kv_heads, head_dim, generator=g).to(cache_dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    max_blocks = -(-int(lens.max()) // bs)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(seqs)])
    tables = tables.to(torch.int32)
    # q as the model passes it: the leading columns of a wider fused qkv row.
    qkv = torch.randn(seqs, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q = qkv[:, : heads * head_dim].view(seqs, heads, head_dim)
    got = torch.ops.strata.paged_decode_attention(q, kc, vc, tables, lens, bs, head_dim**-0.5)
    assert got.shape == (seqs, heads, head_dim) and got.dtype == dtype
    for i in range(seqs):
        pos = torch.arange(int(lens[i]))
        slots = tables[i].long()[pos // bs] * bs + pos % bs
        k = kc[slots].transpose(0, 1).unsqueeze(0).float()
        v = vc[slots].transpose(0, 1).unsqueeze(0).float()
        ref = F.scaled_dot_product_attention(q[i : i + 1].unsqueeze(2).float(), k, v, enable_gqa=True)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got[i].float() - ref[0, :, 0]).abs().max().item() < tol


def test_paged_decode_attention_refuses_mismatched_cache() -> None:
    assert load_paged_attention()
    q = torch.randn(1, 4, 64)
    kc = torch.zeros(16, 4, 64, dtype=torch.bfloat16)
    tables = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.ones(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cache must have"):
        torch.ops.strata.paged_decode_attention(q, kc, kc, tables, lens, 16, 0.125)


def test_rope_and_cache_writes_fp16_cache() -> None:
    """float32 activations into an fp16 cache: the rotated k and v, rounded to fp16."""
    assert load_paged_attention()
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d, t = 4, 2, 64, 5
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g)
    cos_sin = torch.randn(32, d, generator=g)
    pos = torch.tensor([0, 3, 7, 8, 31])
    slots = torch.tensor([2, 9, -1, 11, 0])
    k32 = torch.zeros(16, kv_heads, d)
    v32 = torch.zeros(16, kv_heads, d)
    k16, v16 = k32.half(), v32.half()
    a, b = qkv.clone(), qkv.clone()
    torch.ops.strata.rope_and_cache_(a, pos, cos_sin, k32, v32, slots, heads, kv_heads)
    torch.ops.strata.rope_and_cache_(b, pos, cos_sin, k16, v16, slots, heads, kv_heads)
    assert torch.equal(a, b)
    assert torch.equal(k16, k32.half()) and torch.equal(v16, v32.half())
    assert k32[2].abs().sum() > 0 and k32[1].abs().sum() == 0  # slot -1 skipped


@pytest.mark.parametrize("shape", [(64, 49152), (1, 49152), (3, 7), (5, 16), (2, 17), (4, 1000)])
def test_argmax_rows_is_torch_argmax(shape: tuple[int, int]) -> None:
    assert load_paged_attention()
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    x = torch.randn(shape, generator=g)
    assert torch.equal(torch.ops.strata.argmax_rows(x), x.argmax(dim=-1))
    ties = torch.randint(0, 3, shape, generator=g).float()  # many equal maxima: the first wins
    assert torch.equal(torch.ops.strata.argmax_rows(ties), ties.argmax(dim=-1))


def test_argmax_rows_edge_values() -> None:
    assert load_paged_attention()
    x = torch.zeros(4, 100)
    x[0, 77] = x[0, 5] = 1.0  # a tie across SIMD lanes
    x[1].fill_(float("-inf"))
    x[2, 3] = 5.0
    x[2, 90] = x[2, 40] = float("nan")  # torch: the first NaN
    x[3, 99] = float("inf")  # in the scalar tail
    assert torch.equal(torch.ops.strata.argmax_rows(x), x.argmax(dim=-1))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.strata.argmax_rows(x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 64, 300])
@pytest.mark.parametrize("hidden", [576, 100])
def test_add_rms_norm_matches_torch(dtype: torch.dtype, rows: int, hidden: int) -> None:
    """x += residual in x's dtype, then the RMSNorm of the stored sum, as torch computes it."""
    assert load_paged_attention()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = torch.randn(hidden, generator=g).to(dtype)
    want_x = (x.float() + res.float()).to(dtype)
    want = F.rms_norm(want_x.float(), (hidden,), w.float(), 1e-5)
    got = torch.ops.strata.add_rms_norm_(x, res, w, 1e-5)
    assert torch.equal(x, want_x)  # the residual stream is rounded exactly as torch rounds it
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.float() - want).abs().max().item() < tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 64, 300])
@pytest.mark.parametrize("inter", [1536, 40])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, rows: int, inter: int) -> None:
    assert load_paged_attention()
    g = torch.Generator().manual_seed(3)
    gu = (4 * torch.randn(rows, 2 * inter, generator=g)).to(dtype)
    want = F.silu(gu[:, :inter].float()) * gu[:, inter:].float()
    got = torch.ops.strata.silu_and_mul(gu)
    assert got.dtype == dtype and got.shape == (rows, inter)
    # one rounding to the output dtype (fp32: the vector exp's few ulps)
    tol = 1e-5 if dtype == torch.float32 else (2**-8 if dtype == torch.bfloat16 else 2**-10)
    assert ((got.float() - want).abs() / want.abs().clamp(min=1.0)).max().item() <= tol
