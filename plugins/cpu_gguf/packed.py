"""GGUF weights repacked for csrc/quant_matmul.c (float ones kept as they are, for
csrc/float_matmul.h), without torch.

A PackedLinear holds one (possibly fused) layer's panels and the C handle that runs it; the torch
layer (linear.QuantLinear) and the native model runner (runner.py) both drive the same handles.
"""
from __future__ import annotations

import ctypes
import weakref

import numpy as np

# csrc/quant_matmul.c's EMBER_QMM_ONE_TERM: one int8 term per activation instead of two (the
# --int8-activations option)
ONE_TERM = 1
# GGML's F32, F16 and BF16, and FP8 with its scales by row (T_F8_ROW) or by 128 columns (T_F8_B128):
# csrc/float_matmul.h runs them (weights kept as the file has them)
F8_ROW, F8_B128 = 256 + 32, 256 + 33
FLOAT_TYPES = (0, 1, 30, F8_ROW, F8_B128)
# csrc/quant_matmul.c's T_G4 and T_G8: AWQ, GPTQ and compressed-tensors integers (ember.quant.grouped)
GROUPED_TYPES = {4: 256 + 4, 8: 256 + 8}


def type_id(w) -> int:
    """The kernel's type id for a weight: its GGML type, or T_G4 / T_G8 for grouped integers."""
    fmt = getattr(w, "format", None)
    if fmt in ("int4", "int8"):
        return GROUPED_TYPES[w.bits]
    if fmt == "fp8":
        return F8_ROW if w.block == w.shape[1] else F8_B128 if w.block == 128 else -1
    return int(w.qtype)


def dequantize_np(weight) -> np.ndarray:
    """A GGUF tensor as float32 numpy, through the gguf package's own dequantizers (the same
    values as the core's reference dequantize; the tests check it)."""
    from gguf.quants import dequantize

    return np.ascontiguousarray(dequantize(weight.data, weight.qtype), dtype=np.float32).reshape(weight.shape)


class PackedLinear:
    """y = x @ W.T (+ b) for weights concatenated along the output dimension, in one C call."""

    def __init__(self, weights, biases=None, threads: int = 1, kernels=None, one_term: bool = False):
        from ember_cpu_gguf import native

        self.kernels = kernels or native.quant_matmul()
        if not self.accepts(weights, self.kernels):
            raise ValueError("PackedLinear needs quantized weights of one width, in types the kernel supports")
        self.one_term = one_term
        self.in_features = weights[0].shape[1]
        self.out_features = sum(w.shape[0] for w in weights)
        self.buffers = []
        for w in weights:
            rows, t = w.shape[0], type_id(w)
            if t in (0, 1, 30) and w.data.flags.c_contiguous:
                # F32/F16/BF16 rows are read as the file has them: the kernel points into the mapped
                # file (which lives as long as this view), no copy. Pages the engine lets go
                # (release_pages) come back from the page cache as the kernel reads them.
                self.buffers.append(w.data.reshape(-1))
                continue
            buf = np.empty(self.kernels.repacked_size(t, rows, self.in_features), dtype=np.uint8)
            if t in GROUPED_TYPES.values():
                u, sc, mn = w.arrays
                per = w.group_size // 32  # a group of 64 or 128 is several of 32 with one scale
                s32, m32 = np.repeat(sc, per, axis=1), np.repeat(mn, per, axis=1)
                rc = self.kernels.repack_grouped(t, u.ctypes.data, s32.ctypes.data, m32.ctypes.data, rows,
                                                 self.in_features, buf.ctypes.data, threads)
            else:
                src = np.ascontiguousarray(w.data)
                if t in (F8_ROW, F8_B128):  # the rows' bytes, then their scales
                    src = np.concatenate([src.reshape(-1), w.scales.reshape(-1).view(np.uint8)])
                rc = self.kernels.repack(t, src.ctypes.data, rows, self.in_features, buf.ctypes.data, threads)
            if rc != 0:
                raise ValueError(f"{w.name}: cannot repack its {getattr(w, 'format', None) or w.qtype.name} "
                                 f"weights (code {rc})")
            self.buffers.append(buf)
            if getattr(w, "release", None) is not None:
                w.release()  # the panels are our copy: the file's pages can leave the resident set
        self.bias = None
        if biases and any(b is not None for b in biases):
            self.bias = np.concatenate([dequantize_np(b).reshape(-1) if b is not None
                                        else np.zeros(w.shape[0], np.float32) for w, b in zip(weights, biases)])
        self.nbytes = sum(b.nbytes for b in self.buffers)
        n = len(weights)
        types = (ctypes.c_int * n)(*(type_id(w) for w in weights))
        ptrs = (ctypes.c_void_p * n)(*(b.ctypes.data for b in self.buffers))
        rows = (ctypes.c_int64 * n)(*(w.shape[0] for w in weights))
        # the handle copies the part lists; it points into self.buffers and self.bias
        self.handle = self.kernels.new(n, types, ptrs, rows, self.in_features,
                                       self.bias.ctypes.data if self.bias is not None else None, threads,
                                       ONE_TERM if one_term else 0)
        if not self.handle:
            raise MemoryError("cannot allocate the quantized linear's handle")
        weakref.finalize(self, self.kernels.free, self.handle)
        perm = getattr(weights[0], "perm", None)
        self.perm = None if perm is None else np.ascontiguousarray(perm, dtype=np.int64)
        if self.perm is not None:  # GPTQ's act order: the C side reads x through it
            self.kernels.set_perm(self.handle, self.perm.ctypes.data)

    @staticmethod
    def accepts(weights, kernels) -> bool:
        if kernels is None or not weights:
            return False
        k = weights[0].shape[1]
        types = [type_id(w) for w in weights]
        floats = sum(t in FLOAT_TYPES for t in types)
        perms = [getattr(w, "perm", None) for w in weights]
        same_perm = (all(p is None for p in perms)
                     or all(p is not None and np.array_equal(p, perms[0]) for p in perms))
        return (all(len(w.shape) == 2 and w.shape[1] == k for w in weights) and k % 32 == 0
                and floats in (0, len(weights))  # float and quantized parts run different kernels
                and same_perm  # one input order for the fused parts
                and all(getattr(w, "group_size", 32) % 32 == 0 for w in weights)
                and all(kernels.supported(t) for t in types)
                and all(kernels.repacked_size(t, w.shape[0], k) > 0 for t, w in zip(types, weights)))

    def run(self, x_ptr: int, ldx: int, rows: int, y_ptr: int) -> None:
        rc = self.kernels.run(self.handle, x_ptr, ldx, rows, y_ptr)
        if rc != 0:
            raise RuntimeError(f"quantized linear failed (code {rc}: -1 out of memory, -2 bad shape)")
