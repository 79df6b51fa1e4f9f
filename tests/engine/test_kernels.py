"""The native paged decode-attention kernel against torch's SDPA on gathered K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strata.engine.kernels import load_paged_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4), (8, 1)])
def test_paged_decode_attention_matches_sdpa(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    assert load_paged_attention()
    g = torch.Generator().manual_seed(0)
    seqs, head_dim, bs, num_blocks = 5, 32, 4, 40
    kc = torch.randn(num_blocks * bs, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(num_blocks * bs, kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor([1, 3, 4, 17, 30], dtype=torch.int32)
    max_blocks = -(-int(lens.max()) // bs)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(seqs)])
    tables = tables.to(torch.int32)
    q = torch.randn(seqs, heads, head_dim, generator=g).to(dtype)
    got = torch.ops.strata.paged_decode_attention(q, kc, vc, tables, lens, bs, head_dim**-0.5)
    for i in range(seqs):
        pos = torch.arange(int(lens[i]))
        slots = tables[i].long()[pos // bs] * bs + pos % bs
        k = kc[slots].transpose(0, 1).unsqueeze(0).float()
        v = vc[slots].transpose(0, 1).unsqueeze(0).float()
        ref = F.scaled_dot_product_attention(q[i : i + 1].unsqueeze(2).float(), k, v, enable_gqa=True)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got[i].float() - ref[0, :, 0]).abs().max().item() < tol
