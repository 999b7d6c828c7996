"""Paged attention on the CPU.

The cache is head-major: values [kv_heads, num_blocks, block_size, head_dim] per layer, so a
sequence's blocks for one head are whole contiguous rows and a gather is one index_select; keys
[kv_heads, num_blocks, head_dim, block_size], each block transposed, which turns the C kernel's
scores into plain vector FMAs over a block's slots (see csrc/paged_attention.c).

Both kernels are in csrc/paged_attention.c and read each sequence's blocks in place. A step of
decode rows only (one new token each) goes to the decode kernel, which also writes the new keys
and values; any other step writes them first and then makes one prefill-kernel call for all its
rows, prefill chunks (causal over what the sequence already cached) and decode rows alike (those
get the decode kernel's own arithmetic there, bit for bit).

Without a compiler (or with EMBER_NO_NATIVE) torch does it: decode rows are gathered into one
padded tensor and masked by length, and prefill chunks run one sequence at a time on SDPA against
their own cached context, with a causal mask offset by what was already cached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.backend import AttentionMetadata
from ember_cpu_gguf import native
from ember_cpu_gguf.layer_ops import heads_view


def key_offsets(slot_mapping: torch.Tensor, head_dim: int, block_size: int) -> torch.Tensor:
    """Flat offsets, within one head's keys, of every (token, dim) element: [tokens * head_dim]."""
    block, slot = slot_mapping // block_size, slot_mapping % block_size
    dims = torch.arange(head_dim) * block_size
    return (block[:, None] * (head_dim * block_size) + dims[None, :] + slot[:, None]).reshape(-1)


_DTYPES = {torch.float32: "float32", torch.float16: "float16"}


def write_kv(k, v, k_cache, v_cache, slot_mapping, k_offsets=None) -> None:
    h, nb, bs, d = v_cache.shape
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    v_cache.view(h, nb * bs, d).index_copy_(1, slot_mapping, v.transpose(0, 1))
    if k_offsets is None:
        k_offsets = key_offsets(slot_mapping, d, bs)
    k_cache.view(h, -1).index_copy_(1, k_offsets, k.transpose(0, 1).reshape(h, -1))


def _keys(flat_k: torch.Tensor, gather: torch.Tensor, b: int, kvh: int, d: int, bs: int) -> torch.Tensor:
    """Gathered key blocks back in [b, kvh, length, d] order."""
    return flat_k.index_select(0, gather).float().view(b, kvh, -1, d, bs).transpose(-1, -2).reshape(b, kvh, -1, d)


