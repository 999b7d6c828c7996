"""The checks behind ember.testing: each takes a backend class and raises ConformanceFailure with a
message a plugin author can act on.

The yardsticks are the core's reference ops (ember.ops.reference: float64 paged attention,
dequantize-then-matmul) and, end to end, ReferenceBackend below on the same model file.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ember.backend import AttentionMetadata, Availability, Backend, BackendOptions, KVCacheSpec


class ConformanceFailure(AssertionError):
    pass


# Relative error a backend may show against the float64 reference, by the compute dtype it
# declares first: float32 backends may still quantize activations (cpu_gguf's int8 kernels).
TOLERANCE = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 3e-2}
# ... and by the KV cache element type, for attention (its inputs are rounded to it).
KV_TOLERANCE = {"float32": 1e-4, "float16": 3e-3, "bfloat16": 2e-2}


def _torch():
    import torch

    return torch


def _rel_err(got, want) -> float:
    torch = _torch()
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _compare(got, want, tol: float, what: str, against: str, allowance: str, where: str) -> float:
    """The relative error of got, raising a ConformanceFailure that says where it broke."""
    if tuple(got.shape) != tuple(want.shape):
        raise ConformanceFailure(f"{what} returned shape {tuple(got.shape)}, expected {tuple(want.shape)} ({where})")
    err = _rel_err(got, want)
    if err > tol:
        raise ConformanceFailure(f"{what} differs from {against} by {err:.2e} (relative; allowed {tol:.0e} for "
                                 f"{allowance}) with {where}")
    return err


# ----------------------------------------------------------------------------------- attention

@dataclass
class _Seq:
    table: list[int]
    done: int = 0  # positions already in the cache


def _on(meta: AttentionMetadata, device) -> AttentionMetadata:
    from dataclasses import replace

    return replace(meta, slot_mapping=meta.slot_mapping.to(device), block_tables=meta.block_tables.to(device),
                   seq_lens=meta.seq_lens.to(device), query_start_loc=meta.query_start_loc.to(device))


def _meta(chunks: list[tuple[_Seq, int]], block_size: int) -> AttentionMetadata:
    """Metadata for one step in which each (sequence, n) appends n tokens."""
    torch = _torch()
    slots, qlens, lens = [], [], []
    for seq, n in chunks:
        for p in range(seq.done, seq.done + n):
            slots.append(seq.table[p // block_size] * block_size + p % block_size)
        qlens.append(n)
        lens.append(seq.done + n)
    width = max(len(s.table) for s, _ in chunks)
    tables = torch.zeros(len(chunks), width, dtype=torch.long)
    for i, (s, _) in enumerate(chunks):
        tables[i, : len(s.table)] = torch.tensor(s.table)
    starts = np.cumsum([0] + qlens).tolist()
    return AttentionMetadata(torch.tensor(slots), tables, torch.tensor(lens), torch.tensor(starts),
                             qlens, lens, block_size)


ATTENTION_SHAPES = [  # (heads, kv_heads, head_dim, block_size)
    (4, 4, 64, 16),
    (8, 2, 64, 16),
    (12, 4, 128, 32),
    (6, 2, 64, 8),
]


def check_attention(backend: Backend, seed: int = 0) -> str:
    """Paged attention through the backend's own cache and kernels, step by step (ragged prompts,
    a chunk after cached context, decode rows, a long context), against the float64 reference
    over a cache of the same element type."""
    torch = _torch()
    from ember.ops import reference

    kv_dtype = backend.kv_cache_dtype()
    tol = KV_TOLERANCE.get(kv_dtype, 3e-2)
    worst = 0.0
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for heads, kvh, d, bs in ATTENTION_SHAPES:
        lengths = [rng.randint(1, 40), rng.randint(50, 90), 1, rng.randint(300, 420)]
        need = [-(-(n + 24) // bs) for n in lengths]
        num_blocks = sum(need) + 3
        order = list(range(1, num_blocks))  # block 0 left unused: padding in tables points there
        rng.shuffle(order)
        seqs, at = [], 0
        for k in need:
            seqs.append(_Seq(order[at: at + k]))
            at += k
        spec = KVCacheSpec(1, num_blocks, bs, kvh, d, kv_dtype)
        pool = backend.allocate_kv_cache(spec)
        if len(pool) != 1:
            raise ConformanceFailure(f"allocate_kv_cache returned {len(pool)} (keys, values) pairs for 1 layer")
        (k_cache, v_cache), = pool
        ref_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[kv_dtype]
        ref_k = torch.zeros(num_blocks, bs, kvh, d, dtype=ref_dtype)
        ref_v = torch.zeros_like(ref_k)
        attn = backend.attention()
        # prompts (the long one in two chunks), then three decode steps for everyone
        long_first = lengths[3] // 2
        steps = [[(seqs[0], lengths[0]), (seqs[1], lengths[1]), (seqs[2], lengths[2]), (seqs[3], long_first)],
                 [(seqs[3], lengths[3] - long_first)]] + [[(s, 1) for s in seqs]] * 3
        for chunks in steps:
            meta = _meta(chunks, bs)
            n = sum(c for _, c in chunks)
            q = torch.randn(n, heads, d, generator=gen)
            k = torch.randn(n, kvh, d, generator=gen)
            v = torch.randn(n, kvh, d, generator=gen)
            scale = d ** -0.5
            dev = backend.device  # the backend's torch device: inputs arrive there, as from the runner
            try:
                got = attn.forward(q.to(dev, copy=True), k.to(dev, copy=True), v.to(dev, copy=True),
                                   k_cache, v_cache, _on(meta, dev), scale)
            except Exception as e:
                raise ConformanceFailure(f"attention raised {e!r} (heads={heads}, kv_heads={kvh}, head_dim={d}, "
                                         f"block_size={bs}, query lengths {meta.query_lens_list})") from e
            want = reference.paged_attention(q, k, v, ref_k, ref_v, meta, scale)
            worst = max(worst, _compare(
                got, want, tol, "attention", "the reference", f"a {kv_dtype} cache",
                f"heads={heads}, kv_heads={kvh}, head_dim={d}, block_size={bs}, query lengths "
                f"{meta.query_lens_list}, context lengths {meta.seq_lens_list}"))
            for s, c in chunks:
                s.done += c
    return f"worst relative error {worst:.1e} ({kv_dtype} cache)"


# -------------------------------------------------------------------------------------- linear

# Where each K-quant block keeps its float16 scales (byte offsets): random bytes elsewhere make
# valid blocks, but a random float16 may be inf or NaN.
_K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_weight(qtype_name: str, rows: int, cols: int, rng: np.random.Generator, name: str = "w"):
    """A QuantWeight of the given GGUF type with random contents (valid scales)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf import quants as gq

    from ember.gguf.loader import QuantWeight

    qtype = GGMLQuantizationType[qtype_name]
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if qtype_name in _K_SCALES:
        data = rng.integers(0, 256, (rows, cols // block * nbytes), dtype=np.uint8)
        blocks = data.reshape(-1, nbytes)
        for off in _K_SCALES[qtype_name]:
            scales = rng.uniform(1e-3, 2e-2, len(blocks)).astype(np.float16)
            blocks[:, off: off + 2] = scales.view(np.uint8).reshape(-1, 2)
    else:
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        data = values if qtype_name == "F32" else gq.quantize(values, qtype)
        data = np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1)
    return QuantWeight(name, qtype, (rows, cols), data)


LINEAR_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def check_linear(backend: Backend, seed: int = 0) -> str:
    """Every GGUF type the backend declares, as one weight and as two fused parts with a bias,
    for 1, 3 and 33 rows, against dequantize-then-matmul."""
    torch = _torch()
    from ember.ops import reference

    tol = TOLERANCE.get(backend.compute_dtype(), 3e-2)
    rng = np.random.default_rng(seed)
    types = [t for t in LINEAR_TYPES if backend.supports(t)]
    if not types:
        raise ConformanceFailure(f"the backend declares no GGUF weight type it can run "
                                 f"(quant_formats={sorted(backend.quant_formats)})")
    worst = 0.0
    for t in types:
        cols = 512 if t.endswith("_K") else 96
        parts = [random_weight(t, 48, cols, rng, "a"), random_weight(t, 20, cols, rng, "b")]
        bias = [random_weight("F32", 1, 48, rng, "ba"), random_weight("F32", 1, 20, rng, "bb")]
        for bias_ in (None, [_as_bias(b) for b in bias]):
            weights = parts if bias_ else parts[:1]
            try:
                layer = backend.create_linear(weights, bias_)
            except Exception as e:
                raise ConformanceFailure(f"create_linear raised {e!r} for {t} weights ({len(weights)} parts)") from e
            for m in (1, 3, 33):
                x = torch.from_numpy(rng.standard_normal((m, cols)).astype(np.float32))
                want = reference.linear(x, weights, bias_)
                got = layer(x.to(backend.device, copy=True))
                worst = max(worst, _compare(
                    got, want, tol, f"{t} linear", "dequantize-then-matmul", f"{backend.compute_dtype()} compute",
                    f"{m} rows, {len(weights)} parts, {'a' if bias_ else 'no'} bias"))
    return f"{len(types)} types, worst relative error {worst:.1e}"


def _as_bias(w):
    """A bias as the loader gives it: a 1-D tensor."""
    from ember.gguf.loader import QuantWeight

    return QuantWeight(w.name, w.qtype, (w.shape[1],), w.data.reshape(1, -1))


# ----------------------------------------------------------------------------- the KV allocator

def _nbytes(t) -> int:
    # torch tensors, numpy and JAX arrays all say how many bytes they hold
    return int(t.nbytes)


def check_kv_allocator(backend: Backend, seed: int = 0) -> str:
    """allocate_kv_cache gives one (keys, values) pair per layer holding what the spec accounts
    for; a pool can be dropped and allocated again; a pool larger than the memory the backend
    says it has is refused with an error, and the backend still works after it."""
    spec = KVCacheSpec(3, 10, 16, 2, 64, backend.kv_cache_dtype())
    caches = backend.allocate_kv_cache(spec)
    if len(caches) != spec.num_layers or any(len(pair) != 2 for pair in caches):
        raise ConformanceFailure(f"allocate_kv_cache returned {len(caches)} entries for {spec.num_layers} layers; "
                                 f"each must be a (keys, values) pair")
    want = spec.bytes_per_block() * spec.num_blocks
    got = sum(_nbytes(k) + _nbytes(v) for k, v in caches)
    if not want <= got <= want * 1.25:
        raise ConformanceFailure(f"the pool holds {got} bytes but the spec accounts for {want} "
                                 f"(KVCacheSpec.bytes_per_block sizes pools from memory budgets, so they must agree)")
    stats = backend.memory_stats().get("kv_cache_bytes")
    if stats is not None and stats != want:
        raise ConformanceFailure(f"memory_stats() reports kv_cache_bytes={stats}, the pool is {want}")
    del caches
    again = backend.allocate_kv_cache(spec)
    if len(again) != spec.num_layers:
        raise ConformanceFailure("a second allocation after dropping the first failed")
    del again
    limit = backend.available_kv_memory()
    if limit is None:
        return "allocate and reallocate; no memory limit reported, so exhaustion is not checked"
    huge = KVCacheSpec(1, limit // KVCacheSpec(1, 1, 16, 2, 64, spec.dtype).bytes_per_block() * 8 + 8,
                       16, 2, 64, spec.dtype)
    try:
        pool = backend.allocate_kv_cache(huge)
    except (MemoryError, ValueError, RuntimeError) as e:
        if not str(e):
            raise ConformanceFailure(f"refusing an oversized pool raised {type(e).__name__} with no message") from e
    else:
        del pool
        raise ConformanceFailure(f"a pool of {huge.bytes_per_block() * huge.num_blocks} bytes, 8x the "
                                 f"{limit} bytes available_kv_memory() reports, was allocated instead of refused")
    backend.allocate_kv_cache(spec)
    return "allocate, reallocate, and refuse 8x the available memory"


# ----------------------------------------------------------------------------------- end to end

E2E_PROMPTS = [
    "Why is the sky blue?",
    "What is 17 times 23?",
    "Who wrote Pride and Prejudice?",
    "List the planets of the solar system in order.",
]


class ReferenceBackend(Backend):
    """The yardstick backend: the core's reference ops, float32 weights and KV cache."""

    name = "reference"
    device_type = "cpu"
    priority = -100
    quant_formats = frozenset(LINEAR_TYPES)
    description = "ember.ops.reference kernels (the conformance kit's yardstick)"

    @classmethod
    def availability(cls) -> Availability:
        return Availability.yes()

    def allocate_kv_cache(self, spec):
        torch = _torch()
        shape = (spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(spec.num_layers)]

    def attention(self):
        from ember.ops import reference

        class _Attention:
            forward = staticmethod(reference.paged_attention)

        return _Attention()

    def create_linear(self, weights, biases=None):
        # reference.linear's numerics, with the weights dequantized once rather than every call
        torch = _torch()
        w = torch.cat([wt.dequantize() for wt in weights], dim=0)
        b = None
        if biases and any(x is not None for x in biases):
            b = torch.cat([x.dequantize().reshape(-1) for x in biases])
        return lambda x: x.float() @ w.T if b is None else x.float() @ w.T + b

    def create_embedding(self, weight):
        torch = _torch()
        table = weight.dequantize()
        return lambda ids: torch.nn.functional.embedding(ids, table)


def greedy_tokens(backend_cls: type[Backend], model: str, options: BackendOptions | None = None,
                  max_tokens: int = 16) -> list[list[int]]:
    """The four E2E prompts' greedy tokens, generated together (batching and prefix caching on)."""
    from ember.config import CacheConfig, EngineConfig
    from ember.engine.llm_engine import LLMEngine
    from ember.plugins.manager import PluginRegistry
    from ember.sampling_params import SamplingParams

    options = options or BackendOptions()
    config = EngineConfig(model=model, device=backend_cls.name, threads=options.threads, exact=options.exact,
                          dtype=options.dtype, memory_utilization=options.memory_utilization, eager=options.eager,
                          max_model_len=512, cache=CacheConfig(kv_cache_memory=64 * 1024**2))
    engine = LLMEngine(config, registry=PluginRegistry.of(backend_cls))
    chats = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in E2E_PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(c, params) for c in chats]
    # a repeat of the first prompt: served from the prefix cache, it must give the same tokens
    ids.append(engine.add_request(chats[0], params))
    done = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


