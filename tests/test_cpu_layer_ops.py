"""cpu_gguf's fused layer operations (csrc/layer_ops.c: RMSNorm with the residual add, RoPE,
SwiGLU, the embedding lookup) on every ISA build this CPU runs (each skips with the reason where
the CPU lacks it): against float64 or the reference's exact float steps, and every vector build bit
for bit against the portable one (the kernels are written once over 16-lane vector operations that
each ISA implements with the same per-lane float steps, and one fixed order for every sum)."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, quants

from ember.gguf.loader import QuantWeight
from ember_cpu_gguf import native

BASE = native.VARIANTS[-1]  # the portable build ("scalar")
OTHERS = [v for v in native.VARIANTS if v != BASE] or [BASE]
THREADS = 2


def ops_or_skip(variant):
    ok, why = native.runnable(variant)
    if not ok:
        pytest.skip(f"{variant}: {why}")
    lib = native.layer_ops(variant)
    if lib is None:
        pytest.skip("no C compiler: the pure-torch fallback is what runs here")
    return lib


def pair_or_skip(variant):
    """The libraries of `variant` and of the portable build, to compare."""
    if variant == BASE:
        pytest.skip(f"{BASE} is this architecture's only build")
    return ops_or_skip(variant), ops_or_skip(BASE)


# ------------------------------------------------------------------------------------------------
# the calls, on row-strided views as the model hands them over


def rows_view(rows, width, g, pad=5, scale=1.0):
    """[rows, width] float32 rows of a wider tensor (row stride width + pad)."""
    return (torch.randn(rows, width + pad, generator=g) * scale)[:, :width]


def rms_norm(lib, x, w, eps, res=None):
    """(out, the residual stream after) for x (+ res)."""
    m, d = x.shape
    res = None if res is None else res.clone()
    out = torch.full((m, d + 3), float("nan"))[:, :d]  # strided output rows too
    lib.rms_norm(x.data_ptr(), x.stride(0), None if res is None else res.data_ptr(), 0 if res is None else res.stride(0),
                 w.data_ptr(), out.data_ptr(), out.stride(0), m, d, eps, THREADS)
    return out.clone(), res


def rope(lib, q, k, pos, cos, sin, rot):
    """q [T, hq, D], k [T, hk, D] as views of one fused row; rotated copies of both."""
    qkv = torch.cat([q.flatten(1), k.flatten(1), torch.zeros(q.shape[0], 7)], 1)  # a fused projection's row
    qv, kv = qkv[:, :q[0].numel()], qkv[:, q[0].numel():q[0].numel() + k[0].numel()]
    lib.rope(qv.data_ptr(), qkv.stride(0), q.shape[1], kv.data_ptr(), qkv.stride(0), k.shape[1], q.shape[0],
             pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.stride(0), q.shape[2], rot)
    assert torch.equal(qkv[:, -7:], torch.zeros(q.shape[0], 7))  # nothing past k is touched
    return qv.reshape(q.shape).clone(), kv.reshape(k.shape).clone()


def swiglu(lib, gu):
    m, width = gu.shape
    i = width // 2
    out = torch.full((m, i), float("nan"))
    lib.swiglu(gu.data_ptr(), gu.stride(0), out.data_ptr(), out.stride(0), m, i, THREADS)
    return out


def dequant_rows(lib, qtype, data, ids, dim):
    out = torch.full((len(ids), dim), float("nan"))
    rc = lib.dequant_rows(int(qtype), data.ctypes.data, data.strides[0], ids.ctypes.data, len(ids), out.data_ptr(), dim)
    return rc, out


# ------------------------------------------------------------------------------------------------
# inputs: widths with and without a partial last vector of 16


RMS_SHAPES = [(1, 576), (3, 576), (40, 576), (17, 64), (5, 37), (20, 1000), (2, 7), (1, 2048)]


def rms_inputs(rows, d, seed):
    g = torch.Generator().manual_seed(seed)
    return rows_view(rows, d, g, scale=3.0), rows_view(rows, d, g), torch.rand(d, generator=g) + 0.5


# (head_dim, rotated dims): the whole head, half of it (partial rotary), a half of 20 (16 + 4 lanes)
ROPE_SHAPES = [(64, 64), (128, 64), (40, 40), (64, 32), (16, 6)]


def rope_inputs(d, rot, seed, tokens=6, hq=9, hk=3):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(tokens, hq, d, generator=g), torch.randn(tokens, hk, d, generator=g)
    theta = torch.arange(64.0)[:, None] * torch.rand(rot // 2, generator=g)[None, :]
    cos, sin = torch.cat([theta.cos()] * 2, 1).float(), torch.cat([theta.sin()] * 2, 1).float()
    pos = torch.randint(0, 64, (tokens,), generator=g)
    return q, k, pos, cos.contiguous(), sin.contiguous()


def rope_torch(x, pos, cos, sin, rot):
    """The same float32 steps as the kernel, in torch: a c - b s, b c' + a s' (no fusing)."""
    x = x.clone()
    half = rot // 2
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    a, b = x[..., :half].clone(), x[..., half:rot].clone()
    x[..., :half] = a * c[..., :half] - b * s[..., :half]
    x[..., half:rot] = b * c[..., half:] + a * s[..., half:]
    return x


SWIGLU_SHAPES = [(1, 1536), (20, 1536), (3, 100), (2, 7)]
ENDS = [-100.0, 100.0, 0.0, -0.0, -87.5, 88.5, -88.0, 87.0, 1e-30, -1e-30, 30.0, -30.0]


def swiglu_inputs(rows, i, seed):
    g = torch.Generator().manual_seed(seed)
    gu = rows_view(rows, 2 * i, g, scale=4.0)
    n = min(len(ENDS), i)
    gu[0, :n] = torch.tensor(ENDS[:n])  # exp's clamped ends, signed zeros, tiny values
    return gu


EMBED_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]


def embedding_table(qtype, dim, seed):
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((40, dim)) * 2).astype(np.float32)
    data = table if qtype == Q.F32 else quants.quantize(table, qtype)
    data = np.ascontiguousarray(data).view(np.uint8).reshape(40, -1)
    return QuantWeight("e", qtype, (40, dim), data)


EMBED_IDS = np.array([3, 0, 39, 3, 17], np.int64)


def embed_cases():
    for qtype in EMBED_TYPES:
        for dim in ([96, 40] if qtype in (Q.F32, Q.F16, Q.BF16) else [96]):
            yield qtype, dim


# ------------------------------------------------------------------------------------------------
# against the reference, on every build


@pytest.mark.parametrize("variant", native.VARIANTS)
def test_rms_norm_matches_float64(variant):
    lib = ops_or_skip(variant)
    for seed, (rows, d) in enumerate(RMS_SHAPES):
        x, res, w = rms_inputs(rows, d, seed)
        for with_res in (False, True):
            y = (x + res) if with_res else x  # float32: the stream the kernel must leave
            y64 = y.double()
            want = w.double() * y64 / (y64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
            got, stream = rms_norm(lib, x, w, 1e-5, res if with_res else None)
            assert torch.allclose(got.double(), want, rtol=2e-6, atol=1e-6), f"{rows}x{d}, residual {with_res}"
            if with_res:
                assert torch.equal(stream, y), f"{rows}x{d}: the residual stream is one float32 add"


@pytest.mark.parametrize("variant", native.VARIANTS)
def test_rope_is_the_references_float32_steps(variant):
    lib = ops_or_skip(variant)
    for seed, (d, rot) in enumerate(ROPE_SHAPES):
        q, k, pos, cos, sin = rope_inputs(d, rot, seed)
        got_q, got_k = rope(lib, q, k, pos, cos, sin, rot)
        # every element is two products and a sum, each rounded: the very bits torch computes
        assert torch.equal(got_q, rope_torch(q, pos, cos, sin, rot)), f"head_dim {d}, rot {rot}"
        assert torch.equal(got_k, rope_torch(k, pos, cos, sin, rot)), f"head_dim {d}, rot {rot}"


@pytest.mark.parametrize("variant", native.VARIANTS)
def test_swiglu_matches_float64(variant):
    lib = ops_or_skip(variant)
    for seed, (rows, i) in enumerate(SWIGLU_SHAPES):
        gu = swiglu_inputs(rows, i, seed)
        g, u = gu[:, :i].double(), gu[:, i:].double()
        want = g / (1 + torch.exp(-g)) * u
        got = swiglu(lib, gu)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), f"{rows}x{i}"


@pytest.mark.parametrize("variant", native.VARIANTS)
def test_embedding_rows_are_the_reference_dequantization(variant):
    lib = ops_or_skip(variant)
    for qtype, dim in embed_cases():
        w = embedding_table(qtype, dim, int(qtype))
        rc, got = dequant_rows(lib, qtype, w.data, EMBED_IDS, dim)
        assert rc == 0, qtype.name
        want = torch.as_tensor(np.asarray(w.dequantize()))[EMBED_IDS]
        assert torch.equal(got, want.float()), f"{qtype.name}, dim {dim}"
    rc, _ = dequant_rows(lib, Q.Q4_K, np.zeros((40, 144), np.uint8), EMBED_IDS, 256)
    assert rc == -2  # declined: the caller dequantizes K-quants itself


# ------------------------------------------------------------------------------------------------
# every vector build against the portable one, bit for bit


@pytest.mark.parametrize("variant", OTHERS)
def test_rms_norm_gives_the_portable_builds_bits(variant):
    lib, base = pair_or_skip(variant)
    for seed, (rows, d) in enumerate(RMS_SHAPES):
        x, res, w = rms_inputs(rows, d, seed)
        for r in (None, res):
            for eps in (1e-5, 1e-6):
                (a, sa), (b, sb) = rms_norm(lib, x, w, eps, r), rms_norm(base, x, w, eps, r)
                assert torch.equal(a, b), f"{rows}x{d}, residual {r is not None}, eps {eps}"
                assert r is None or torch.equal(sa, sb)


@pytest.mark.parametrize("variant", OTHERS)
def test_rope_gives_the_portable_builds_bits(variant):
    lib, base = pair_or_skip(variant)
    for seed, (d, rot) in enumerate(ROPE_SHAPES):
        q, k, pos, cos, sin = rope_inputs(d, rot, seed)
        (qa, ka), (qb, kb) = rope(lib, q, k, pos, cos, sin, rot), rope(base, q, k, pos, cos, sin, rot)
        assert torch.equal(qa, qb) and torch.equal(ka, kb), f"head_dim {d}, rot {rot}"


@pytest.mark.parametrize("variant", OTHERS)
def test_swiglu_gives_the_portable_builds_bits(variant):
    """exp16 on every lane, its clamped ends included, then the division and the product."""
    lib, base = pair_or_skip(variant)
    for seed, (rows, i) in enumerate(SWIGLU_SHAPES):
        gu = swiglu_inputs(rows, i, seed)
        a, b = swiglu(lib, gu), swiglu(base, gu)
        assert torch.equal(a, b), f"{rows}x{i}: {(a != b).sum().item()} elements differ"
    # a sweep of exp's whole range (and past both clamps), every rounding of the reduction
    sweep = torch.linspace(-120, 120, 2 * 4096 + 5)
    gu = torch.stack([sweep, torch.ones_like(sweep)], 0).reshape(1, -1)
    assert torch.equal(swiglu(lib, gu), swiglu(base, gu))


@pytest.mark.parametrize("variant", OTHERS)
def test_embedding_gives_the_portable_builds_bits(variant):
    lib, base = pair_or_skip(variant)
    for qtype, dim in embed_cases():
        w = embedding_table(qtype, dim, int(qtype))
        (ra, a), (rb, b) = dequant_rows(lib, qtype, w.data, EMBED_IDS, dim), dequant_rows(base, qtype, w.data, EMBED_IDS, dim)
        assert ra == rb == 0 and torch.equal(a, b), f"{qtype.name}, dim {dim}"
