"""cpu_gguf's paged attention against the core's float64 reference, over ragged batches."""
import random

import pytest
import torch

from ember.backend import AttentionMetadata, KVCacheSpec
from ember.ops import reference
from ember_cpu_gguf.attention import CpuPagedAttention
from ember_cpu_gguf.backend import CpuGgufBackend


def meta_for(chunks, tables, block_size):
    """chunks: (start, n) per sequence: n new tokens at positions start..start+n-1."""
    slots, starts = [], [0]
    for (a, n), table in zip(chunks, tables):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(a, a + n)]
        starts.append(starts[-1] + n)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=bt,
        seq_lens=torch.tensor([a + n for a, n in chunks]), query_start_loc=torch.tensor(starts),
        query_lens_list=[n for _, n in chunks], seq_lens_list=[a + n for a, n in chunks], block_size=block_size)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("native", [True, False], ids=["c-kernel", "torch"])
@pytest.mark.parametrize("heads, kv_heads, block_size, seed", [(9, 3, 16, 0), (4, 4, 8, 1), (8, 1, 4, 2)])
def test_matches_reference_over_two_steps(heads, kv_heads, block_size, seed, native, dtype):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d, num_blocks = 32, 64
    # per sequence: tokens computed in step 1, then new tokens in step 2 (1: a decode, >1: a chunk)
    lengths = [(rng.randint(1, 40), rng.choice([1, 1, rng.randint(2, 12)])) for _ in range(6)]
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered blocks, as after churn
    tables = []
    for first, second in lengths:
        need = -(-(first + second) // block_size)
        tables.append([free.pop() for _ in range(need)])

    backend = CpuGgufBackend()
    spec = KVCacheSpec(1, num_blocks, block_size, kv_heads, d, dtype)
    (kc, vc), = backend.allocate_kv_cache(spec)
    # a float16 cache rounds each stored key and value (relative 2^-11); the float64 reference
    # does not, so that is the error to allow
    tol = 1e-5 if dtype == "float32" else 2e-3
    rk = torch.zeros(num_blocks, block_size, kv_heads, d)
    rv = torch.zeros_like(rk)
    attn = CpuPagedAttention(use_native=native)
    if native and attn.native_decode is None:
        pytest.skip("no C compiler: the native kernel could not be built")
    for step in (0, 1):
        chunks = [(0, f) if step == 0 else (f, s) for f, s in lengths]
        meta = meta_for(chunks, tables, block_size)
        t = sum(n for _, n in chunks)
        q, k, v = torch.randn(t, heads, d), torch.randn(t, kv_heads, d), torch.randn(t, kv_heads, d)
        got = attn.forward(q, k, v, kc, vc, meta, d ** -0.5)
        want = reference.paged_attention(q, k, v, rk, rv, meta, d ** -0.5)
        err = ((got - want).norm() / want.norm()).item()
        assert err < tol, f"step {step}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (8, 2), (4, 1), (6, 6)])
def test_one_sequence_splits_its_query_heads_over_threads(heads, kv_heads, dtype):
    """With fewer (sequence, kv head) pairs than threads can share, the C kernel gives each thread
    a subset of a kv head's query heads; the new key and value must be in place for all of them."""
    torch.manual_seed(heads)
    d, bs, num_blocks, ctx = 64, 16, 8, 70
    backend = CpuGgufBackend()
    (kc, vc), = backend.allocate_kv_cache(KVCacheSpec(1, num_blocks, bs, kv_heads, d, dtype))
    attn = CpuPagedAttention(threads=2)
    if attn.native_decode is None:
        pytest.skip("no C compiler: the native kernel could not be built")
    rk, rv = torch.zeros(num_blocks, bs, kv_heads, d), torch.zeros(num_blocks, bs, kv_heads, d)
    table = [5, 2, 7, 0, 3]
    for chunk in [(0, ctx - 1), (ctx - 1, 1)]:  # a prefill, then one decode step (the C path)
        meta = meta_for([chunk], [table], bs)
        t = chunk[1]
        # the fused projection's layout: q, k, v are row-strided views of one [t, width] tensor
        qkv = torch.randn(t, (heads + 2 * kv_heads) * d)
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k, v = q.view(t, heads, d), k.view(t, kv_heads, d), v.view(t, kv_heads, d)
        got = attn.forward(q, k, v, kc, vc, meta, d ** -0.5)
        want = reference.paged_attention(q, k, v, rk, rv, meta, d ** -0.5)
        err = ((got - want).norm() / want.norm()).item()
        assert err < (1e-5 if dtype == "float32" else 2e-3), f"{chunk}: relative error {err:.2e}"
