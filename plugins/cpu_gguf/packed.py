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
# GGML's F32, F16 and BF16: csrc/float_matmul.h runs them (weights kept as the file has them)
FLOAT_TYPES = (0, 1, 30)


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
            rows, qtype = w.shape[0], int(w.qtype)
            src = np.ascontiguousarray(w.data)
            buf = np.empty(self.kernels.repacked_size(qtype, rows, self.in_features), dtype=np.uint8)
            rc = self.kernels.repack(qtype, src.ctypes.data, rows, self.in_features, buf.ctypes.data, threads)
            if rc != 0:
                raise ValueError(f"{w.name}: cannot repack {w.qtype.name} weights (code {rc})")
            self.buffers.append(buf)
            if getattr(w, "release", None) is not None:
                w.release()  # the panels are our copy: the file's pages can leave the resident set
        self.bias = None
        if biases and any(b is not None for b in biases):
            self.bias = np.concatenate([dequantize_np(b).reshape(-1) if b is not None
                                        else np.zeros(w.shape[0], np.float32) for w, b in zip(weights, biases)])
        self.nbytes = sum(b.nbytes for b in self.buffers)
        n = len(weights)
        types = (ctypes.c_int * n)(*(int(w.qtype) for w in weights))
        ptrs = (ctypes.c_void_p * n)(*(b.ctypes.data for b in self.buffers))
        rows = (ctypes.c_int64 * n)(*(w.shape[0] for w in weights))
        # the handle copies the part lists; it points into self.buffers and self.bias
        self.handle = self.kernels.new(n, types, ptrs, rows, self.in_features,
                                       self.bias.ctypes.data if self.bias is not None else None, threads,
                                       ONE_TERM if one_term else 0)
        if not self.handle:
            raise MemoryError("cannot allocate the quantized linear's handle")
        weakref.finalize(self, self.kernels.free, self.handle)

    @staticmethod
    def accepts(weights, kernels) -> bool:
        if kernels is None or not weights:
            return False
        k = weights[0].shape[1]
        floats = sum(int(w.qtype) in FLOAT_TYPES for w in weights)
        return (all(len(w.shape) == 2 and w.shape[1] == k for w in weights) and k % 32 == 0
                and floats in (0, len(weights))  # float and quantized parts run different kernels
                and all(kernels.supported(int(w.qtype)) for w in weights)
                and all(kernels.repacked_size(int(w.qtype), w.shape[0], k) > 0 for w in weights))

    def run(self, x_ptr: int, ldx: int, rows: int, y_ptr: int) -> None:
        rc = self.kernels.run(self.handle, x_ptr, ldx, rows, y_ptr)
        if rc != 0:
            raise RuntimeError(f"quantized linear failed (code {rc}: -1 out of memory, -2 bad shape)")
