"""The pieces the cuda backend hands the core's model: weights on the device, linear and embedding
layers over them, attention through the Triton kernels, and layer ops that keep the compute dtype."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ember.backend import AttentionMetadata
from ember.ops.layer_ops import LayerOps

# GGUF float types: how numpy holds the bits (it has no bfloat16, so those travel as int16) and
# the torch dtype they are
_FLOAT_TYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
                "BF16": (np.int16, torch.bfloat16)}


def _host_tensor(array: np.ndarray) -> torch.Tensor:
    # The loader's arrays are read-only views of the mapped file; torch warns about those, but
    # this tensor is only ever read (copied to the device, or read by a dequantize kernel).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array))


def upload(weight, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A GGUF tensor (ember.gguf.loader.QuantWeight) on the device in `dtype`: the raw blocks are
    copied over and dequantized there when a Triton kernel exists for the type (a quarter to an
    eighth of the bytes cross the bus), else dequantized on the host by the core's reference."""
    from ember_cuda.kernels.dequant import KERNELS

    name = weight.qtype.name
    if name in _FLOAT_TYPES:
        bits, as_type = _FLOAT_TYPES[name]
        host = _host_tensor(np.ascontiguousarray(weight.data).view(bits).reshape(weight.shape))
        return host.view(as_type).to(device=device, dtype=dtype)
    if weight.qtype in KERNELS:
        from ember_cuda.kernels.dequant import dequantize

        raw = _host_tensor(weight.data).to(device)
        return dequantize(raw, weight.qtype, weight.shape, dtype=dtype)
    return weight.dequantize().to(device=device, dtype=dtype)


class Linear:
    """y = x @ W.T (+ b) with cuBLAS, in the weight's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Embedding:
    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.table.device), self.table)


class TritonAttention:
    """The contract's attention: new keys and values into the cache by slot mapping, then the
    decode kernel for steps of decode rows only, the varlen prefill kernel for any other.

    A captured decode step passes ``workspace`` (the split partials, preallocated) through
    ``decode_workspace``; see ember_cuda.runner."""

    def __init__(self, tiles: dict | None = None):
        self.decode_workspace = None  # set by the runner while it captures graphs
        self.tiles = tiles or {}  # launch settings over the device's defaults, for both kernels
        self._configs: dict[tuple, dict] = {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from ember_cuda.kernels import paged_attention as pa
        from ember_cuda.kernels.kv_write import write_kv
        from ember_cuda.kernels.launch import describe

        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        q = q.to(k_cache.dtype)
        kind = "decode" if meta.decode_only else "prefill"
        key = (kind, q.device, q.dtype, q.shape[1] // k_cache.shape[2], q.shape[2])
        config = self._configs.get(key)
        if config is None:  # once per shape, not once per layer and step
            make = pa.decode_config if meta.decode_only else pa.prefill_config
            config = self._configs[key] = {**make(describe(q.device), key[4], key[3], q.dtype),
                                           **self.tiles.get(kind, {})}
        if meta.decode_only:
            return pa.decode_attention(q, k_cache, v_cache, meta, scale, config=config,
                                       workspace=self.decode_workspace)
        return pa.prefill_attention(q, k_cache, v_cache, meta, scale, config=config)


class DtypeKeepingOps(LayerOps):
    """The core's layer ops with the reductions in float32 but results in the input's dtype, so a
    bfloat16 model stays bfloat16 between the matmuls (the core's default promotes to float32)."""

    def rms_norm(self, x, weight, eps, residual=None):
        y = x if residual is None else x + residual
        y32 = y.float()
        normed = weight * (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + eps))
        return normed.to(x.dtype), y

    def rope(self, q, k, positions, cos, sin):
        q2, k2 = super().rope(q.float(), k.float(), positions, cos, sin)
        return q2.to(q.dtype), k2.to(k.dtype)
