"""Paged attention in plain torch, on any device: what the xpu backend runs without IPEX.

The pool is one (keys, values) pair per layer, each [num_blocks, block_size, num_kv_heads,
head_dim]: the layout of ember.ops.reference and of IPEX's flash-attention kernels, so the IPEX
path and this one read and write the same cache and can stand in for each other at any step.

Scores and softmax are computed in float32 whatever the cache holds; work is cut into chunks so
that no intermediate grows past a fixed budget however long the contexts get.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ember.backend import AttentionMetadata

# Upper bound on the float32 intermediates one chunk of work may create.
CHUNK_BYTES = 256 * 1024**2


def padding(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The slots of the tokens to write, and which rows of k/v they are (None: all rows).
    Negative slots are padding (vLLM's convention): indexing with -1 would overwrite the pool's
    last slot. Costs one host sync, which is why callers do it once per step, not per layer."""
    slots = meta.slot_mapping
    if not bool((slots < 0).any()):
        return slots, None
    keep = slots >= 0
    return slots[keep], keep


@dataclass
class StepPlan:
    """Facts about one step that every layer shares, worked out once from the metadata."""

    slots: torch.Tensor  # cache slot of each token that is written (padding removed)
    keep: torch.Tensor | None  # rows of k/v to write; None: all of them
    decode: list[int]  # sequences with one new token, attended as one batch
    decode_rows: torch.Tensor | None  # their rows in q
    decode_tables: torch.Tensor | None  # their block tables, cut to the widest context
    decode_lens: torch.Tensor | None
    prefill: list[tuple[int, int, int, int]]  # (sequence, first row, new tokens, context length)

    @classmethod
    def of(cls, meta: AttentionMetadata) -> "StepPlan":
        slots, keep = padding(meta)
        # from the host lists: reading query_start_loc back from the device would cost a sync
        decode, decode_starts, prefill, start = [], [], [], 0
        for i, (qlen, ctx) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            if qlen == 1:
                decode.append(i)
                decode_starts.append(start)
            else:
                prefill.append((i, start, qlen, ctx))
            start += qlen
        rows = tables = lens = None
        if decode:
            dev = meta.block_tables.device
            rows = torch.tensor(decode_starts, dtype=torch.long, device=dev)
            index = torch.tensor(decode, dtype=torch.long, device=dev)
            width = -(-max(meta.seq_lens_list[i] for i in decode) // meta.block_size)
            tables = meta.block_tables.index_select(0, index)[:, :width]
            lens = meta.seq_lens.index_select(0, index.to(meta.seq_lens.device))
        return cls(slots, keep, decode, rows, tables, lens, prefill)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             plan: StepPlan) -> None:
    """Store each new token's key and value at its slot, rounded to the cache's element type."""
    if plan.keep is not None:
        k, v = k[plan.keep], v[plan.keep]
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, plan.slots, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, plan.slots, v.to(v_cache.dtype))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     lens: torch.Tensor, scale: float, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """One query per sequence ([seqs, heads, head_dim]) over its whole cached context: the
    sequences' blocks gathered side by side, positions past each context masked out."""
    seqs, heads, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    group = heads // kvh
    width = tables.shape[1] * bs
    # gathered K and V (cache dtype and float32) plus the scores, per sequence
    per_seq = width * (2 * kvh * d * (4 + k_cache.element_size()) + heads * 4)
    step = max(1, chunk_bytes // per_seq)
    positions = torch.arange(width, device=q.device)
    out = torch.empty(seqs, heads, d, dtype=torch.float32, device=q.device)
    for a in range(0, seqs, step):
        b = min(seqs, a + step)
        n = b - a
        keys = k_cache[tables[a:b]].view(n, width, kvh, d).permute(0, 2, 3, 1).float()  # [n, kvh, d, width]
        values = v_cache[tables[a:b]].view(n, width, kvh, d).transpose(1, 2).float()  # [n, kvh, width, d]
        qq = q[a:b].float().view(n, kvh, group, d)  # query head h reads kv head h // group
        scores = torch.matmul(qq, keys).mul_(scale)  # [n, kvh, group, width]
        past_end = (positions.unsqueeze(0) >= lens[a:b].unsqueeze(1)).view(n, 1, 1, width)
        probs = scores.masked_fill_(past_end, float("-inf")).softmax(-1)
        out[a:b] = torch.matmul(probs, values).view(n, heads, d)
    return out


def gather_context(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached positions of one sequence: [length, kv_heads, head_dim]."""
    bs = cache.shape[1]
    blocks = -(-length // bs)
    return cache[table[:blocks]].reshape(blocks * bs, *cache.shape[2:])[:length]


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                      chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Causal attention of a sequence's qlen newest positions (q: [qlen, heads, head_dim]) over
    its ctx cached ones (keys, values: [ctx, kv_heads, head_dim]). Query row j sits at position
    ctx - qlen + j, so with cached context the mask is not SDPA's top-left is_causal."""
    qlen, heads, d = q.shape
    ctx, kvh = keys.shape[0], keys.shape[1]
    group = heads // kvh
    kk = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, ctx, d]
    vv = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    qq = q.float().transpose(0, 1)  # [heads, qlen, d]
    if ctx == qlen and qlen * ctx * heads * 4 <= chunk_bytes:
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale)
        return out.transpose(0, 1)
    out = torch.empty(heads, qlen, d, dtype=torch.float32, device=q.device)
    step = max(1, chunk_bytes // (ctx * heads * 4))  # query rows whose scores fit the budget
    kpos = torch.arange(ctx, device=q.device)
    for a in range(0, qlen, step):
        b = min(qlen, a + step)
        qpos = torch.arange(ctx - qlen + a, ctx - qlen + b, device=q.device)
        visible = kpos.unsqueeze(0) <= qpos.unsqueeze(1)  # [rows, ctx], True: attend
        out[:, a:b] = F.scaled_dot_product_attention(qq[:, a:b], kk, vv, attn_mask=visible, scale=scale)
    return out.transpose(0, 1)


def to_device(device: torch.device, q, k, v, meta: AttentionMetadata):
    """Inputs and metadata moved to the cache's device. The model runner builds them there; the
    conformance kit builds them on the host, whatever device the backend's cache is on."""
    meta = replace(meta, slot_mapping=meta.slot_mapping.to(device), block_tables=meta.block_tables.to(device),
                   seq_lens=meta.seq_lens.to(device), query_start_loc=meta.query_start_loc.to(device))
    return q.to(device), k.to(device), v.to(device), meta


class PortableAttention:
    """The backend's attention kernels in plain torch (ember.backend.AttentionBackend)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self._meta: AttentionMetadata | None = None
        self._plan: StepPlan | None = None

    def plan(self, meta: AttentionMetadata) -> StepPlan:
        # every layer of a step passes the same metadata object: plan it once
        if meta is not self._meta:
            self._meta, self._plan = meta, StepPlan.of(meta)
        return self._plan

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if q.device != k_cache.device:
            q, k, v, meta = to_device(k_cache.device, q, k, v, meta)
        plan = self.plan(meta)
        write_kv(k, v, k_cache, v_cache, plan)
        # rows of padding tokens (after the last sequence) stay zero
        out = torch.zeros_like(q)
        if plan.decode:
            rows = decode_attention(q.index_select(0, plan.decode_rows), k_cache, v_cache, plan.decode_tables,
                                    plan.decode_lens, scale, self.chunk_bytes)
            out.index_copy_(0, plan.decode_rows, rows.to(out.dtype))
        for i, start, qlen, ctx in plan.prefill:
            if ctx == qlen:  # a whole prompt: its context is what was just written, no need to gather it
                keys, values = k[start:start + qlen].to(k_cache.dtype), v[start:start + qlen].to(v_cache.dtype)
            else:
                table = meta.block_tables[i]
                keys, values = gather_context(k_cache, table, ctx), gather_context(v_cache, table, ctx)
            rows = prefill_attention(q[start:start + qlen], keys, values, scale, self.chunk_bytes)
            out[start:start + qlen] = rows.to(out.dtype)
        return out
