"""The backend contract: what a device plugin provides to the hardware-neutral core.

A backend supplies its device's memory allocator for the paged KV cache, attention kernels over
that cache, and linear/embedding layers built from (possibly quantized) weights. The core's torch
model runner drives the shared llama-family model with those pieces; a backend that runs models
some other way (a JAX runner, say) overrides :meth:`Backend.create_model_runner` instead.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ember.config import CacheConfig, ModelConfig
    from ember.engine.model_runner import ModelRunner
    from ember.gguf.loader import QuantWeight
    from ember.ops.layer_ops import LayerOps

# Bumped on any incompatible change to this module's classes. A plugin declares the version it was
# written for; the manager refuses (and reports) plugins whose major version differs.
BACKEND_API_VERSION = 1

# What a model runner consumes and returns, part of the same versioned contract: a plugin imports
# them from here, never from ember.engine.* (where they live, loaded on first use so that this
# module stays light). TorchModelRunner is the core's runner, for backends that extend it.
RUNNER_API = {
    "ModelRunner": "ember.engine.model_runner", "StepInputs": "ember.engine.model_runner",
    "SampleResult": "ember.engine.model_runner", "HostSampling": "ember.engine.model_runner",
    "kv_spec_for": "ember.engine.model_runner", "SchedulerOutput": "ember.engine.scheduler",
    "ScheduledSeq": "ember.engine.scheduler", "Sequence": "ember.engine.sequence",
    "TorchModelRunner": "ember.engine.torch_runner",
}


def __getattr__(name: str):
    if name in RUNNER_API:
        import importlib

        return getattr(importlib.import_module(RUNNER_API[name]), name)
    raise AttributeError(f"module 'ember.backend' has no attribute {name!r}")


def host_memory_available() -> int | None:
    """Bytes the host could still give (Linux's MemAvailable); None where that is unknown. For
    backends whose KV pool lives in host memory, or that fall back to it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def torch_version_info() -> dict[str, str | None]:
    """The constants of the installed torch's version.py (__version__, cuda, hip, xpu, ...), read
    without importing torch: a backend's availability check learns that a CPU-only build cannot
    run it without paying the 1.3 s torch's import costs. Empty when torch is not installed."""
    import ast
    import importlib.util
    import os

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {}
    try:
        with open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return {}
    found = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            found[target.id] = value.value
    return found


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> "Availability":
        return cls(True, "")

    @classmethod
    def no(cls, reason: str) -> "Availability":
        return cls(False, reason)


@dataclass
class BackendOptions:
    threads: int | None = None
    exact: bool = False  # keep reference numerics: no approximating fast paths
    # Activations multiplied by quantized weights as one int8 per value, as llama.cpp does: faster
    # where kernels quantize activations (cpu_gguf), less faithful. Backends without such kernels
    # ignore it; exact wins over it.
    int8_activations: bool = False
    # Compute dtype ("bfloat16", "float16", "float32"); None: the first of the backend's dtypes.
    dtype: str | None = None
    # Share of the device's memory the engine may fill (weights, activations, KV cache), as vLLM's
    # --gpu-memory-utilization. Backends on host memory ignore it.
    memory_utilization: float = 0.9
    eager: bool = False  # no graph capture (CUDA graphs and the like): easier to debug and profile
    # The largest step the engine will schedule: what a backend profiles activation memory with,
    # and the batch sizes it captures graphs for.
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "float16": 2, "bfloat16": 2}.get(self.dtype, 4)

    def bytes_per_block(self) -> int:
        # K and V for every layer
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize


@dataclass
class AttentionMetadata:
    """Where the tokens of one step sit: built by the model runner, read by attention kernels.

    The flattened batch holds each scheduled sequence's new tokens back to back; sequence ``i``
    owns rows ``query_start_loc[i]:query_start_loc[i+1]`` and, after this step, has
    ``seq_lens[i]`` tokens of context in the cache (its new tokens are the last ones).
    """

    slot_mapping: "torch.Tensor"  # [num_tokens] int64: cache slot of each new token
    block_tables: "torch.Tensor"  # [num_seqs, max_blocks] int64, padded with 0
    seq_lens: "torch.Tensor"  # [num_seqs] int64
    query_start_loc: "torch.Tensor"  # [num_seqs + 1] int64
    query_lens_list: list[int]
    seq_lens_list: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_list)


