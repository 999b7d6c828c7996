"""Linear and embedding layers over weights dequantized once, at load, to the compute dtype.

GGUF's block formats have no kernels on Intel GPUs here, so every weight is expanded to a dense
matrix in device memory: a Q4 model takes about four times its file size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dense(weights, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The parts (QuantWeights of one input width) dequantized, cast and stacked along the output
    dimension, on the device. Cast on the host part by part: only one float32 part at a time."""
    parts = [w.dequantize().to(dtype) for w in weights]
    widths = {p.shape[-1] for p in parts}
    if len(widths) != 1:
        names = ", ".join(f"{w.name} {tuple(w.shape)}" for w in weights)
        raise ValueError(f"fused linear parts must share their input width; got {names}")
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(device)


def dense_bias(weights, biases, dtype: torch.dtype, device: str) -> torch.Tensor | None:
    """The biases of the parts in the same order, zeros for a part that has none."""
    if not biases or all(b is None for b in biases):
        return None
    parts = [b.dequantize().reshape(-1).to(dtype) if b is not None else torch.zeros(w.shape[0], dtype=dtype)
             for w, b in zip(weights, biases, strict=True)]
    return torch.cat(parts).to(device)


class DenseLinear:
    """y = x @ W.T + b with W [out, in] in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # inputs arrive in float32 from the norms and RoPE (the core keeps those in float32)
        return F.linear(x.to(device=self.weight.device, dtype=self.weight.dtype), self.weight, self.bias)


class Embedding:
    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.table.device), self.table)
