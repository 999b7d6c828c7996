"""GGUF weights as float32 matrices, dequantized once at load with the core's reference code."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseLinear:
    def __init__(self, weights, biases=None):
        self.weight = torch.cat([w.dequantize() for w in weights], dim=0).contiguous()
        self.bias = None
        if biases and any(b is not None for b in biases):
            self.bias = torch.cat([b.dequantize().reshape(-1) for b in biases])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class DenseEmbedding:
    def __init__(self, weight):
        self.weight = weight.dequantize()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
