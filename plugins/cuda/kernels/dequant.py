"""GGUF dequantization: raw block bytes -> a float16, bfloat16 or float32 matrix.

Bit for bit the core reference (ember.gguf.quants.dequantize), itself gguf.quants' operation
order: each value is formed in float32 with the same products in the same order (scale products
first, (d * sc) * q - (dmin * m)), then rounded once to the output type. The kernels read every
block field by its byte offset; the float16 scales (each at an even offset: every block size is
even) are read through a float16 view of the same bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from .launch import DeviceSpec, describe


def launch_config(dev: DeviceSpec, qtype: Q) -> dict:
    values, _ = GGML_QUANT_SIZES[qtype]
    if dev.interpreter:
        # the interpreter pays per program, not per value: few large programs load a model in
        # seconds where 2048-value ones take minutes
        return {"BLOCKS": 65536 // values, "num_warps": 4, "enable_fp_fusion": False}
    # about 2048 values a program; a load-time pass bound by memory
    # no fused multiply-add: it would round d * q + m once where the reference rounds twice
    return {"BLOCKS": 2048 // values, "num_warps": 4, "enable_fp_fusion": False}


@triton.jit
def _blocks(BLOCKS: tl.constexpr, n_blocks):
    b = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    return b, b < n_blocks


@triton.jit
def _rounded(x, out_ptr):
    """float32 x in the output's type, rounded to nearest even."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # by hand: Triton's interpreter truncates float32 -> bfloat16 (triton 3.9), and these
        # results must equal torch's; for finite x this is what the GPU's conversion gives
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _q4_0_kernel(raw_ptr, half_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    b, ok = _blocks(BLOCKS, n_blocks)  # 18 bytes: d (f16), 16 bytes of nibbles
    j = tl.arange(0, 32)[None, :]  # low nibbles give values 0..15, high nibbles 16..31
    d = tl.load(half_ptr + b * 9, mask=ok, other=0.0).to(tl.float32)[:, None]
    byte = tl.load(raw_ptr + b[:, None] * 18 + 2 + j % 16, mask=ok[:, None], other=0).to(tl.int32)
    q = ((byte >> (4 * (j // 16))) & 0xF) - 8
    tl.store(out_ptr + b[:, None] * 32 + j, _rounded(d * q.to(tl.float32), out_ptr),
             mask=ok[:, None])


@triton.jit
def _q4_1_kernel(raw_ptr, half_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    b, ok = _blocks(BLOCKS, n_blocks)  # 20 bytes: d, m (f16), 16 bytes of nibbles
    j = tl.arange(0, 32)[None, :]
    d = tl.load(half_ptr + b * 10, mask=ok, other=0.0).to(tl.float32)[:, None]
    m = tl.load(half_ptr + b * 10 + 1, mask=ok, other=0.0).to(tl.float32)[:, None]
    byte = tl.load(raw_ptr + b[:, None] * 20 + 4 + j % 16, mask=ok[:, None], other=0).to(tl.int32)
    q = (byte >> (4 * (j // 16))) & 0xF
    tl.store(out_ptr + b[:, None] * 32 + j, _rounded(d * q.to(tl.float32) + m, out_ptr),
             mask=ok[:, None])


@triton.jit
def _q8_0_kernel(raw_ptr, half_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    b, ok = _blocks(BLOCKS, n_blocks)  # 34 bytes: d (f16), 32 int8
    j = tl.arange(0, 32)[None, :]
    d = tl.load(half_ptr + b * 17, mask=ok, other=0.0).to(tl.float32)[:, None]
    q = tl.load(raw_ptr + b[:, None] * 34 + 2 + j, mask=ok[:, None], other=0).to(tl.int8, bitcast=True)
    tl.store(out_ptr + b[:, None] * 32 + j, _rounded(q.to(tl.float32) * d, out_ptr),
             mask=ok[:, None])


@triton.jit
def _q4_k_kernel(raw_ptr, half_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    # 144 bytes: d, dmin (f16), 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles;
    # value 32 * s + i belongs to sub-block s
    b, ok = _blocks(BLOCKS, n_blocks)
    blk = b[:, None, None]
    bok = ok[:, None, None]
    s = tl.arange(0, 8)[None, :, None]
    i = tl.arange(0, 32)[None, None, :]
    base = raw_ptr + blk * 144
    # scales bytes 0..3 hold sc[0..3] (and the top bits of sc[4..7]), bytes 4..7 the same for
    # the mins, bytes 8..11 the low bits of sc[4..7] and mn[4..7] as nibbles
    lo_sc = tl.load(base + 4 + s % 4, mask=bok, other=0).to(tl.int32)
    lo_mn = tl.load(base + 8 + s % 4, mask=bok, other=0).to(tl.int32)
    hi = tl.load(base + 12 + s % 4, mask=bok, other=0).to(tl.int32)
    sc = tl.where(s < 4, lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 2) & 0x30))
    mn = tl.where(s < 4, lo_mn & 0x3F, (hi >> 4) | ((lo_mn >> 2) & 0x30))
    d = tl.load(half_ptr + blk * 72, mask=bok, other=0.0).to(tl.float32) * sc.to(tl.float32)
    dm = tl.load(half_ptr + blk * 72 + 1, mask=bok, other=0.0).to(tl.float32) * mn.to(tl.float32)
    # 32 bytes per pair of sub-blocks: the low nibbles are the first of the pair
    byte = tl.load(base + 16 + (s // 2) * 32 + i, mask=bok, other=0).to(tl.int32)
    q = (byte >> (4 * (s % 2))) & 0xF
    tl.store(out_ptr + blk * 256 + s * 32 + i, _rounded(d * q.to(tl.float32) - dm, out_ptr),
             mask=bok)


@triton.jit
def _q6_k_kernel(raw_ptr, half_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    # 210 bytes: 128 of low nibbles, 64 of 2-bit high parts, 16 int8 scales, d (f16);
    # value 16 * s + i has scale s
    b, ok = _blocks(BLOCKS, n_blocks)
    blk = b[:, None, None]
    bok = ok[:, None, None]
    s = tl.arange(0, 16)[None, :, None]
    i = tl.arange(0, 16)[None, None, :]
    base = raw_ptr + blk * 210
    # each half of 128 values: 64 low-nibble bytes (low nibbles first), 32 bytes of four
    # 2-bit fields (the lowest field first)
    w = (s % 8) * 16 + i
    part = s // 8
    lo = tl.load(base + part * 64 + w % 64, mask=bok, other=0).to(tl.int32)
    hi = tl.load(base + 128 + part * 32 + w % 32, mask=bok, other=0).to(tl.int32)
    q = (((lo >> (4 * (w // 64))) & 0xF) | (((hi >> (2 * (w // 32))) & 0x3) << 4)) - 32
    scale = tl.load(base + 192 + s, mask=bok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    d = tl.load(half_ptr + blk * 105 + 104, mask=bok, other=0.0).to(tl.float32) * scale
    tl.store(out_ptr + blk * 256 + s * 16 + i, _rounded(d * q.to(tl.float32), out_ptr),
             mask=bok)


KERNELS = {Q.Q4_0: _q4_0_kernel, Q.Q4_1: _q4_1_kernel, Q.Q8_0: _q8_0_kernel,
           Q.Q4_K: _q4_k_kernel, Q.Q6_K: _q6_k_kernel}


def dequantize(raw: torch.Tensor, qtype, shape, dtype: torch.dtype = torch.float16,
               config: dict | None = None) -> torch.Tensor:
    """Rows stored back to back in `raw` (uint8, on the kernel's device) -> a `dtype` tensor of
    `shape`, as ember.gguf.quants.dequantize (which returns float32) gives it."""
    qtype = Q(qtype)
    if qtype not in KERNELS:
        names = ", ".join(t.name for t in KERNELS)
        raise ValueError(f"no dequantize kernel for {qtype.name} (these have one: {names})")
    values, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw bytes must be uint8, got {raw.dtype}")
    if not shape or shape[-1] % values or raw.numel() != numel // values * type_size:
        raise ValueError(f"{qtype.name} tensor of shape {list(shape)} does not fit {raw.numel()} bytes "
                         f"(rows must be whole {values}-value blocks of {type_size} bytes)")
    raw = raw.contiguous().reshape(-1)
    out = torch.empty(shape, dtype=dtype, device=raw.device)
    n_blocks = numel // values
    if n_blocks == 0:
        return out
    config = config or launch_config(describe(raw.device), qtype)
    KERNELS[qtype][(triton.cdiv(n_blocks, config["BLOCKS"]),)](
        raw, raw.view(torch.float16), out, n_blocks, **config)
    return out