class AttentionBackend(Protocol):
    def forward(
        self,
        q: "torch.Tensor",  # [num_tokens, num_heads, head_dim]
        k: "torch.Tensor",  # [num_tokens, num_kv_heads, head_dim]
        v: "torch.Tensor",
        k_cache: "torch.Tensor",  # one layer of the pool, as allocate_kv_cache laid it out
        v_cache: "torch.Tensor",
        meta: AttentionMetadata,
        scale: float,
    ) -> "torch.Tensor":
        """Write k, v into the cache at meta.slot_mapping, then attend causally over each
        sequence's cached context. Returns [num_tokens, num_heads, head_dim]."""
        ...


class Backend(ABC):
    """Subclass this and register it through ``ember_register_backends``."""

    name: ClassVar[str]
    device_type: ClassVar[str]
    priority: ClassVar[int] = 0
    api_version: ClassVar[int] = BACKEND_API_VERSION
    # GGUF tensor types (names as in gguf.GGMLQuantizationType) and other formats ("awq", ...)
    quant_formats: ClassVar[frozenset[str]] = frozenset()
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    description: ClassVar[str] = ""
    # The torch device the core's torch runner puts its inputs, norm weights and RoPE tables on.
    # A backend on an accelerator sets it (per instance when it picks a device index).
    device: str = "cpu"

    def __init__(self, options: BackendOptions | None = None):
        self.options = options or BackendOptions()
        if self.options.dtype is not None and self.options.dtype not in self.dtypes:
            raise ValueError(f"backend {self.name!r} computes in {', '.join(self.dtypes)}, "
                             f"not {self.options.dtype}")
        if not 0.0 < self.options.memory_utilization <= 1.0:
            raise ValueError(f"memory utilization must be in (0, 1], got {self.options.memory_utilization}")

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability:
        """Whether this backend can run here; when not, a reason a person can act on."""

    @classmethod
    def details(cls) -> str:
        """Optional: what this backend will run here and why (its kernels' instruction set, the
        device it found), for `ember plugins --verbose`. Cheap: no model, no device allocation."""
        return ""

    def compute_dtype(self) -> str:
        """The dtype activations (and float weights) are held in."""
        return self.options.dtype or self.dtypes[0]

    # --- memory -----------------------------------------------------------------------------
    def kv_cache_dtype(self) -> str:
        return self.compute_dtype()

    @abstractmethod
    def allocate_kv_cache(self, spec: KVCacheSpec) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
        """Allocate the paged KV pool: one (k_cache, v_cache) pair per layer, holding
        spec.num_blocks blocks of spec.block_size tokens. The layout inside is the backend's own:
        only its attention kernels read and write it (the reference ops use
        [num_blocks, block_size, num_kv_heads, head_dim])."""

    def available_kv_memory(self) -> int | None:
        """Bytes this device can give the KV cache after the weights; None: no limit known. A
        pool larger than this must be refused (the conformance kit asks for 8x)."""
        return None

    def default_kv_memory(self) -> int | None:
        """The pool's size when the user names none (no --kv-cache-memory); None: the engine's
        default. All of available_kv_memory() unless the backend keeps some back, as a host-memory
        backend does for everything else the machine runs."""
        return self.available_kv_memory()

    def memory_stats(self) -> dict[str, int]:
        return {}

    # --- kernels ----------------------------------------------------------------------------
    @abstractmethod
    def attention(self) -> AttentionBackend:
        """The paged attention kernels."""

    @abstractmethod
    def create_linear(
        self, weights: list["QuantWeight"], biases: list["QuantWeight | None"] | None = None
    ) -> Callable[["torch.Tensor"], "torch.Tensor"]:
        """A linear layer y = x @ W.T (+ b) for the weights concatenated along the output
        dimension (so q/k/v or gate/up fuse into one call)."""

    @abstractmethod
    def create_embedding(self, weight: "QuantWeight") -> Callable[["torch.Tensor"], "torch.Tensor"]:
        """Token-id lookup into the (possibly quantized) embedding table."""

    def layer_ops(self) -> "LayerOps":
        """RMSNorm (with the residual add), RoPE and SwiGLU: the operations between the matmuls.
        The default is plain torch (ember.ops.layer_ops.LayerOps); a backend subclasses it to
        fuse what it can, and must keep the torch numerics when options.exact is set."""
        from ember.ops.layer_ops import LayerOps

        return LayerOps()

    def supports(self, qtype_name: str) -> bool:
        return qtype_name in self.quant_formats

    # --- the runner -------------------------------------------------------------------------
    def create_model_runner(
        self, model_config: "ModelConfig", weights: dict[str, "QuantWeight"], cache_config: "CacheConfig"
    ) -> "ModelRunner":
        """Build the runner that executes scheduler steps. The default drives the core's torch
        model with this backend's kernels; a backend with its own runtime overrides this."""
        from ember.engine.torch_runner import TorchModelRunner

        return TorchModelRunner(self, model_config, weights, cache_config)
