"""Write new keys and values into the paged cache by slot mapping.

The cache is the core reference layout, [num_blocks, block_size, kv_heads, head_dim] per layer
(see ember.ops.reference); slot s is position s % block_size of block s // block_size. Rows
whose slot is negative are padding (a batch padded to a captured size) and write nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import DeviceSpec, describe, head_dim_contiguous


def launch_config(dev: DeviceSpec, kv_heads: int, head_dim: int) -> dict:
    # One token per program, all its heads at once: a copy, bound by memory, so few warps. The
    # interpreter pays per program, so there a program takes 64 tokens.
    block_h, block_d = triton.next_power_of_2(kv_heads), triton.next_power_of_2(head_dim)
    lanes = block_h * block_d
    return {"BLOCK_T": 64 if dev.interpreter else 1, "BLOCK_H": block_h, "BLOCK_D": block_d,
            "num_warps": max(1, min(8, lanes // (dev.warp_size * 8))), "enable_fp_fusion": True}


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, tokens,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch,
                     KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = (tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T))[:, None, None]
    slot = tl.load(slot_ptr + t, mask=t < tokens, other=-1)
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (slot >= 0) & (h < KV_HEADS) & (d < HEAD_DIM)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, config: dict | None = None) -> None:
    """k, v [tokens, kv_heads, head_dim] into k_cache, v_cache at slot_mapping [tokens] (int64)."""
    tokens, kv_heads, head_dim = k.shape
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (kv_heads, head_dim)
    assert k_cache.stride() == v_cache.stride(), "k and v caches must share one layout"
    assert k_cache.stride(-1) == 1, "the cache's head_dim must be contiguous"
    k, v = head_dim_contiguous(k), head_dim_contiguous(v)
    if tokens == 0:
        return
    config = config or launch_config(describe(k.device), kv_heads, head_dim)
    _kv_write_kernel[(triton.cdiv(tokens, config["BLOCK_T"]),)](
        k, v, k_cache, v_cache, slot_mapping, tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], **config)

