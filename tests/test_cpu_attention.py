"""cpu_gguf's paged attention against the core's float64 reference, over ragged batches, on every
ISA build this CPU runs (each skips with the reason where the CPU lacks it), and the builds against
each other bit for bit."""
import ctypes
import random

import pytest
import torch

from ember.backend import AttentionMetadata, KVCacheSpec
from ember.ops import reference
from ember_cpu_gguf import native
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


# The prefill kernel on its own, called as a torch-free runner would: raw cache contents, block
# tables and row offsets, against float64 attention over the same (float32 or float16) cache values.

def runnable_or_skip(variant):
    ok, why = native.runnable(variant)
    if not ok:
        pytest.skip(f"{variant}: {why}")


def paged_prefill_or_skip(dtype, variant):
    runnable_or_skip(variant)
    fn = native.paged_prefill(dtype, variant)
    if fn is None:
        pytest.skip("no C compiler: the pure-torch fallback is what runs here")
    return fn


DECODE_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
               ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
               ctypes.c_int64, ctypes.c_void_p]
WRITE_ARGS = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
              ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int]


def attention_fn_or_skip(name, dtype, variant, argtypes, restype):
    """`name` (or `name`_f16) from `variant`'s build of paged_attention.c."""
    runnable_or_skip(variant)
    lib = native.load("paged_attention", variant)
    if lib is None:
        pytest.skip("no C compiler: the pure-torch fallback is what runs here")
    fn = lib[name + ("_f16" if dtype == "float16" else "")]  # a fresh function object: its own argtypes
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def random_cache(chunks, kv_heads, d, block_size, dtype, seed):
    """A pool with random keys and values, and scattered blocks for sequences of (cached, new) tokens."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(a + n) // block_size) for a, n in chunks]
    num_blocks = sum(need) + 5
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(k)] for k in need]
    width = max(need)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    kc = torch.randn(kv_heads, num_blocks, d, block_size, generator=g).to(getattr(torch, dtype))
    vc = torch.randn(kv_heads, num_blocks, block_size, d, generator=g).to(getattr(torch, dtype))
    starts = torch.tensor([0] + [n for _, n in chunks]).cumsum(0)
    lens = torch.tensor([a + n for a, n in chunks])
    return kc, vc, bt, starts, lens


def prefill_reference(q, kc, vc, bt, starts, lens, scale):
    """Causal grouped-query attention in float64 over the cache as it is."""
    kvh, _, d, bs = kc.shape
    group = q.shape[1] // kvh
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, ctx in enumerate(lens.tolist()):
        a, b = starts[i].item(), starts[i + 1].item()
        blocks = bt[i, :-(-ctx // bs)]
        kk = kc[:, blocks].double().transpose(-1, -2).reshape(kvh, -1, d)[:, :ctx].repeat_interleave(group, 0)
        vv = vc[:, blocks].double().reshape(kvh, -1, d)[:, :ctx].repeat_interleave(group, 0)
        s = q[a:b].double().transpose(0, 1) @ kk.transpose(-1, -2) * scale  # [heads, n, ctx]
        qpos = torch.arange(ctx - (b - a), ctx)[:, None]
        s = s.masked_fill(torch.arange(ctx)[None, :] > qpos, float("-inf"))
        out[a:b] = (s.softmax(-1) @ vv).transpose(0, 1)
    return out


def call_prefill(fn, q, kc, vc, bt, starts, lens, scale, threads=2):
    kvh, nb, d, bs = kc.shape
    out = torch.full(q.shape, float("nan"))
    rc = fn(q.data_ptr(), q.stride(0), kc.data_ptr(), vc.data_ptr(), bt.data_ptr(), bt.stride(0), starts.data_ptr(),
            lens.data_ptr(), lens.shape[0], out.data_ptr(), q.shape[1], kvh, d, nb, bs, scale, threads)
    assert rc == 0, f"kernel returned {rc}"
    return out


def strided_q(tokens, heads, d, g):
    """q as the fused projection leaves it: rows of a wider [tokens, (heads + extra) * d] tensor."""
    return torch.randn(tokens, heads * d + 3 * d, generator=g)[:, : heads * d].view(tokens, heads, d)


@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("group, kv_heads, d, block_size, seed", [
    (1, 4, 64, 16, 0), (3, 3, 64, 16, 1), (4, 2, 128, 8, 2), (8, 1, 128, 32, 3), (3, 2, 128, 32, 4),
    (8, 2, 64, 8, 5), (4, 1, 64, 32, 6)])
def test_prefill_kernel_matches_float64(group, kv_heads, d, block_size, seed, dtype, variant):
    """Ragged chunks (1 new token up to a few hundred), some after cached context (chunked prefill,
    prefix hits), several sequences in one call."""
    fn = paged_prefill_or_skip(dtype, variant)
    rng = random.Random(seed)
    chunks = [(rng.choice([0, rng.randint(1, 400)]), rng.choice([1, rng.randint(2, 40), rng.randint(100, 300)]))
              for _ in range(rng.randint(2, 5))]
    chunks[0] = (0, rng.randint(150, 300))  # always one whole prompt
    chunks[-1] = (rng.randint(100, 300), rng.randint(2, 130))  # and one chunk after cached context
    kc, vc, bt, starts, lens = random_cache(chunks, kv_heads, d, block_size, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    q = strided_q(starts[-1].item(), group * kv_heads, d, g)
    got = call_prefill(fn, q, kc, vc, bt, starts, lens, d ** -0.5)
    want = prefill_reference(q, kc, vc, bt, starts, lens, d ** -0.5)
    err = ((got - want).norm() / want.norm()).item()
    worst = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5 and worst < 1e-5, f"{chunks}: relative error {err:.2e}, worst element {worst:.2e}"


@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_prefill_rows_do_not_depend_on_the_batch(dtype, variant):
    """A sequence's rows are bit-identical whether it is computed alone or with others, on 1 or 2
    threads; a decode row gets exactly what the decode kernel gives it."""
    fn = paged_prefill_or_skip(dtype, variant)
    heads, kv_heads, d, bs = 9, 3, 64, 16
    chunks = [(0, 200), (37, 1), (130, 75), (0, 3), (250, 1), (64, 64)]
    kc, vc, bt, starts, lens = random_cache(chunks, kv_heads, d, bs, dtype, 7)
    q = strided_q(starts[-1].item(), heads, d, torch.Generator().manual_seed(7))
    scale = d ** -0.5
    together = {th: call_prefill(fn, q, kc, vc, bt, starts, lens, scale, th) for th in (1, 2)}
    assert torch.equal(together[1], together[2])
    for i in range(len(chunks)):
        a, b = starts[i].item(), starts[i + 1].item()
        for th in (1, 2):
            alone = call_prefill(fn, q[a:b], kc, vc, bt[i:i + 1], torch.tensor([0, b - a]), lens[i:i + 1], scale, th)
            assert torch.equal(alone, together[1][a:b]), f"sequence {i} on {th} threads"
    decode = attention_fn_or_skip("ember_paged_decode", dtype, variant, DECODE_ARGS, ctypes.c_int)
    rows = [i for i, (_, n) in enumerate(chunks) if n == 1]
    qd = q[starts[rows]].contiguous()
    tables, dl = bt[rows].contiguous(), lens[rows].contiguous()
    od = torch.empty(qd.shape)
    assert decode(qd.data_ptr(), qd.stride(0), kc.data_ptr(), vc.data_ptr(), tables.data_ptr(), tables.stride(0),
                  dl.data_ptr(), od.data_ptr(), len(rows), heads, kv_heads, d, kc.shape[1], bs, scale, 2,
                  None, None, 0, None) == 0
    assert torch.equal(od, together[1][starts[rows]])


@pytest.mark.parametrize("variant", native.VARIANTS)
def test_prefill_kernel_error_codes(variant):
    fn = paged_prefill_or_skip("float32", variant)
    kc, vc, bt, starts, lens = random_cache([(0, 20)], 2, 32, 16, "float32", 0)
    q = torch.randn(20, 4, 32)
    out = torch.empty(q.shape)

    def rc(heads=4, kv_heads=2, d=32, bs=16, lens=lens):
        return fn(q.data_ptr(), q.stride(0), kc.data_ptr(), vc.data_ptr(), bt.data_ptr(), bt.stride(0),
                  starts.data_ptr(), lens.data_ptr(), 1, out.data_ptr(), heads, kv_heads, d, kc.shape[1], bs, 0.1, 2)

    assert rc() == 0
    assert rc(bs=65) == -2
    assert rc(heads=5) == -3 and rc(heads=34, kv_heads=2) == -3 and rc(d=1025) == -3
    assert rc(lens=torch.tensor([19])) == -4  # 20 new tokens cannot fit in 19 positions


@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_chunked_prefill_gives_the_whole_prompts_bits(dtype, variant):
    """A row's arithmetic depends only on its position and the cache, not on the tile it falls in:
    a chunk after cached context (chunked prefill, a prefix-cache hit) reproduces the whole prompt's
    rows exactly. (A one-token chunk is a decode row: the decode kernel's arithmetic, not these bits.)"""
    fn = paged_prefill_or_skip(dtype, variant)
    for heads, kv_heads, bs in [(9, 3, 16), (8, 1, 8), (4, 4, 32)]:
        kc, vc, bt, starts, lens = random_cache([(0, 300)], kv_heads, 64, bs, dtype, heads)
        q = strided_q(300, heads, 64, torch.Generator().manual_seed(heads))
        whole = call_prefill(fn, q, kc, vc, bt, starts, lens, 0.125)
        for cached in (1, 17, 150, 298):
            part = call_prefill(fn, q[cached:], kc, vc, bt, torch.tensor([0, 300 - cached]), lens, 0.125)
            assert torch.equal(part, whole[cached:]), f"{heads} heads, {kv_heads} kv heads: a chunk after {cached}"


def test_reference_write_skips_padding_slots():
    """Slot -1 marks a padding row: the reference must leave the pool alone for it (indexing with
    -1 would write the pool's last slot)."""
    from ember.ops import reference

    k_cache, v_cache = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    k, v = torch.ones(3, 1, 8), 2 * torch.ones(3, 1, 8)
    reference.write_kv(k, v, k_cache, v_cache, torch.tensor([0, -1, 5]))
    flat_k, flat_v = k_cache.view(8, 8), v_cache.view(8, 8)
    assert flat_k[[0, 5]].eq(1).all() and flat_v[[0, 5]].eq(2).all()
    assert flat_k[[1, 2, 3, 4, 6, 7]].eq(0).all() and flat_v[7].eq(0).all()


# Every ISA's build against float64 and against each other. The kernels are written once over
# 16-lane vector operations that each ISA implements with the same per-lane float steps (fused
# multiply-adds where the vector code fuses, one fixed order for every sum), so the AVX-512 and
# AVX2 builds must give the portable build's bits exactly, on every shape the kernels take.

BASE = native.VARIANTS[-1]  # the portable build ("scalar")
OTHERS = [v for v in native.VARIANTS if v != BASE] or [BASE]

# (query heads per kv head, kv heads, head_dim, block size): the common shapes, and odd ones (a
# head_dim that is no multiple of 16, blocks of 1 or 5 slots, 64-slot blocks, 16 heads per kv head)
SHAPES = [(1, 2, 64, 16), (3, 3, 64, 16), (2, 2, 128, 8), (4, 1, 128, 32), (8, 1, 64, 8), (7, 1, 64, 16),
          (5, 1, 72, 5), (16, 1, 40, 64), (6, 1, 200, 1)]
ODD = 6  # SHAPES[ODD:] are the odd ones
# (cached, new) per sequence: ragged prompts, a chunk after cached context, decode rows, 300+ positions
MIXED = [(0, 310), (0, 37), (250, 60), (400, 1), (20, 1), (5, 2), (130, 75)]


def decode_inputs(shape, dtype, seed):
    """A decode batch: sequences of 1 to 400+ positions, the last one new; q a strided view."""
    group, kv_heads, d, bs = shape
    rng = random.Random(seed)
    ctxs = [1, 17, rng.randint(300, 420), 64, rng.randint(2, 200)]
    kc, vc, bt, _, lens = random_cache([(c - 1, 1) for c in ctxs], kv_heads, d, bs, dtype, seed)
    q = strided_q(len(ctxs), group * kv_heads, d, torch.Generator().manual_seed(seed))
    return q, kc, vc, bt, lens


def call_decode(fn, q, kc, vc, bt, lens, scale, threads=2, new=None):
    """new: (k_new, v_new [B, kv heads, d] float32, slots [B]) to write first, in the same call."""
    kvh, nb, d, bs = kc.shape
    out = torch.full(q.shape, float("nan"))
    k_new, v_new, slots = new if new is not None else (None, None, None)
    ptr = (lambda t: None if t is None else t.data_ptr())
    rc = fn(q.data_ptr(), q.stride(0), kc.data_ptr(), vc.data_ptr(), bt.data_ptr(), bt.stride(0), lens.data_ptr(),
            out.data_ptr(), q.shape[0], q.shape[1], kvh, d, nb, bs, scale, threads, ptr(k_new), ptr(v_new),
            0 if k_new is None else k_new.stride(0), ptr(slots))
    assert rc == 0, f"kernel returned {rc}"
    return out


def decode_new(bt, lens, kv_heads, d, bs, seed):
    g = torch.Generator().manual_seed(seed + 100)
    kv = torch.randn(len(lens), 2 * kv_heads * d, generator=g)  # k and v as views of one tensor
    k_new, v_new = kv[:, :kv_heads * d].view(-1, kv_heads, d), kv[:, kv_heads * d:].view(-1, kv_heads, d)
    slots = torch.tensor([bt[i, (n - 1) // bs].item() * bs + (n - 1) % bs for i, n in enumerate(lens.tolist())])
    return k_new, v_new, slots


@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "g{}-kv{}-d{}-bs{}".format(*s))
def test_decode_kernel_matches_float64(shape, dtype, variant):
    fn = attention_fn_or_skip("ember_paged_decode", dtype, variant, DECODE_ARGS, ctypes.c_int)
    q, kc, vc, bt, lens = decode_inputs(shape, dtype, SHAPES.index(shape))
    d = shape[2]
    got = call_decode(fn, q, kc, vc, bt, lens, d ** -0.5)
    want = prefill_reference(q, kc, vc, bt, torch.arange(len(lens) + 1), lens, d ** -0.5)
    err = ((got - want).norm() / want.norm()).item()
    worst = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5 and worst < 1e-5, f"relative error {err:.2e}, worst element {worst:.2e}"


@pytest.mark.parametrize("variant", OTHERS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_gives_the_portable_builds_bits(dtype, variant):
    """Every shape, with the new keys and values written by the same call (and by ember_write_kv):
    the outputs and the caches are the portable build's bits."""
    runnable_or_skip(variant)
    if variant == BASE:
        pytest.skip(f"{BASE} is this architecture's only build")
    fns = {v: attention_fn_or_skip("ember_paged_decode", dtype, v, DECODE_ARGS, ctypes.c_int) for v in (variant, BASE)}
    writes = {v: attention_fn_or_skip("ember_write_kv", dtype, v, WRITE_ARGS, None) for v in (variant, BASE)}
    for i, shape in enumerate(SHAPES):
        group, kv_heads, d, bs = shape
        q, kc, vc, bt, lens = decode_inputs(shape, dtype, i)
        new = decode_new(bt, lens, kv_heads, d, bs, i)
        got = {}
        for v in (variant, BASE):
            kc1, vc1 = kc.clone(), vc.clone()
            fused = call_decode(fns[v], q, kc1, vc1, bt, lens, d ** -0.5, new=new)
            kc2, vc2 = kc.clone(), vc.clone()
            k_new, v_new, slots = new
            writes[v](len(lens), k_new.data_ptr(), v_new.data_ptr(), k_new.stride(0), slots.data_ptr(), kc2.data_ptr(),
                      vc2.data_ptr(), kv_heads, d, kc.shape[1], bs, 2)
            assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2), f"{v} {shape}: the two writes differ"
            after = call_decode(fns[v], q, kc2, vc2, bt, lens, d ** -0.5, threads=1)
            assert torch.equal(fused, after), f"{v} {shape}: fused write, then 1 vs 2 threads"
            got[v] = (fused, kc1, vc1)
        for a, b, what in zip(got[variant], got[BASE], ("output", "key cache", "value cache")):
            assert torch.equal(a, b), f"{variant} vs {BASE}, {shape}: the {what} differs"


@pytest.mark.parametrize("variant", OTHERS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_prefill_gives_the_portable_builds_bits(dtype, variant):
    """Mixed steps (whole prompts, chunks after cached context, decode rows; 300+ positions) on
    every shape: bit for bit the portable build's output, which is itself float64's within 1e-5."""
    runnable_or_skip(variant)
    if variant == BASE:
        pytest.skip(f"{BASE} is this architecture's only build")
    fns = {v: paged_prefill_or_skip(dtype, v) for v in (variant, BASE)}
    for i, (group, kv_heads, d, bs) in enumerate(SHAPES):
        chunks = MIXED[i % 3:] + MIXED[:i % 3]  # the order varies too
        kc, vc, bt, starts, lens = random_cache(chunks, kv_heads, d, bs, dtype, i)
        q = strided_q(starts[-1].item(), group * kv_heads, d, torch.Generator().manual_seed(i))
        got = {v: call_prefill(fns[v], q, kc, vc, bt, starts, lens, d ** -0.5) for v in (variant, BASE)}
        shape = (group, kv_heads, d, bs)
        assert torch.equal(got[variant], got[BASE]), (
            f"{variant} vs {BASE}, {shape}: {(got[variant] != got[BASE]).sum().item()} elements differ")
        if i >= ODD and dtype == "float32":  # the odd shapes, which the float64 test above does not cover
            want = prefill_reference(q, kc, vc, bt, starts, lens, d ** -0.5)
            err = ((got[BASE] - want).norm() / want.norm()).item()
            assert err < 1e-5, f"{shape}: relative error {err:.2e}"
