"""The CPU backend: KV pool in host memory, paged attention on torch SDPA, GGUF linear layers."""
from __future__ import annotations

import os

import torch

from ember.backend import Availability, Backend, BackendOptions, KVCacheSpec
from ember_cpu_gguf.attention import CpuPagedAttention
from ember_cpu_gguf.linear import DenseEmbedding, DenseLinear

GGUF_TYPES = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})


def physical_cores() -> int:
    """Physical cores available to this process: hyperthreads only slow matmuls down."""
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        avail = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        pairs = {(blk.split("physical id")[1].split("\n")[0], blk.split("core id")[1].split("\n")[0])
                 for blk in info.split("\n\n") if "core id" in blk and "physical id" in blk}
        if pairs:
            return max(1, min(avail, len(pairs)))
    except (OSError, IndexError):
        pass
    return max(1, avail)


class CpuGgufBackend(Backend):
    name = "cpu_gguf"
    device_type = "cpu"
    priority = 10
    quant_formats = GGUF_TYPES
    dtypes = ("float32",)
    description = "CPU, GGUF weights (dequantized to float32), paged attention on torch SDPA"

    def __init__(self, options: BackendOptions | None = None):
        super().__init__(options)
        threads = self.options.threads or physical_cores()
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
        self.threads = threads
        self._attention = CpuPagedAttention()
        self._kv_bytes = 0

    @classmethod
    def availability(cls) -> Availability:
        return Availability.yes()  # a CPU is always there

    def allocate_kv_cache(self, spec: KVCacheSpec):
        shape = (spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        caches = [(torch.zeros(shape, dtype=torch.float32), torch.zeros(shape, dtype=torch.float32))
                  for _ in range(spec.num_layers)]
        self._kv_bytes = spec.bytes_per_block() * spec.num_blocks
        return caches

    def memory_stats(self) -> dict[str, int]:
        return {"kv_cache_bytes": self._kv_bytes}

    def attention(self):
        return self._attention

    def create_linear(self, weights, biases=None):
        return DenseLinear(weights, biases)

    def create_embedding(self, weight):
        return DenseEmbedding(weight)
