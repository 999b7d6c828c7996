"""The paged KV cache in JAX: writes by slot, and causal grouped-query attention over it.

A pool is head-major, [num_kv_heads, num_pages, block_size, head_dim]: the layout the Pallas TPU
paged-attention kernel reads. The model runner keeps every layer in one pool of
num_layers * num_blocks pages (layer l's block b is page l * num_blocks + b), so the functions here
take a page offset instead of a layer's slice of the pool: slicing would copy it.

Decode-only steps on a TPU go to jax.experimental.pallas.ops.tpu.paged_attention; everything else
(prefill, mixed prefill+decode steps, any other platform) to the jax.numpy path below, an online
softmax over chunks of each token's block table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Finite, so a padded row that sees no key still gets a finite (ignored) output, never NaN.
MASK_VALUE = -1e30
# Bytes of gathered keys per chunk of the jnp path's loop: bounds its memory for long prompts.
CHUNK_BYTES = 16 * 1024**2


class PagedInputs(NamedTuple):
    """Where a step's tokens go and what they see (batching.PaddedBatch, as device arrays)."""

    slots: jax.Array  # [T] int32, -1: padding
    positions: jax.Array  # [T] int32
    token_seq: jax.Array  # [T] int32
    tables: jax.Array  # [S, W] int32
    seq_lens: jax.Array  # [S] int32


@dataclass(frozen=True)
class AttentionPlan:
    """How one step's attention runs: static, part of the compiled program's identity."""

    pallas: bool = False  # decode-only step on a TPU: the Pallas kernel
    chunk_pages: int = 1  # jnp path: table entries per step of the online softmax


def plan_for(decode: bool, num_tokens: int, table_width: int, block_size: int, num_kv_heads: int,
             head_dim: int, use_pallas: bool) -> AttentionPlan:
    if decode and use_pallas:
        # the kernel's compute block must divide the table width (a power of two)
        return AttentionPlan(pallas=True, chunk_pages=min(table_width, 8))
    per_page = num_tokens * block_size * num_kv_heads * head_dim * 4
    pages = 1
    while pages * 2 <= table_width and per_page * pages * 2 <= CHUNK_BYTES:
        pages *= 2
    return AttentionPlan(pallas=False, chunk_pages=pages)


def pallas_supported(head_dim: int, block_size: int) -> bool:
    """Shapes the TPU kernel compiles for: Mosaic tiles the last dimension by the 128 lanes and
    packs bfloat16 rows in pairs of 8 sublanes."""
    return head_dim % 128 == 0 and block_size % 16 == 0


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array,
             page_offset=0) -> tuple[jax.Array, jax.Array]:
    """Scatter k, v [T, kv_heads, head_dim] into the pools at slots (of the layer starting at
    page_offset). Slots < 0 write nothing."""
    kvh, pages, bs, d = k_pages.shape
    flat = slots + page_offset * bs
    # jnp wraps negative indices around; an index past the end is dropped instead
    flat = jnp.where(slots >= 0, flat, pages * bs)

    def put(pool, x):
        pool = pool.reshape(kvh, pages * bs, d)
        pool = pool.at[:, flat].set(x.swapaxes(0, 1).astype(pool.dtype), mode="drop")
        return pool.reshape(kvh, pages, bs, d)

    return put(k_pages, k), put(v_pages, v)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, inputs: PagedInputs, scale: float,
                    chunk_pages: int, page_offset=0) -> jax.Array:
    """Causal grouped-query attention of q [T, heads, head_dim] over each token's sequence in the
    cache: token t sees positions 0..positions[t] of sequence token_seq[t]. Any mix of prefill
    chunks and decode rows. Returns [T, heads, head_dim] in q's dtype."""
    T, heads, d = q.shape
    kvh, _, bs, _ = k_pages.shape
    group = heads // kvh
    width = inputs.tables.shape[1]
    n_chunks = width // chunk_pages
    span = chunk_pages * bs
    # head i uses kv head i // group, as the reference's repeat_interleave does
    qg = q.astype(jnp.float32).reshape(T, kvh, group, d) * scale
    token_tables = inputs.tables[inputs.token_seq] + page_offset  # [T, W]
    pos = inputs.positions[:, None, None, None]

    def chunk(c, carry):
        m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(token_tables, c * chunk_pages, chunk_pages, axis=1)
        k = k_pages[:, pages].reshape(kvh, T, span, d).astype(jnp.float32)
        v = v_pages[:, pages].reshape(kvh, T, span, d).astype(jnp.float32)
        s = jnp.einsum("tkgd,ktnd->tkgn", qg, k)
        kpos = c * span + jnp.arange(span)
        s = jnp.where(kpos <= pos, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("tkgn,ktnd->tkgd", p, v)
        return m_new, l, acc

    init = (jnp.full((T, kvh, group), MASK_VALUE, jnp.float32), jnp.zeros((T, kvh, group), jnp.float32),
            jnp.zeros((T, kvh, group, d), jnp.float32))
    if n_chunks == 1:
        _, l, acc = chunk(0, init)
    else:
        _, l, acc = jax.lax.fori_loop(0, n_chunks, chunk, init)
    return (acc / l[..., None]).reshape(T, heads, d).astype(q.dtype)


def pallas_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, inputs: PagedInputs,
                            scale: float, chunk_pages: int, page_offset=0) -> jax.Array:
    """A decode step (token i is sequence i) through the Pallas TPU kernel."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as kernel

    # the kernel applies no softmax scale of its own
    out = kernel((q * scale).astype(k_pages.dtype), k_pages, v_pages, inputs.seq_lens,
                 inputs.tables + page_offset, pages_per_compute_block=chunk_pages)
    # rows of padded sequences (length 0) are never written by the kernel
    return jnp.where(inputs.seq_lens[:, None, None] > 0, out, 0).astype(q.dtype)


def attend(plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array,
           v_pages: jax.Array, inputs: PagedInputs, scale: float, page_offset=0):
    """Write the step's k, v into the cache, then attend. Returns (out, k_pages, v_pages)."""
    k_pages, v_pages = write_kv(k_pages, v_pages, k, v, inputs.slots, page_offset)
    fn = pallas_decode_attention if plan.pallas else paged_attention
    out = fn(q, k_pages, v_pages, inputs, scale, plan.chunk_pages, page_offset)
    return out, k_pages, v_pages
