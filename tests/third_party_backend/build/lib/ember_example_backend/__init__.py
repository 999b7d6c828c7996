"""A backend written against ember's public contract only: ember.backend and ember.plugins.

It runs everything with the core's reference ops (float64 attention, dequantize-then-matmul), so
it is slow but exact: the smallest thing a plugin author can start from.
"""
import torch
import torch.nn.functional as F

from ember.backend import Availability, Backend
from ember.ops import reference
from ember.plugins import hookimpl


class ReferenceAttention:
    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        return reference.paged_attention(q, k, v, k_cache, v_cache, meta, scale)


class ReferenceLinear:
    def __init__(self, weights, biases=None):
        self.weights, self.biases = weights, biases
        self.w = torch.cat([w.dequantize() for w in weights])

    def __call__(self, x):
        y = x @ self.w.T
        if self.biases and any(b is not None for b in self.biases):
            y = y + torch.cat([b.dequantize().reshape(-1) for b in self.biases])
        return y


class ExampleBackend(Backend):
    name = "example"
    device_type = "cpu"
    priority = -5  # never chosen by --device auto over a real backend
    quant_formats = frozenset({"F32", "F16", "Q4_0", "Q4_1", "Q8_0"})
    description = "reference kernels (third-party example)"

    @classmethod
    def availability(cls):
        return Availability.yes()

    def allocate_kv_cache(self, spec):
        shape = (spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(spec.num_layers)]

    def attention(self):
        return ReferenceAttention()

    def create_linear(self, weights, biases=None):
        return ReferenceLinear(weights, biases)

    def create_embedding(self, weight):
        table = weight.dequantize()
        return lambda ids: F.embedding(ids, table)


@hookimpl
def ember_register_backends(register):
    register(ExampleBackend)
