"""Reference dequantization of GGML quant formats, in torch.

This is the numerical source of truth for every quantized kernel: each format follows the
operation order of gguf.quants (itself a port of ggml-quants.c) so results match it bit for bit.
Scale products are formed first and then applied: (d * sc) * q - (dmin * m), never d * (sc * q).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from .reader import GGUFError

if TYPE_CHECKING:
    import torch

QK_K = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Bytes [n, 2] -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """[n, groups*width] packed bytes -> [n, groups*2*width]: low nibbles of a group, then high."""
    n = qs.shape[0]
    shifts = torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    return ((qs.reshape(n, groups, 1, width) >> shifts) & 0x0F).reshape(n, -1)


def _bits(b: torch.Tensor, nbits: int, groups: int, width: int) -> torch.Tensor:
    """Unpack fields of `nbits` from [n, groups*width] bytes: field k of every byte in a group
    of `width` bytes forms the k-th run of `width` values."""
    n, per = b.shape[0], 8 // nbits
    shifts = torch.arange(0, 8, nbits, dtype=torch.uint8).view(1, 1, per, 1)
    return ((b.reshape(n, groups, 1, width) >> shifts) & ((1 << nbits) - 1)).reshape(n, -1)


def _qh_bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> its 32 bits [n, 32], bit j at column j."""
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 1, 8)
    return ((qh.reshape(-1, 4, 1) >> shifts) & 1).reshape(-1, 32)


def _q4_0(b):
    q = _nibbles(b[:, 2:], 1, 16).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b):
    q = _nibbles(b[:, 4:], 1, 16).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q5_0(b):
    q = (_nibbles(b[:, 6:], 1, 16) | (_qh_bits32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def _q5_1(b):
    q = (_nibbles(b[:, 8:], 1, 16) | (_qh_bits32(b[:, 4:8]) << 4)).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 2, 2, 32).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    # 16 six-bit scales: low 4 bits from bytes 0..7 (low nibbles, then high), high 2 bits from 8..11
    low = _nibbles(scales[:, :8], 1, 8)
    high = _bits(scales[:, 8:12], 2, 1, 4)
    sc = ((low | ((high & 0x03) << 4)).to(torch.int16) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs, 2, 2, 32).reshape(n, 16, 16)
    qh = _bits(hmask, 1, 1, 32).reshape(n, 16, 16) ^ 1  # a set mask bit means no -4 offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 4, 32).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:], 4, 32)
    qh = _bits(b[:, 16:48], 1, 1, 32)
    q = (ql | (qh << 4)).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, 2, 64)
    high = _bits(qh, 2, 2, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


_BLOCK_DEQUANT: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}
_FLOAT_DTYPES = {Q.F32: "float32", Q.F16: "float16", Q.BF16: "bfloat16"}  # torch dtype names
SUPPORTED_QTYPES: frozenset[Q] = frozenset(_FLOAT_DTYPES) | frozenset(_BLOCK_DEQUANT)


def _check_supported(qtype) -> Q:
    try:
        qtype = Q(qtype)
    except ValueError:
        raise GGUFError(f"unknown GGML tensor type {qtype!r}") from None
    if qtype not in SUPPORTED_QTYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_QTYPES))
        raise GGUFError(f"dequantization of {qtype.name} is not supported (supported: {names})")
    return qtype


def row_nbytes(qtype, n_cols: int) -> int:
    """Bytes of one row of `n_cols` values; GGML quantizes each row independently."""
    qtype = _check_supported(qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_cols <= 0 or n_cols % block:
        raise GGUFError(f"{qtype.name}: row of {n_cols} values is not a positive multiple of "
                        f"the block size {block}")
    return n_cols // block * type_size


def dequantize(raw: np.ndarray | torch.Tensor, qtype, shape: Sequence[int]) -> torch.Tensor:
    """Dequantize rows stored back to back in `raw` (uint8) into a float32 tensor of `shape`."""
    # Bound module-wide for the block helpers, here rather than at the top: reading a model's
    # config and weights (ember.gguf.loader imports this module) must not pull torch in.
    global torch
    import torch

    qtype = _check_supported(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise GGUFError("dequantize needs a non-empty shape")
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    expected = n_rows * row_nbytes(qtype, shape[-1])
    b, owned = _as_uint8(raw)
    if b.numel() != expected:
        raise GGUFError(f"{qtype.name} tensor of shape {list(shape)} needs {expected} bytes, "
                        f"got {b.numel()}")
    b = b.reshape(-1)
    if qtype in _FLOAT_DTYPES:
        out = b.view(getattr(torch, _FLOAT_DTYPES[qtype])).float()
        if qtype == Q.F32 and not owned:
            out = out.clone()  # never alias the caller's buffer
        return out.reshape(shape)
    _, type_size = GGML_QUANT_SIZES[qtype]
    return _BLOCK_DEQUANT[qtype](b.reshape(-1, type_size)).reshape(shape)


def _as_uint8(raw) -> tuple[torch.Tensor, bool]:
    """A contiguous uint8 torch tensor, and whether it is a private copy."""
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise TypeError(f"raw bytes must be uint8, got {raw.dtype}")
        return raw.contiguous(), False
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise TypeError(f"raw bytes must be uint8, got {arr.dtype}")
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        # torch cannot wrap read-only memory (mmap views) without a warning; a byte copy is
        # small next to the float32 result.
        return torch.from_numpy(np.array(arr, copy=True, order="C")), True
    return torch.from_numpy(arr), False
