"""The torch-facing half of the backend contract (allocate_kv_cache, attention(), create_linear,
create_embedding), as thin adapters over the JAX functions the runner compiles into its step.

The JAX runner never uses these: they exist so that code written against the contract, the
conformance kit first, can drive this backend with torch CPU tensors. Each call goes torch ->
numpy -> device, runs a jitted function on bucketed shapes, and comes back as a torch tensor.
"""
from __future__ import annotations

import jax
import numpy as np

from ember_tpu import attention, model
from ember_tpu.attention import PagedInputs
from ember_tpu.batching import Buckets, bucket, pad_batch

_linear = jax.jit(model.linear)
_embed = jax.jit(model.embed)
# the cache goes in and comes back updated; donating it lets XLA write it in place
_attend = jax.jit(attention.attend, static_argnames=("plan", "scale"), donate_argnames=("k_pages", "v_pages"))


def to_numpy(t, dtype) -> np.ndarray:
    """A torch tensor as numpy in a JAX dtype (numpy cannot take torch's bfloat16 directly)."""
    import torch

    return t.detach().to(torch.float32).cpu().numpy().astype(dtype)


def to_torch(x: jax.Array, like_dtype=None):
    import torch

    out = torch.from_numpy(np.array(jax.device_get(x), dtype=np.float32))  # a writable copy
    return out if like_dtype is None else out.to(like_dtype)


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if len(x) == rows:
        return x
    out = np.zeros((rows, *x.shape[1:]), x.dtype)
    out[: len(x)] = x
    return out


class KVHolder:
    """One layer's keys (or values). JAX arrays are immutable: the attention adapter replaces the
    array held here with the updated one after each write."""

    def __init__(self, array: jax.Array):
        self.array = array

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self):
        return self.array.dtype

    def __repr__(self) -> str:
        return f"KVHolder({self.array.dtype}{list(self.array.shape)})"


class JaxPagedAttention:
    """AttentionBackend over KVHolder pools: forward(q, k, v, k_cache, v_cache, meta, scale)."""

    def __init__(self, dtype, device, use_pallas: bool, buckets: Buckets):
        self.dtype, self.device, self.use_pallas, self.buckets = dtype, device, use_pallas, buckets

    def forward(self, q, k, v, k_cache: KVHolder, v_cache: KVHolder, meta, scale: float):
        kvh, _, bs, d = k_cache.shape
        batch = pad_batch(meta.query_start_loc.tolist(), meta.seq_lens_list, meta.slot_mapping.tolist(),
                          meta.block_tables.cpu().numpy(), buckets=self.buckets)
        T, _, W = batch.shape
        plan = attention.plan_for(batch.decode, T, W, bs, kvh, d,
                                  self.use_pallas and attention.pallas_supported(d, bs))
        inputs = PagedInputs(batch.slots, batch.positions, batch.token_seq, batch.tables, batch.seq_lens)
        qkv = [jax.device_put(pad_rows(to_numpy(x, self.dtype), T), self.device) for x in (q, k, v)]
        out, k_cache.array, v_cache.array = _attend(plan, *qkv, k_pages=k_cache.array, v_pages=v_cache.array,
                                                    inputs=jax.device_put(inputs, self.device), scale=float(scale))
        return to_torch(out[: batch.num_tokens], q.dtype)


class JaxLinear:
    """y = x @ W.T (+ b) for GGUF weights concatenated along the output dimension, dequantized once
    to the compute dtype."""

    def __init__(self, weights, biases, dtype, device, min_rows: int):
        w = np.concatenate([model.dequantize(x) for x in weights], axis=0)
        self.w = jax.device_put(np.asarray(w, dtype=dtype), device)
        self.b = None
        if biases and any(b is not None for b in biases):
            b = np.concatenate([model.dequantize(b).reshape(-1) if b is not None else np.zeros(x.shape[0], np.float32)
                                for x, b in zip(weights, biases)])
            self.b = jax.device_put(np.asarray(b, np.float32), device)
        self.dtype, self.device, self.min_rows = dtype, device, min_rows

    def __call__(self, x):
        lead, n = x.shape[:-1], int(np.prod(x.shape[:-1]))
        rows = pad_rows(to_numpy(x.reshape(n, x.shape[-1]), self.dtype), bucket(n, self.min_rows))
        y = _linear(jax.device_put(rows, self.device), self.w, self.b)
        return to_torch(y[:n]).reshape(*lead, -1)


class JaxEmbedding:
    def __init__(self, weight, dtype, device, min_rows: int):
        self.table = jax.device_put(np.asarray(model.dequantize(weight), dtype=dtype), device)
        self.device, self.min_rows = device, min_rows

    def __call__(self, ids):
        flat = ids.reshape(-1).cpu().numpy().astype(np.int32)
        out = _embed(self.table, jax.device_put(pad_rows(flat, bucket(len(flat), self.min_rows)), self.device))
        return to_torch(out[: len(flat)]).reshape(*ids.shape, -1)