def check_end_to_end(backend_cls: type[Backend], model: str | None, options: BackendOptions | None = None,
                     min_matching: int = len(E2E_PROMPTS), max_tokens: int = 16) -> str:
    if model is None:
        return "skipped: no model file given"
    got = greedy_tokens(backend_cls, model, options, max_tokens)
    if got[-1] != got[0]:
        raise ConformanceFailure(f"the same prompt gave {got[0]} alone and {got[-1]} from the prefix cache")
    want = greedy_tokens(ReferenceBackend, model, max_tokens=max_tokens)
    got, want = got[: len(E2E_PROMPTS)], want[: len(E2E_PROMPTS)]  # the repeat was checked above
    same = sum(a == b for a, b in zip(got, want))
    if same < min_matching:
        first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        raise ConformanceFailure(f"greedy tokens match the reference backend on {same} of {len(E2E_PROMPTS)} prompts "
                                 f"(needed {min_matching}); prompt {E2E_PROMPTS[first]!r}: got {got[first]}, "
                                 f"reference {want[first]}")
    return f"greedy tokens match the reference on {same} of {len(E2E_PROMPTS)} prompts"


# ------------------------------------------------------------------------------------ running

CHECKS = ["attention", "linear", "kv_allocator", "end_to_end"]
_UNIT: dict[str, Callable[[Backend], str]] = {
    "attention": check_attention, "linear": check_linear, "kv_allocator": check_kv_allocator,
}


