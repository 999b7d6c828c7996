"""Paged attention on the CPU with torch's scaled_dot_product_attention.

Decode rows (one new token each) are batched: their contexts are gathered from the block pool into
one padded tensor and masked by length. Prefill chunks run one sequence at a time, each against its
own cached context with a causal mask offset by what was already cached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.backend import AttentionMetadata
from ember.ops.reference import write_kv


def _gather(cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    # cache [nb, bs, h, d], tables [B, nblk] -> [B, h, length, d]
    b = tables.shape[0]
    g = cache[tables].reshape(b, -1, cache.shape[2], cache.shape[3])[:, :length]
    return g.transpose(1, 2)


class CpuPagedAttention:
    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        bs = meta.block_size
        qlens, ctxs = meta.query_lens_list, meta.seq_lens_list
        starts = meta.query_start_loc.tolist()
        out = torch.empty_like(q)
        decode = [i for i, n in enumerate(qlens) if n == 1]
        if decode:
            idx = torch.tensor(decode, dtype=torch.long)
            length = max(ctxs[i] for i in decode)
            tables = meta.block_tables[idx, : -(-length // bs)]
            kk, vv = _gather(k_cache, tables, length), _gather(v_cache, tables, length)
            rows = torch.tensor([starts[i] for i in decode], dtype=torch.long)
            qq = q[rows].unsqueeze(2)  # [B, h, 1, d]
            mask = torch.arange(length)[None, :] < meta.seq_lens[idx][:, None]
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask[:, None, None, :],
                                               scale=scale, enable_gqa=True)
            out[rows] = o.squeeze(2)
        for i, n in enumerate(qlens):
            if n == 1:
                continue
            ctx, a = ctxs[i], starts[i]
            tables = meta.block_tables[i: i + 1, : -(-ctx // bs)]
            kk, vv = _gather(k_cache, tables, ctx), _gather(v_cache, tables, ctx)
            qq = q[a: a + n].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
            if n == ctx:
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
            else:  # chunk after cached context: query j sits at ctx - n + j
                mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)
            out[a: a + n] = o[0].transpose(0, 1)
        return out