class _Plan:
    """Per-step index work shared by every layer."""

    def __init__(self, meta: AttentionMetadata, num_kv_heads: int, num_blocks: int, head_dim: int):
        bs = meta.block_size
        self._meta, self._head_dim = meta, head_dim
        self._k_offsets = None
        starts = meta.query_start_loc.tolist()
        self.decode = [i for i, n in enumerate(meta.query_lens_list) if n == 1]
        self.prefill = [i for i, n in enumerate(meta.query_lens_list) if n > 1]
        self.all_decode = not self.prefill
        heads = torch.arange(num_kv_heads)[:, None, None] * num_blocks
        if self.decode:
            idx = torch.tensor(self.decode, dtype=torch.long)
            nblk = -(-max(meta.seq_lens_list[i] for i in self.decode) // bs)
            tables = meta.block_tables[idx, :nblk].contiguous()  # [B, nblk]
            self.tables, self.lens = tables, meta.seq_lens[idx].contiguous()
            self.rows = torch.tensor([starts[i] for i in self.decode], dtype=torch.long)
            self._fallback = (heads, tables, nblk * bs)
        self._heads, self._starts, self._prefill_plans = heads, starts, None
        # the prefill kernel's view of the step: int64, rows contiguous (no-ops for the runner's)
        self.seqs = tuple(t.to(torch.long).contiguous() for t in (meta.block_tables, meta.query_start_loc, meta.seq_lens))

    @property
    def prefill_plans(self) -> list[tuple[int, int, int, torch.Tensor]]:
        """The torch prefill path's (first row, query length, context, block gather) per chunk."""
        if self._prefill_plans is None:
            meta, bs = self._meta, self._meta.block_size
            self._prefill_plans = []
            for i in self.prefill:
                ctx, n, a = meta.seq_lens_list[i], meta.query_lens_list[i], self._starts[i]
                nblk = -(-ctx // bs)
                gather = (self._heads[:, :, 0] + meta.block_tables[i, :nblk][None, :]).reshape(-1)
                self._prefill_plans.append((a, n, ctx, gather))
        return self._prefill_plans

    @property
    def k_offsets(self) -> torch.Tensor:
        if self._k_offsets is None:
            self._k_offsets = key_offsets(self._meta.slot_mapping, self._head_dim, self._meta.block_size)
        return self._k_offsets

    def fallback_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch decode path's gather rows and padding mask (the C kernel needs neither)."""
        heads, tables, width = self._fallback
        # row (b, h, j) of the gather is block tables[b, j] of head h
        gather = (heads.transpose(0, 1) + tables[:, None, :]).reshape(-1)
        mask = (torch.arange(width)[None, :] >= self.lens[:, None])[:, None, None, :]
        return gather, mask


class CpuPagedAttention:
    def __init__(self, use_native: bool = True, threads: int | None = None):
        self._plan_for: AttentionMetadata | None = None
        self._plan: _Plan | None = None
        # one kernel per cache element type; the cache's dtype picks (see backend.kv_cache_dtype)
        self._native = {dt: native.paged_decode(dt) if use_native else None for dt in ("float32", "float16")}
        self._write = {dt: native.write_kv(dt) if use_native else None for dt in ("float32", "float16")}
        self._prefill = {dt: native.paged_prefill(dt) if use_native else None for dt in ("float32", "float16")}
        self.native_decode = self._native["float32"]
        self.threads = threads or torch.get_num_threads()

    def plan(self, meta: AttentionMetadata, k_cache: torch.Tensor) -> _Plan:
        if self._plan_for is not meta:
            self._plan = _Plan(meta, k_cache.shape[0], k_cache.shape[1], k_cache.shape[2])
            self._plan_for = meta
        return self._plan

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        plan = self.plan(meta, k_cache)
        kernel = self._native.get(_DTYPES.get(k_cache.dtype))
        if (plan.all_decode and kernel is not None and heads_view(q) and heads_view(k)
                and heads_view(v) and k.stride(0) == v.stride(0)):
            return self._decode_in_c(kernel, plan, q, k, v, k_cache, v_cache, meta, scale)
        return self._general(plan, q, k, v, k_cache, v_cache, meta, scale)

    def _decode_in_c(self, kernel, plan, q, k, v, k_cache, v_cache, meta, scale):
        """The common decode step, kept lean (it runs once per layer per token): the C kernel
        writes the new keys and values where the fused projection left them, then attends."""
        kvh, nb, bs, d = v_cache.shape
        out = torch.empty(q.shape)
        rc = kernel(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                plan.tables.data_ptr(), plan.tables.stride(0), plan.lens.data_ptr(), out.data_ptr(),
                                q.shape[0], q.shape[1], kvh, d, nb, bs, scale, self.threads,
                                k.data_ptr(), v.data_ptr(), k.stride(0), meta.slot_mapping.data_ptr())
        if rc != 0:
            raise RuntimeError(f"paged decode attention failed (code {rc}: -1 out of memory, -2 block size > 64, -3 more than 16 query heads per kv head or head_dim > 1024)")
        return out

    def _general(self, plan, q, k, v, k_cache, v_cache, meta, scale):
        """Every step but the common decode-only one: write the new keys and values, then attend."""
        kvh, nb, bs, d = v_cache.shape
        write = self._write.get(_DTYPES.get(k_cache.dtype))
        if write is not None and heads_view(k) and heads_view(v) and k.stride(0) == v.stride(0):
            write(k.shape[0], k.data_ptr(), v.data_ptr(), k.stride(0), meta.slot_mapping.data_ptr(),
                  k_cache.data_ptr(), v_cache.data_ptr(), kvh, d, nb, bs, self.threads)
        else:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping, plan.k_offsets)
        heads = q.shape[1]
        prefill = self._prefill.get(_DTYPES.get(k_cache.dtype))
        if prefill is not None:
            q = q if heads_view(q) else q.float().contiguous()
            out = torch.empty(q.shape)
            tables, starts, lens = plan.seqs
            rc = prefill(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                         tables.stride(0), starts.data_ptr(), lens.data_ptr(), lens.shape[0], out.data_ptr(),
                         heads, kvh, d, nb, bs, scale, self.threads)
            if rc != 0:
                raise RuntimeError(f"paged prefill attention failed (code {rc}: -1 out of memory, -2 block size "
                                   "not in 1..64, -3 heads not a multiple of kv heads, more than 16 query heads per "
                                   "kv head or head_dim > 1024, -4 a query longer than its sequence)")
            return out
        # pure torch (no compiler): the decode rows padded and masked together, then each chunk on SDPA
        group = heads // kvh
        flat_k, flat_v = k_cache.view(kvh * nb, d, bs), v_cache.view(kvh * nb, bs, d)
        out = torch.empty(q.shape)
        if plan.decode:
            b = len(plan.decode)
            gather, mask = plan.fallback_index()
            kk = _keys(flat_k, gather, b, kvh, d, bs)
            vv = flat_v.index_select(0, gather).float().view(b, kvh, -1, d)
            qq = q.index_select(0, plan.rows).view(b, kvh, group, d)
            scores = torch.matmul(qq, kk.transpose(-1, -2)).mul_(scale)
            scores.masked_fill_(mask, float("-inf"))
            o = torch.matmul(scores.softmax(-1), vv)  # [b, kvh, group, d]
            out.index_copy_(0, plan.rows, o.view(b, heads, d))
        for a, n, ctx, gather in plan.prefill_plans:
            kk = _keys(flat_k, gather, 1, kvh, d, bs)[:, :, :ctx]
            vv = flat_v.index_select(0, gather).float().view(1, kvh, -1, d)[:, :, :ctx]
            qq = q[a: a + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
            if n == ctx:
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
            else:  # a chunk after cached context: query j sits at position ctx - n + j
                mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)
            out[a: a + n] = o[0].transpose(0, 1)
        return out
