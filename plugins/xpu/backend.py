"""The xpu backend: Intel GPUs through PyTorch's own torch.xpu.

Weights are dequantized at load to the compute dtype; linear layers are torch matmuls. Attention
runs on IPEX's paged flash-attention kernels when intel-extension-for-pytorch is installed (and
matches torch), on the portable torch path (portable.py) otherwise; both use one cache layout.

This module does not import torch at import time: ``ember plugins`` lists the backend, and says
why it cannot run, without paying for torch on machines whose torch has no XPU support anyway.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import ClassVar

from ember.backend import Availability, Backend, BackendOptions, KVCacheSpec, host_memory_available, torch_version_info

log = logging.getLogger(__name__)

GGUF_TYPES = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
XPU_WHEELS = "pip install torch --index-url https://download.pytorch.org/whl/xpu"
GET_STARTED = "https://docs.pytorch.org/docs/stable/notes/get_start_xpu.html"
KV_DTYPES = ("float32", "float16", "bfloat16")
_MISSING = object()


def _build_without_xpu() -> str | None:
    """Why the installed torch has no XPU support, told without importing it (1.3 s that
    ``ember plugins`` should not pay to learn a CPU or CUDA build cannot run this backend), or
    None when only importing it can tell."""
    if importlib.util.find_spec("torch") is None:
        return f"PyTorch is not installed; install its XPU build: {XPU_WHEELS}"
    info = torch_version_info()
    # XPU builds set xpu to their SYCL compiler's version, every other build to None; _MISSING:
    # a version.py that does not say
    version, xpu = info.get("__version__"), info.get("xpu", _MISSING)
    if version is not None and xpu is None:
        return (f"the installed PyTorch {version} is a build without XPU support; install PyTorch's XPU "
                f"build: {XPU_WHEELS} (see {GET_STARTED})")
    return None


class XpuBackend(Backend):
    name = "xpu"
    device_type = "xpu"
    priority = 40
    # GGUF's types, and AWQ/GPTQ/compressed-tensors integers and FP8: all dequantized at load
    quant_formats = GGUF_TYPES | {"int4", "int8", "fp8"}
    dtypes = ("bfloat16", "float16", "float32")
    description = ("Intel GPUs (torch.xpu): GGUF weights dequantized at load, IPEX paged flash attention "
                   "when installed, a portable torch path otherwise")
    device = "xpu"
    # whether IPEX's kernels may be used when importable; the portable backend forbids them
    use_ipex: ClassVar[bool] = True

    def __init__(self, options: BackendOptions | None = None):
        super().__init__(options)
        import torch

        self.torch_dtype = getattr(torch, self.compute_dtype())
        self._kv_bytes = 0
        self._embedding = None  # (QuantWeight, table): a tied lm_head reuses the table
        self._attention = None
        self._warned_free_memory = False
        self.ipex, self.ipex_unavailable = self._load_ipex()

    @classmethod
    def availability(cls) -> Availability:
        why = _build_without_xpu()
        if why:
            return Availability.no(why)
        import torch

        xpu = getattr(torch, "xpu", None)
        compiled = getattr(xpu, "_is_compiled", lambda: xpu is not None)
        if xpu is None or not compiled():
            return Availability.no(f"this PyTorch build ({torch.__version__}) has no XPU support; install "
                                   f"PyTorch's XPU build: {XPU_WHEELS} (see {GET_STARTED})")
        if not xpu.is_available():
            return Availability.no(f"PyTorch {torch.__version__} supports XPUs but finds no Intel GPU: install "
                                   f"the Intel GPU driver (see {GET_STARTED}) and check that this user may open "
                                   f"/dev/dri/renderD* (on Linux, membership of the render group)")
        return Availability.yes()

    def _load_ipex(self):
        if not self.use_ipex:
            return None, f"{self.name} runs the portable path only"
        from ember_xpu import ipex

        module, why = ipex.load()
        if module is None:
            log.info("%s: IPEX kernels not used (%s); attention runs on the portable torch path", self.name, why)
        return module, why

    # --- memory -----------------------------------------------------------------------------
    def _device_memory(self) -> tuple[int, int]:
        """(free, total) bytes of the device. Free counts what torch's caching allocator holds
        without using: a pool just dropped is there to be taken again."""
        import torch

        unused = torch.xpu.memory_reserved(self.device) - torch.xpu.memory_allocated(self.device)
        try:
            free, total = torch.xpu.mem_get_info(self.device)
        except RuntimeError as e:
            # integrated GPUs cannot tell free memory (no ext_intel_free_memory aspect): count
            # only this process's use, as if it had the device to itself
            total = torch.xpu.get_device_properties(self.device).total_memory
            free = total - torch.xpu.memory_reserved(self.device)
            if not self._warned_free_memory:
                self._warned_free_memory = True
                log.warning("%s: the device does not report its free memory (%s); assuming this process is "
                            "alone on it", self.name, e)
        return free + unused, total

    def available_kv_memory(self) -> int:
        """The engine's share of the device (memory_utilization of its total) less what is in
        use on it now: the weights (the engine loads them before asking) and other processes'.
        Unlike vLLM and the cuda backend, nothing profiles the activations: they come out of the
        remaining 1 - memory_utilization."""
        free, total = self._device_memory()
        return max(0, int(total * self.options.memory_utilization) - (total - free))

    def allocate_kv_cache(self, spec: KVCacheSpec):
        import torch

        if spec.dtype not in KV_DTYPES:
            raise ValueError(f"{self.name} keeps its KV cache in {', '.join(KV_DTYPES)}, not {spec.dtype}")
        need, limit = spec.bytes_per_block() * spec.num_blocks, self.available_kv_memory()
        if need > limit:
            raise MemoryError(f"a KV cache of {need / 2**30:.2f} GiB does not fit in the {limit / 2**30:.2f} GiB "
                              f"{self.device} memory left for it (memory utilization "
                              f"{self.options.memory_utilization:.2f}); lower --kv-cache-memory or "
                              f"--max-model-len, or raise --gpu-memory-utilization")
        shape = (spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        dtype = getattr(torch, spec.dtype)
        try:
            # zeros: padded block tables point into unused blocks, whose contents get multiplied
            # by 0 after masking, and 0 * NaN would still be NaN
            pool = [(torch.zeros(shape, dtype=dtype, device=self.device),
                     torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(spec.num_layers)]
        except torch.OutOfMemoryError as e:
            raise MemoryError(f"allocating a KV cache of {need / 2**30:.2f} GiB on {self.device} failed: {e}") from e
        self._kv_bytes = need
        return pool

    def memory_stats(self) -> dict[str, int]:
        import torch

        stats = {"kv_cache_bytes": self._kv_bytes}
        if torch.device(self.device).type == "xpu":
            stats.update(allocated_bytes=torch.xpu.memory_allocated(self.device),
                         reserved_bytes=torch.xpu.memory_reserved(self.device),
                         peak_allocated_bytes=torch.xpu.max_memory_allocated(self.device))
        return stats

    # --- kernels ----------------------------------------------------------------------------
    def attention(self):
        if self._attention is None:
            from ember_xpu.portable import PortableAttention

            portable = PortableAttention()
            if self.ipex is not None and not self.options.exact and self.kv_cache_dtype() in ("float16", "bfloat16"):
                from ember_xpu.ipex import IpexAttention, paged_attention

                self._attention = IpexAttention(paged_attention(self.ipex), portable)
            else:
                self._attention = portable
        return self._attention

    def create_linear(self, weights, biases=None):
        from ember_xpu.layers import DenseLinear, dense, dense_bias

        no_bias = not biases or all(b is None for b in biases)
        if no_bias and len(weights) == 1 and self._embedding is not None and weights[0] is self._embedding[0]:
            return DenseLinear(self._embedding[1])  # tied embeddings: one copy in device memory
        return DenseLinear(dense(weights, self.torch_dtype, self.device),
                           dense_bias(weights, biases, self.torch_dtype, self.device))

    def create_embedding(self, weight):
        from ember_xpu.layers import Embedding, dense

        table = dense([weight], self.torch_dtype, self.device)
        self._embedding = (weight, table)
        return Embedding(table)

    def layer_ops(self):
        functional = getattr(getattr(self.ipex, "llm", None), "functional", None)
        if (functional is not None and not self.options.exact
                and hasattr(functional, "rms_norm") and hasattr(functional, "add_rms_norm")):
            from ember_xpu.ipex import IpexLayerOps

            return IpexLayerOps(functional)
        return super().layer_ops()


class PortableXpuBackend(XpuBackend):
    """The xpu backend's portable path (no IPEX, whatever is installed) on the CPU: the code an
    XPU without IPEX runs, where the tests and the conformance kit can run it. Not registered;
    use it through ``PluginRegistry.of(PortableXpuBackend)``."""

    name = "xpu_portable"
    device_type = "cpu"
    priority = -20  # never chosen over a real CPU backend, should anyone register it
    dtypes = ("float32", "bfloat16")
    description = "the xpu backend's portable torch path, on the CPU (tests and the conformance kit)"
    device = "cpu"
    use_ipex = False

    def __init__(self, options: BackendOptions | None = None):
        super().__init__(options)
        if self.options.threads:
            import torch

            torch.set_num_threads(self.options.threads)

    @classmethod
    def availability(cls) -> Availability:
        return Availability.yes()

    def available_kv_memory(self) -> int:
        # host memory: the utilization share of what is available now (as the cuda backend's
        # interpreter stand-in)
        return int((host_memory_available() or 0) * self.options.memory_utilization)
