"""Causal grouped-query attention over the paged KV cache.

The cache layout, block tables and metadata are those of ember.backend.AttentionMetadata and the
core reference (ember.ops.reference.paged_attention), which these kernels are tested against:
sequence i owns query rows query_start_loc[i]:query_start_loc[i+1], the last of its seq_lens[i]
cached positions; query j of a chunk of n sits at position seq_lens[i] - n + j and sees keys up to
there. The new keys and values must already be in the cache (kv_write.write_kv).

- prefill (varlen): one launch over every sequence of a step, whatever its length; a program
  takes one kv head and a tile of rows that are (query, head of that kv head's group) pairs, so
  each key tile is read once for the whole group.
- decode: one query per sequence; its context is cut into splits of a fixed length, each program
  leaves a partial max, sum and weighted sum of values, and a second kernel combines them
  (flash-decoding). The split length is a launch setting, never derived from the batch, so a
  sequence's result does not depend on what else is in it.

Softmax runs online in float32 and in base 2 (exp2 is the hardware instruction; the scale
carries log2(e)). Inputs are float32, float16 or bfloat16.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ember.backend import AttentionMetadata

from .launch import DeviceSpec, describe, head_dim_contiguous


def _upcast(dev: DeviceSpec, dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bfloat16 dot operands as their raw uint16 bits (triton
    # 3.9), so there the operands go to float32 first. P is still rounded to bfloat16 before, as
    # on the GPU (though the interpreter truncates where the GPU rounds to nearest).
    return dev.interpreter and dtype == torch.bfloat16


def _key_tile(dev: DeviceSpec, rows: int, block_d: int, dtype: torch.dtype, stages: int) -> int:
    """Keys per tile: 64, halved until the query tile and `stages` tiles each of K and V fit in
    shared memory (an MI300's 64 KiB, say, with float32 operands)."""
    block_n = 64
    while (rows + 2 * stages * block_n) * block_d * dtype.itemsize > dev.shared_memory and block_n > 16:
        block_n //= 2
    return block_n


def _stages(dev: DeviceSpec) -> int:
    # AMD's MI300 tuning guide: software pipelining in one stage for kernels with two dots in
    # their loop, as flash attention has (NVIDIA's GPUs overlap the next tile's loads in two)
    return 1 if dev.vendor == "amd" else 2


def _amd_options(dev: DeviceSpec) -> dict:
    # AMD's Triton backend takes an occupancy hint NVIDIA's rejects: two waves per SIMD lets
    # one hide the other's memory latency (the same guide's starting point for attention)
    return {"waves_per_eu": 2} if dev.vendor == "amd" else {}


def prefill_config(dev: DeviceSpec, head_dim: int, group: int, dtype: torch.dtype) -> dict:
    block_d = triton.next_power_of_2(head_dim)
    if dev.interpreter:
        # small tiles, so that CI's small shapes still cross tile and block boundaries
        block_m, block_n, warps, stages = 16, 16, 4, 1
    else:
        # unmeasured starting points
        block_m, warps, stages = 64, 4, _stages(dev)
        block_n = _key_tile(dev, block_m, block_d, dtype, stages)
    return {"BLOCK_M": max(block_m, triton.next_power_of_2(group)), "BLOCK_N": block_n,
            "BLOCK_D": block_d, "UPCAST": _upcast(dev, dtype), "num_warps": warps,
            "num_stages": stages, "enable_fp_fusion": True, **_amd_options(dev)}


def decode_config(dev: DeviceSpec, head_dim: int, group: int, dtype: torch.dtype) -> dict:
    block_d = triton.next_power_of_2(head_dim)
    # the group's heads are the rows of the dot: at least 16 of them, as tl.dot wants
    block_h = max(16, triton.next_power_of_2(group))
    if dev.interpreter:
        block_n, split_len, warps, stages = 16, 64, 4, 1
    else:
        # unmeasured, as above; 512 keys per split gives a 4k context 8 programs per kv head
        split_len, warps, stages = 512, 4, _stages(dev)
        block_n = _key_tile(dev, block_h, block_d, dtype, stages)
    return {"BLOCK_H": block_h, "BLOCK_N": block_n, "BLOCK_D": block_d, "SPLIT_LEN": split_len,
            "UPCAST": _upcast(dev, dtype), "num_warps": warps, "num_stages": stages,
            "enable_fp_fusion": True, **_amd_options(dev)}


def decode_reduce_config(dev: DeviceSpec, head_dim: int, heads: int) -> dict:
    # a GPU gives each head its own program; the interpreter pays per program, so there one
    # program takes every head of a sequence
    return {"BLOCK_D": triton.next_power_of_2(head_dim), "num_warps": 1 if head_dim <= 64 else 2,
            "HEADS_PER_PROGRAM": triton.next_power_of_2(heads) if dev.interpreter else 1,
            "enable_fp_fusion": True}


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # "ieee": float32 operands would otherwise be rounded to tf32 on NVIDIA GPUs; 16-bit
    # operands ignore it
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, table_ptr, n, n_ok, allowed,
                 kv_off, scale_log2, d, d_ok,
                 stride_cb, stride_cs, BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of keys n (positions) into the running max m, sum l and accumulator acc."""
    page = tl.load(table_ptr + n // BLOCK_SIZE, mask=n_ok, other=0)
    slot = page * stride_cb + (n % BLOCK_SIZE) * stride_cs + kv_off
    k_t = tl.load(k_cache_ptr + slot[None, :] + d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    s = _dot(q, k_t, UPCAST) * scale_log2
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    v = tl.load(v_cache_ptr + slot[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
                    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, scale_log2,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch,
                    stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP  # queries per tile
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    if tile * BLOCK_Q >= q_len:  # the grid is sized for the longest chunk of the step
        return
    ctx = tl.load(seq_lens_ptr + seq)

    r = tl.arange(0, BLOCK_M)
    qi = tile * BLOCK_Q + r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_ok = (r < BLOCK_Q * GROUP) & (qi < q_len)
    # rows past the chunk get positions past the context: they see every key and stay finite
    q_pos = ctx - q_len + qi
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_begin + qi)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # no row of this tile sees past its last query; key 0 is in every row's first tile
    kv_end = tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_Q)
    table_ptr = block_tables_ptr + seq * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        allowed = n_ok[None, :] & (n[None, :] <= q_pos[:, None])
        m, l, acc = _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, table_ptr, n, n_ok, allowed,
                                 kv_head * stride_ch, scale_log2, d, d_ok, stride_cb, stride_cs,
                                 BLOCK_SIZE, UPCAST)
    out = acc / l[:, None]
    tl.store(out_ptr + (q_begin + qi)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                   block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, scale_log2,
                   stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
                   num_heads, max_splits,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   SPLIT_LEN: tl.constexpr, UPCAST: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(seq_lens_ptr + seq)
    start = split * SPLIT_LEN
    if start >= ctx:  # the grid is sized for the longest context of the step
        return
    end = tl.minimum(ctx, start + SPLIT_LEN)

    r = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + r
    row_ok = r < GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    t = tl.load(query_start_loc_ptr + seq)
    q = tl.load(q_ptr + t * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table_ptr = block_tables_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        m, l, acc = _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, table_ptr, n, n_ok,
                                 n_ok[None, :], kv_head * stride_ch, scale_log2, d, d_ok,
                                 stride_cb, stride_cs, BLOCK_SIZE, UPCAST)
    part = (seq * num_heads + head) * max_splits + split
    tl.store(part_m_ptr + part, m, mask=row_ok)
    tl.store(part_l_ptr + part, l, mask=row_ok)
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_reduce_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, seq_lens_ptr,
                          query_start_loc_ptr, num_heads, max_splits, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_LEN: tl.constexpr,
                          HEADS_PER_PROGRAM: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1) * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
    h_ok = head < num_heads
    n_splits = tl.cdiv(tl.load(seq_lens_ptr + seq), SPLIT_LEN)
    d = tl.arange(0, BLOCK_D)
    mask = h_ok[:, None] & (d < HEAD_DIM)[None, :]
    base = (seq * num_heads + head) * max_splits
    # split 0 always holds keys (a context is never empty), so no -inf enters the sums
    m = tl.load(part_m_ptr + base, mask=h_ok, other=0.0)
    l = tl.load(part_l_ptr + base, mask=h_ok, other=1.0)
    acc = tl.load(part_acc_ptr + base[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    for s in range(1, n_splits):
        m_s = tl.load(part_m_ptr + base + s, mask=h_ok, other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)
        l = l * alpha + tl.load(part_l_ptr + base + s, mask=h_ok, other=0.0) * beta
        acc = (acc * alpha[:, None]
               + tl.load(part_acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
               * beta[:, None])
        m = m_new
    t = tl.load(query_start_loc_ptr + seq)
    tl.store(out_ptr + t * stride_ot + head[:, None] * stride_oh + d[None, :],
             (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, (q.shape, k_cache.shape)
    assert k_cache.stride() == v_cache.stride(), "k and v caches must share one layout"
    assert k_cache.stride(-1) == 1, "the cache's head_dim must be contiguous"
    assert heads % kv_heads == 0, f"{heads} query heads do not group over {kv_heads} kv heads"
    return heads, heads // kv_heads, head_dim


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "out must be like q"
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None,
                      config: dict | None = None) -> torch.Tensor:
    """Any mix of prefill chunks and decode rows: q [tokens, heads, head_dim] -> out, same shape."""
    heads, group, head_dim = _check(q, k_cache, v_cache)
    q = head_dim_contiguous(q)
    out = _output(q, out)
    if meta.num_seqs == 0:
        return out
    config = config or prefill_config(describe(q.device), head_dim, group, q.dtype)
    tiles = triton.cdiv(max(meta.query_lens_list), config["BLOCK_M"] // group)
    _prefill_kernel[(meta.num_seqs, k_cache.shape[2], tiles)](
        q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], **config)
    return out


def decode_splits(context: int, config: dict) -> int:
    """How many splits a decode launch needs for contexts up to `context` tokens."""
    return triton.cdiv(context, config["SPLIT_LEN"])


def decode_workspace(num_seqs: int, heads: int, head_dim: int, max_splits: int,
                     device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split partials (max, sum, weighted values) of a decode launch. Preallocated by a caller
    that captures the launch in a CUDA graph, where nothing may be allocated per step."""
    part_m = torch.empty((num_seqs, heads, max_splits), dtype=torch.float32, device=device)
    part_acc = torch.empty((num_seqs, heads, max_splits, head_dim), dtype=torch.float32, device=device)
    return part_m, torch.empty_like(part_m), part_acc


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None,
                     config: dict | None = None,
                     workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One query row per sequence (meta.decode_only): q [num_seqs, heads, head_dim] -> out.

    Without a workspace the grid is sized for this step's longest context; with one (from
    decode_workspace) for the most splits it holds, so that a captured graph serves any context
    up to that (the programs past a sequence's context return at once)."""
    assert meta.decode_only, "decode_attention takes one query per sequence"
    heads, group, head_dim = _check(q, k_cache, v_cache)
    q = head_dim_contiguous(q)
    out = _output(q, out)
    if meta.num_seqs == 0:
        return out
    dev = describe(q.device)
    config = config or decode_config(dev, head_dim, group, q.dtype)
    if workspace is None:
        workspace = decode_workspace(meta.num_seqs, heads, head_dim,
                                     decode_splits(max(meta.seq_lens_list), config), q.device)
    part_m, part_l, part_acc = workspace
    assert part_m.shape[0] >= meta.num_seqs and part_m.shape[1] == heads, "workspace too small"
    max_splits = part_m.shape[2]
    kv_heads = k_cache.shape[2]
    _decode_kernel[(meta.num_seqs, kv_heads, max_splits)](
        q, k_cache, v_cache, part_m, part_l, part_acc,
        meta.block_tables, meta.seq_lens, meta.query_start_loc, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), heads, max_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], **config)
    reduce = decode_reduce_config(dev, head_dim, heads)
    _decode_reduce_kernel[(meta.num_seqs, triton.cdiv(heads, reduce["HEADS_PER_PROGRAM"]))](
        part_m, part_l, part_acc, out, meta.seq_lens, meta.query_start_loc, heads, max_splits,
        out.stride(0), out.stride(1), HEAD_DIM=head_dim, SPLIT_LEN=config["SPLIT_LEN"], **reduce)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The decode kernel for a step of decode rows only, the prefill kernel for any other."""
    kernel = decode_attention if meta.decode_only else prefill_attention
    return kernel(q, k_cache, v_cache, meta, scale, out)
