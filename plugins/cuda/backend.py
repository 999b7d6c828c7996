"""The cuda backend: NVIDIA GPUs through PyTorch, with ember's Triton kernels for paged attention,
the K/V write and GGUF dequantization, and cuBLAS (torch) for the matmuls.

GGUF weights are dequantized once, at load, on the GPU, to the compute dtype (bfloat16 by
default). A fused dequantize-matmul would read 3-4x fewer weight bytes per decode step at batch 1;
it is the next kernel to measure against this on a card.

Importing this module must not import triton or touch the GPU: ``ember plugins`` imports it on
machines without either, to say why the backend cannot run.
"""
from __future__ import annotations

import importlib.util
import logging
import os

from ember.backend import Availability, Backend, BackendOptions, KVCacheSpec, host_memory_available, torch_version_info

log = logging.getLogger(__name__)

# Every GGUF type the core dequantizes. The five with a Triton kernel are dequantized on the GPU;
# the rest on the host (the core's reference dequantization), then uploaded.
GGUF_TYPES = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


def torch_build() -> dict[str, str | None]:
    """torch's version, CUDA and HIP versions, read without importing torch (see
    ember.backend.torch_version_info)."""
    info = torch_version_info()
    return {key: info.get(key) for key in ("__version__", "cuda", "hip")}


def _triton_missing() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'ember[cuda]')"
    return ""


