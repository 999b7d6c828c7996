"""The TPU backend: a JAX model runner (runner.py), and the backend contract's torch-facing hooks
as adapters over the same JAX functions (adapters.py).

jax is imported inside functions only: registering the backend must work, and say why it cannot
run, on a machine without jax.
"""
from __future__ import annotations

import importlib.util
import os
from typing import ClassVar

from ember.backend import Availability, Backend, BackendOptions, KVCacheSpec, host_memory_available
from ember_tpu.batching import Buckets

GGUF_TYPES = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
# The share of free host memory JaxCpuBackend offers the KV cache (the engine's default pool size).
# JAX commits a pool's zeros at once, unlike numpy's calloc, so all of it would take the host's
# memory for real; pools up to all of it are still allocated when asked for explicitly.
HOST_KV_SHARE = 4


def _libtpu_present() -> bool:
    # what jax itself looks for (jax/_src/cloud_tpu_init.py), found without importing jax
    return importlib.util.find_spec("libtpu") is not None or bool(os.environ.get("TPU_LIBRARY_PATH"))


class TpuBackend(Backend):
    name = "tpu"
    device_type = "tpu"
    priority = 30
    # GGUF's types, and AWQ/GPTQ/compressed-tensors integers and FP8: all dequantized at load
    quant_formats = GGUF_TYPES | {"int4", "int8", "fp8"}
    dtypes = ("bfloat16", "float32")
    description = ("TPU through JAX: weights dequantized to bfloat16, a jitted step per bucketed shape, "
                   "Pallas paged attention for decode steps")
    platform: ClassVar[str] = "tpu"  # the JAX platform the runner places its arrays on
    # TPU tiles are 8 x 128: smaller padded shapes would not run faster
    buckets: ClassVar[Buckets] = Buckets(tokens=16, seqs=8, blocks=8)

    def __init__(self, options: BackendOptions | None = None):
        super().__init__(options)
        self._kv_bytes = 0

    # --- where it runs -------------------------------------------------------------------------
    @classmethod
    def availability(cls) -> Availability:
        if importlib.util.find_spec("jax") is None:
            return Availability.no("jax is not installed (pip install 'ember[tpu]')")
        if cls.platform == "tpu" and not _libtpu_present():
            return Availability.no("no TPU runtime: libtpu is not installed (on a TPU VM: pip install 'ember[tpu]')")
        try:
            import jax
        except Exception as e:  # a broken install: say what broke
            return Availability.no(f"jax failed to import: {e!r}")
        detail = ""
        try:
            if jax.devices(cls.platform):
                return Availability.yes()
        except RuntimeError as e:
            # "failed to initialize" says why (a TPU held by another process, say); "unknown
            # backend" says nothing the line below does not
            if "failed to initialize" in str(e):
                detail = f" ({str(e).split(' Available backends')[0]})"
        try:
            seen = sorted({d.platform for d in jax.devices()})
        except RuntimeError as e:
            return Availability.no(f"JAX found no devices: {e}")
        return Availability.no(f"no {cls.platform.upper()}: JAX sees only {', '.join(seen)} devices{detail}")

    def compute_dtype(self) -> str:
        # exact mode: the reference's float32 (and full-precision matmuls, see runner.py)
        if self.options.exact and self.options.dtype is None:
            return "float32"
        return super().compute_dtype()

    def jax_device(self):
        import jax

        return jax.devices(self.platform)[0]

    # --- memory --------------------------------------------------------------------------------
    def _free_bytes(self) -> int | None:
        """What the device can still hold; None: unknown."""
        stats = self.jax_device().memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))

    def available_kv_memory(self) -> int | None:
        free = self._free_bytes()
        return None if free is None else int(free * self.options.memory_utilization)

    def memory_stats(self) -> dict[str, int]:
        stats = {"kv_cache_bytes": self._kv_bytes}
        device = self.jax_device().memory_stats() or {}
        stats.update({k: int(device[k]) for k in ("bytes_in_use", "bytes_limit", "peak_bytes_in_use") if k in device})
        return stats

    def _check_fits(self, spec: KVCacheSpec) -> int:
        need = spec.bytes_per_block() * spec.num_blocks
        free = self._free_bytes()
        if free is not None and need > free:
            raise MemoryError(f"a KV cache of {need / 2**30:.2f} GiB does not fit in the {free / 2**30:.2f} GiB "
                              f"free on {self.jax_device()}; lower --kv-cache-memory")
        return need

    def _zeros(self, shape: tuple[int, ...], dtype: str):
        import jax
        import jax.numpy as jnp

        # zeros matter: attention reads padded slots and multiplies them by 0, and 0 * NaN is NaN.
        # Made on the device and committed to it, as the step's outputs are: an uncommitted input
        # would make the second step's signature differ from the first's, and compile again.
        device = self.jax_device()
        with jax.default_device(device):
            return jax.device_put(jnp.zeros(shape, dtype), device)

    def allocate_kv_pool(self, spec: KVCacheSpec):
        """The runner's pool: keys and values of every layer, each one array
        [num_kv_heads, num_layers * num_blocks, block_size, head_dim] (see attention.py)."""
        need = self._check_fits(spec)
        shape = (spec.num_kv_heads, spec.num_layers * spec.num_blocks, spec.block_size, spec.head_dim)
        pool = self._zeros(shape, spec.dtype), self._zeros(shape, spec.dtype)
        self._kv_bytes = need
        return pool

    def allocate_kv_cache(self, spec: KVCacheSpec):
        """The contract's pool: a (keys, values) pair of KVHolders per layer, each
        [num_kv_heads, num_blocks, block_size, head_dim]."""
        from ember_tpu.adapters import KVHolder

        need = self._check_fits(spec)
        shape = (spec.num_kv_heads, spec.num_blocks, spec.block_size, spec.head_dim)
        pool = [(KVHolder(self._zeros(shape, spec.dtype)), KVHolder(self._zeros(shape, spec.dtype)))
                for _ in range(spec.num_layers)]
        self._kv_bytes = need
        return pool

    # --- kernels (torch-facing, for the contract) -----------------------------------------------
    def attention(self):
        import jax.numpy as jnp

        from ember_tpu.adapters import JaxPagedAttention

        return JaxPagedAttention(jnp.dtype(self.kv_cache_dtype()), self.jax_device(), self.platform == "tpu",
                                 self.buckets)

    def create_linear(self, weights, biases=None):
        import jax.numpy as jnp

        from ember_tpu.adapters import JaxLinear

        return JaxLinear(weights, biases, jnp.dtype(self.compute_dtype()), self.jax_device(), self.buckets.tokens)

    def create_embedding(self, weight):
        import jax.numpy as jnp

        from ember_tpu.adapters import JaxEmbedding

        return JaxEmbedding(weight, jnp.dtype(self.compute_dtype()), self.jax_device(), self.buckets.tokens)

    # --- the runner ----------------------------------------------------------------------------
    def create_model_runner(self, model_config, weights, cache_config):
        from ember_tpu.runner import JaxModelRunner

        return JaxModelRunner(self, model_config, weights, cache_config)


class JaxCpuBackend(TpuBackend):
    """The TPU backend's runner and kernels on JAX's CPU platform: what CI and the conformance kit
    run. Not registered as a plugin (cpu_gguf is the CPU backend); use it through
    PluginRegistry.of(JaxCpuBackend)."""

    name = "jax_cpu"
    device_type = "cpu"
    priority = -10
    dtypes = ("float32", "bfloat16")
    description = "the tpu backend's JAX runner on JAX's CPU platform (for tests and the conformance kit)"
    platform = "cpu"
    buckets = Buckets(tokens=8, seqs=2, blocks=4)

    @classmethod
    def availability(cls) -> Availability:
        if importlib.util.find_spec("jax") is None:
            return Availability.no("jax is not installed (pip install jax)")
        return super().availability()

    def _free_bytes(self) -> int | None:
        return host_memory_available()

    def available_kv_memory(self) -> int | None:
        return host_memory_available()

    def default_kv_memory(self) -> int | None:
        free = self.available_kv_memory()
        return None if free is None else free // HOST_KV_SHARE

    def memory_stats(self) -> dict[str, int]:
        return {"kv_cache_bytes": self._kv_bytes}
