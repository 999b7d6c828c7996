"""Linear and embedding layers over GGUF weights.

QuantLinear (the default) keeps the weights quantized, repacked once at load for the C kernel in
csrc/quant_matmul.c, and quantizes activations to int8 per row and per 32 values. DenseLinear is
the reference: weights dequantized once to float32 with the core's code (exact mode, types the
kernel lacks, and machines without a C compiler). Where PyTorch has MKL, its matrices are packed
into MKL's GEMM layout: about a quarter faster than a plain float32 matmul at 64 rows, still
float32 numerics, and a row's result does not depend on the other rows in the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.gguf import quants
from ember_cpu_gguf.packed import PackedLinear

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
    """Weights repacked into the kernel's 4- or 8-bit panels (packed.PackedLinear); y = x @ W.T
    (+ b) in one C call. `QuantLinear.accepts` says whether a set of weights can take this path."""

    accepts = staticmethod(PackedLinear.accepts)

    def __init__(self, weights, biases=None, threads: int = 1, kernels=None, one_term: bool = False):
        self.packed = PackedLinear(weights, biases, threads, kernels, one_term=one_term)
        self.in_features, self.out_features = self.packed.in_features, self.packed.out_features
        self.nbytes = self.packed.nbytes

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
        self.packed.run(rows.data_ptr(), rows.stride(0), rows.shape[0], y.data_ptr())
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