class CudaBackend(Backend):
    name = "cuda"
    device_type = "cuda"
    priority = 50
    quant_formats = GGUF_TYPES
    dtypes = ("bfloat16", "float16", "float32")
    description = ("NVIDIA GPUs: Triton paged attention (varlen prefill, split-K decode), GGUF weights "
                   "dequantized on the GPU, CUDA graphs for decode, sampling on the device")
    device = "cuda"
    attention_tiles: dict | None = None  # launch settings over the kernels' defaults

    def __init__(self, options: BackendOptions | None = None):
        super().__init__(options)
        self._kv_bytes = 0
        self._attention = None
        self._shared: dict[tuple[int, str], tuple[object, object]] = {}
        # Set by the model runner's profiling pass: bytes the device may give the KV cache.
        self.kv_budget: int | None = None

    # --- availability -------------------------------------------------------------------------
    @classmethod
    def availability(cls) -> Availability:
        build = torch_build()
        if build["hip"] is not None:
            return Availability.no(f"this PyTorch ({build['__version__']}) is a ROCm build: the rocm backend runs it")
        if build["cuda"] is None:
            return Availability.no(f"this PyTorch ({build['__version__']}) is a CPU-only build; install a CUDA "
                                   "build (pip install torch --index-url https://download.pytorch.org/whl/cu128)")
        import torch

        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            return Availability.no(f"no CUDA device is visible{hint}")
        missing = _triton_missing()
        return Availability.no(missing) if missing else Availability.yes()

    # --- memory -------------------------------------------------------------------------------
    def available_kv_memory(self) -> int | None:
        if self.kv_budget is not None:
            return self.kv_budget
        # Before (or without) a profiling pass: what is free now, within the utilization share.
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(self.device))
        used = total - free
        return max(0, int(total * self.options.memory_utilization) - used)

    def allocate_kv_cache(self, spec: KVCacheSpec):
        import torch

        need = spec.bytes_per_block() * spec.num_blocks
        limit = self.available_kv_memory()
        if limit is not None and need > limit:
            raise MemoryError(f"a KV cache of {need / 2**20:.0f} MiB does not fit the {limit / 2**20:.0f} MiB "
                              f"{self.device} can give it (raise --gpu-memory-utilization or lower "
                              f"--kv-cache-memory / --max-model-len)")
        shape = (spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        dtype = torch_dtype(spec.dtype)
        pool = [(torch.zeros(shape, dtype=dtype, device=self.device),
                 torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(spec.num_layers)]
        self._kv_bytes = need
        return pool

    def memory_stats(self) -> dict[str, int]:
        import torch

        stats = {"kv_cache_bytes": self._kv_bytes}
        dev = torch.device(self.device)
        if dev.type == "cuda":
            stats.update(allocated_bytes=torch.cuda.memory_allocated(dev),
                         reserved_bytes=torch.cuda.memory_reserved(dev),
                         peak_allocated_bytes=torch.cuda.max_memory_allocated(dev))
        return stats

    # --- kernels ------------------------------------------------------------------------------
    def attention(self):
        if self._attention is None:
            from ember_cuda.layers import TritonAttention

            self._attention = TritonAttention(self.attention_tiles)
        return self._attention

    def upload(self, weight):
        """One GGUF tensor on the device in the compute dtype."""
        from ember_cuda.layers import upload

        return upload(weight, self.device, torch_dtype(self.compute_dtype()))

    def _upload_shared(self, weight):
        """As upload, once per weight: a tied embedding and output head share one tensor."""
        key = (id(weight), weight.name)
        if key not in self._shared:
            self._shared[key] = (weight, self.upload(weight))  # the weight kept, so its id stays its own
        return self._shared[key][1]

    def create_linear(self, weights, biases=None):
        import torch

        from ember_cuda.layers import Linear

        # fused parts are concatenated (and their uploads dropped); a single weight may be shared
        w = torch.cat([self.upload(x) for x in weights]) if len(weights) > 1 else self._upload_shared(weights[0])
        b = None
        if biases is not None and any(x is not None for x in biases):
            b = torch.cat([self.upload(x).reshape(-1) if x is not None
                           else torch.zeros(p.shape[0], dtype=w.dtype, device=w.device)
                           for x, p in zip(biases, weights)])
        return Linear(w, b)

    def create_embedding(self, weight):
        from ember_cuda.layers import Embedding

        return Embedding(self._upload_shared(weight))

    def layer_ops(self):
        from ember_cuda.layers import DtypeKeepingOps

        return DtypeKeepingOps()

    # --- the runner ---------------------------------------------------------------------------
    def create_model_runner(self, model_config, weights, cache_config):
        from ember_cuda.runner import CudaModelRunner

        return CudaModelRunner(self, model_config, weights, cache_config)


class InterpretedCudaBackend(CudaBackend):
    """The cuda backend's code on CPU tensors, its kernels in Triton's interpreter: how CI, with
    no GPU, runs the conformance kit over it. Slow, and not registered: tests use it directly.

    TRITON_INTERPRET=1 must be set before the kernels are first imported (triton.jit decides
    when a kernel is defined)."""

    name = "cuda_interpreter"
    device_type = "cpu"
    priority = -50
    dtypes = ("float32", "bfloat16", "float16")
    description = "the cuda backend's Triton kernels in Triton's interpreter, on CPU tensors (for tests)"
    device = "cpu"
    # The interpreter pays per program and per loop trip: 64-wide tiles run the kit's 400-token
    # contexts in a quarter of the time of the interpreter's default 16 (which the kernel tests
    # keep, to cross tile boundaries with small shapes).
    attention_tiles = {"prefill": {"BLOCK_M": 64, "BLOCK_N": 64}, "decode": {"BLOCK_N": 64, "SPLIT_LEN": 256}}

    @classmethod
    def availability(cls) -> Availability:
        missing = _triton_missing()
        if missing:
            return Availability.no(missing)
        if os.environ.get("TRITON_INTERPRET") != "1":
            return Availability.no("set TRITON_INTERPRET=1 (before triton is imported) to run the kernels "
                                   "in Triton's interpreter")
        return Availability.yes()

    def available_kv_memory(self) -> int | None:
        if self.kv_budget is not None:
            return self.kv_budget
        return int((host_memory_available() or 0) * self.options.memory_utilization)

    def memory_stats(self) -> dict[str, int]:
        return {"kv_cache_bytes": self._kv_bytes}
