"""The CPU backend: KV pool in host memory, paged attention over a head-major block pool, GGUF linear layers."""
from __future__ import annotations

import logging
import mmap
import os

import numpy as np

from ember.backend import Availability, Backend, BackendOptions, KVCacheSpec, host_memory_available
from ember_cpu_gguf import native

log = logging.getLogger(__name__)

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


def _lazy_zeros(shape, dtype) -> np.ndarray:
    """Zeros whose pages the OS commits only when first written, 4 KiB at a time. Zeros matter:
    padded attention reads unused slots and multiplies them by 0, and 0 * NaN is NaN. Not numpy's
    zeros: numpy asks for transparent huge pages on large arrays, and the pool is head-major, so a
    short sequence's few slots in each head would commit 2 MiB apiece (650 MB for one short chat
    with SmolLM2, measured)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class CpuGgufBackend(Backend):
    name = "cpu_gguf"
    device_type = "cpu"
    priority = 10
    # GGUF's types, the grouped integers of AWQ, GPTQ and compressed-tensors (ember.quant.grouped),
    # and FP8 (ember.quant.fp8)
    quant_formats = GGUF_TYPES | {"int4", "int8", "fp8"}
    dtypes = ("float32", "float16")
    description = ("CPU, GGUF weights kept quantized (integer kernels on two int8 terms per activation, or "
                   "one with --int8-activations; --exact: float32 reference), "
                   "paged attention over a head-major block pool")

    def __init__(self, options: BackendOptions | None = None):
        super().__init__(options)
        threads = self.options.threads or physical_cores()
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self._attention = None
        self._kv_bytes = 0

    def _torch(self):
        """torch, with its intra-op pool sized to ours. Imported only by the torch-facing parts of
        the contract: the native runner never needs it, and importing it costs 1.3 s."""
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return torch

    @classmethod
    def availability(cls) -> Availability:
        return Availability.yes()  # a CPU is always there

    @classmethod
    def details(cls) -> str:
        return native.describe()

    def kv_cache_dtype(self) -> str:
        # float16 halves the bytes every decode step streams (llama.cpp's default too); exact mode
        # keeps float32, the reference's
        return "float32" if self.options.exact else "float16"

    def available_kv_memory(self) -> int:
        """The host's available memory: allocate_kv_arrays refuses more."""
        return host_memory_available() or 2 * 1024**3

    def default_kv_memory(self) -> int:
        """A third of the memory free now, at most 4 GiB: pages are only committed as the cache
        fills (see allocate_kv_cache), so a generous pool costs nothing until it is used."""
        return min(4 * 1024**3, self.available_kv_memory() // 3)

    def allocate_kv_arrays(self, spec: KVCacheSpec) -> list[tuple[np.ndarray, np.ndarray]]:
        """The paged pool as numpy arrays, one (keys, values) pair per layer: head-major, keys
        transposed within each block (see attention.py)."""
        if spec.block_size > 64:
            raise ValueError(f"cpu_gguf supports KV blocks of at most 64 tokens, got {spec.block_size}")
        if spec.dtype not in ("float32", "float16"):
            raise ValueError(f"cpu_gguf keeps its KV cache in float32 or float16, not {spec.dtype}")
        need, avail = spec.bytes_per_block() * spec.num_blocks, self.available_kv_memory()
        if need > avail:
            # the pages would only be committed as the cache fills, so this would "work" until a
            # long enough run met the OOM killer; better to say so now
            raise MemoryError(f"a KV cache of {need / 2**30:.2f} GiB does not fit in the {avail / 2**30:.2f} GiB "
                              f"of memory available; lower --kv-cache-memory")
        kshape = (spec.num_kv_heads, spec.num_blocks, spec.head_dim, spec.block_size)
        vshape = (spec.num_kv_heads, spec.num_blocks, spec.block_size, spec.head_dim)
        dt = np.dtype(spec.dtype)
        arrays = [(_lazy_zeros(kshape, dt), _lazy_zeros(vshape, dt)) for _ in range(spec.num_layers)]
        self._kv_bytes = spec.bytes_per_block() * spec.num_blocks
        return arrays

    def allocate_kv_cache(self, spec: KVCacheSpec):
        torch = self._torch()
        return [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in self.allocate_kv_arrays(spec)]

    def memory_stats(self) -> dict[str, int]:
        return {"kv_cache_bytes": self._kv_bytes}

    def attention(self):
        if self._attention is None:
            self._torch()
            from ember_cpu_gguf.attention import CpuPagedAttention

            self._attention = CpuPagedAttention(threads=self.threads)
        return self._attention

    def create_linear(self, weights, biases=None):
        self._torch()
        from ember_cpu_gguf.linear import DenseLinear, QuantLinear

        kernels = None if self.options.exact else native.quant_matmul()
        if QuantLinear.accepts(weights, kernels):
            return QuantLinear(weights, biases, threads=self.threads, kernels=kernels,
                               one_term=self.options.int8_activations)
        return DenseLinear(weights, biases)

    def layer_ops(self):
        self._torch()
        from ember_cpu_gguf.layer_ops import NativeLayerOps

        lib = None if self.options.exact else native.layer_ops()
        return NativeLayerOps(lib, self.threads) if lib is not None else super().layer_ops()

    def create_embedding(self, weight):
        self._torch()
        from ember_cpu_gguf.linear import QuantizedEmbedding

        return QuantizedEmbedding(weight)

    def create_model_runner(self, model_config, weights, cache_config):
        """The native runner (one C call per step, no torch) wherever it covers the model; the
        core's torch runner, over this backend's kernels, everywhere else."""
        from ember_cpu_gguf import runner

        why = runner.unsupported(self, model_config, weights)
        if why is None:
            return runner.NativeModelRunner(self, model_config, weights, cache_config)
        log.info("cpu_gguf runs %s with the torch runner: %s", model_config.architecture, why)
        self._torch()
        return super().create_model_runner(model_config, weights, cache_config)