def run_check(check: str, backend_cls: type[Backend], options: BackendOptions | None = None,
              model: str | None = None, min_matching: int = len(E2E_PROMPTS), max_tokens: int = 16) -> str:
    """Run one check; returns a one-line summary, raises ConformanceFailure. max_tokens: how many
    greedy tokens end_to_end compares per prompt (fewer for a backend run in an emulator)."""
    if check == "end_to_end":
        return check_end_to_end(backend_cls, model, options, min_matching, max_tokens)
    if check not in _UNIT:
        raise ValueError(f"unknown check {check!r} (checks: {', '.join(CHECKS)})")
    avail = backend_cls.availability()
    if not avail.ok:
        raise ConformanceFailure(f"{backend_cls.name} is not available here: {avail.reason}")
    try:
        return _UNIT[check](backend_cls(options or BackendOptions()))
    except ConformanceFailure:
        raise
    except Exception as e:  # a crash is a failure too, reported with what the check was doing
        raise ConformanceFailure(f"the {check} check crashed: {e!r}") from e


def assert_conformant(backend_cls: type[Backend], options: BackendOptions | None = None,
                      model: str | None = None, min_matching: int = len(E2E_PROMPTS)) -> dict[str, str]:
    """Every check; raises one ConformanceFailure naming each failed check and why."""
    results, failures = {}, []
    for check in CHECKS:
        try:
            results[check] = run_check(check, backend_cls, options, model, min_matching)
        except ConformanceFailure as e:
            failures.append(f"  {check}: {e}")
    if failures:
        raise ConformanceFailure(f"backend {backend_cls.name!r} fails {len(failures)} of {len(CHECKS)} "
                                 "conformance checks:\n" + "\n".join(failures))
    return results
