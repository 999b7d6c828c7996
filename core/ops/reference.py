"""Reference ops: the numerics every backend kernel is tested against. Plain, slow, obvious."""
from __future__ import annotations

import torch

from ember.backend import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    nb, bs, h, d = k_cache.shape
    # negative slots are padding (vLLM's convention, for batches padded to a captured size):
    # indexing with -1 would overwrite the pool's last slot
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(nb * bs, h, d)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(nb * bs, h, d)[slot_mapping] = v.to(v_cache.dtype)


def gather_context(cache: torch.Tensor, block_table: list[int] | torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached positions of one sequence: [length, kv_heads, head_dim]."""
    bs = cache.shape[1]
    nblocks = -(-length // bs)
    blocks = torch.as_tensor(block_table[:nblocks], dtype=torch.long)
    return cache[blocks].reshape(nblocks * bs, *cache.shape[2:])[:length]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal grouped-query attention over the paged cache, one sequence at a time, in float64."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    start = 0
    for i, (qlen, ctx) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
        table = meta.block_tables[i]
        kk = gather_context(k_cache, table, ctx).double().repeat_interleave(group, dim=1)
        vv = gather_context(v_cache, table, ctx).double().repeat_interleave(group, dim=1)
        qq = q[start:start + qlen].double()
        scores = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        # query row j sits at position ctx - qlen + j and sees keys up to that position
        qpos = torch.arange(ctx - qlen, ctx).unsqueeze(1)
        kpos = torch.arange(ctx).unsqueeze(0)
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        out[start:start + qlen] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).to(q.dtype)
        start += qlen
    return out


def linear(x: torch.Tensor, weights, biases=None) -> torch.Tensor:
    """Dequantize-then-matmul for any GGUF weight type, in float32."""
    w = torch.cat([wt.dequantize() for wt in weights], dim=0)
    y = x.float() @ w.T
    if biases and any(b is not None for b in biases):
        y = y + torch.cat([b.dequantize().reshape(-1) for b in biases])
    return y
