"""Linear and embedding layers over GGUF weights.

QuantLinear (the default) keeps the weights quantized, repacked once at load for the C kernel in
csrc/quant_matmul.c, and quantizes activations to int8 per row and per 32 values. DenseLinear is
the reference: weights dequantized once to float32 with the core's code (exact mode, types the
kernel lacks, and machines without a C compiler). Where PyTorch has MKL, its matrices are packed
into MKL's GEMM layout: about a quarter faster than a plain float32 matmul at 64 rows, still
float32 numerics, and a row's result does not depend on the other rows in the batch.
"""
from __future__ import annotations

import ctypes
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from ember.gguf import quants

PACK_HINT_ROWS = 64  # the batch size MKL tunes its packing for; any row count works


def _mkl_packing() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class DenseLinear:
    def __init__(self, weights, biases=None, pack: bool = True):
        weight = torch.cat([w.dequantize() for w in weights], dim=0).contiguous()
        self.bias = None
        if biases and any(b is not None for b in biases):
            self.bias = torch.cat([b.dequantize().reshape(-1) for b in biases])
        self.out_features, self.in_features = weight.shape
        if pack and _mkl_packing():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_HINT_ROWS)
            # the op wants the original weight only for its shape: a zero-stride stand-in keeps
            # the float32 copy from staying resident next to the packed one
            self.shape_only = torch.zeros(1).expand(self.out_features, self.in_features)
            self.weight = None
        else:
            self.packed, self.weight = None, weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.mkl._mkl_linear(rows, self.packed, self.shape_only, self.bias, rows.shape[0])
        return y.view(*x.shape[:-1], self.out_features)


class QuantLinear:
    """Weights repacked into the kernel's 4- or 8-bit panels; y = x @ W.T (+ b) in one C call.

    Quantized formats only (see csrc/quant_matmul.c for the list); `QuantLinear.accepts` says
    whether a set of weights can take this path.
    """

    def __init__(self, weights, biases=None, threads: int = 1, kernels=None):
        from ember_cpu_gguf import native

        self.kernels = kernels or native.quant_matmul()
        if not self.accepts(weights, self.kernels):
            raise ValueError("QuantLinear needs quantized weights of one width, in types the kernel supports")
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
        n = len(weights)
        types = (ctypes.c_int * n)(*(int(w.qtype) for w in weights))
        ptrs = (ctypes.c_void_p * n)(*(b.ctypes.data for b in self.buffers))
        rows = (ctypes.c_int64 * n)(*(w.shape[0] for w in weights))
        self.bias = None
        if biases and any(b is not None for b in biases):
            self.bias = torch.cat([b.dequantize().reshape(-1) if b is not None else torch.zeros(w.shape[0])
                                   for w, b in zip(weights, biases)]).contiguous()
        self.nbytes = sum(b.nbytes for b in self.buffers)
        # the handle copies the part lists; it points into self.buffers and self.bias
        self._handle = self.kernels.new(n, types, ptrs, rows, self.in_features,
                                        self.bias.data_ptr() if self.bias is not None else None, threads)
        if not self._handle:
            raise MemoryError("cannot allocate the quantized linear's handle")
        weakref.finalize(self, self.kernels.free, self._handle)

    @staticmethod
    def accepts(weights, kernels) -> bool:
        if kernels is None or not weights:
            return False
        k = weights[0].shape[1]
        return (all(len(w.shape) == 2 and w.shape[1] == k for w in weights) and k % 32 == 0
                and all(kernels.supported(int(w.qtype)) for w in weights)
                and all(kernels.repacked_size(int(w.qtype), w.shape[0], k) > 0 for w in weights))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the common case, [tokens, in_features] float32 rows, goes straight through: this runs
        # 121 times per token for a 30-layer model
        if x.dim() == 2 and x.dtype == torch.float32 and x.stride(1) == 1 and x.shape[1] == self.in_features:
            rows = x
        else:
            rows = x.reshape(-1, self.in_features)
            if rows.dtype != torch.float32 or rows.stride(-1) != 1:
                rows = rows.float().contiguous()
        y = torch.empty(rows.shape[0], self.out_features)
        rc = self.kernels.run(self._handle, rows.data_ptr(), rows.stride(0), rows.shape[0], y.data_ptr())
        if rc != 0:
            raise RuntimeError(f"quantized linear failed (code {rc}: -1 out of memory, -2 bad shape)")
        return y if rows is x else y.view(*x.shape[:-1], self.out_features)


class QuantizedEmbedding:
    """The embedding table stays as the file has it (a view of the mapped file); only the rows a
    step looks up are dequantized, with the same reference code, so the values are identical."""

    def __init__(self, weight):
        self.weight = weight
        self.vocab, self.dim = weight.shape

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.weight.data[flat.numpy()]
        out = quants.dequantize(rows, self.weight.qtype, (flat.numel(), self.dim))
        return out.view(*ids.shape, self.dim)
