"""cpu_gguf's C kernels against the core's reference: quantized matmul for every supported GGUF
type on every ISA build this CPU runs (AVX-512 VNNI/AMX, AVX2, scalar: each skips with the reason
where the CPU lacks it), the builds against each other bit for bit, and the fused layer operations."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from ember.gguf.loader import QuantWeight
from ember.ops import reference
from ember.ops.layer_ops import LayerOps
from ember_cpu_gguf import native
from ember_cpu_gguf.layer_ops import NativeLayerOps
from ember_cpu_gguf.linear import QuantLinear

from quant_inputs import (K_QUANTS, LEGACY, activation_terms, expected_product, kernels,  # noqa: E402
                         quantized_activations, weight)


def rounding_bound(x):
    """|x - x'| for x' the one-term activations: half a step, max|x| / 254, per group of 32."""
    b = x.double().reshape(x.shape[0], -1, 32)
    return (b.abs().amax(-1, keepdim=True) / 254).expand_as(b).reshape(x.shape)




# every type on two activation terms (the default) and on one (--int8-activations)
TYPES_AND_TERMS = [pytest.param(q, one, id=q.name + ("-one-term" if one else ""))
                   for q in LEGACY + K_QUANTS for one in (False, True)]


@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("qtype,one_term", TYPES_AND_TERMS)
def test_quantized_linear_matches_reference(qtype, one_term, variant):
    ks = kernels(variant)
    torch.manual_seed(int(qtype))
    terms = activation_terms(qtype, one_term)
    shapes = [(40, 256), (16, 512)] + ([(7, 96), (9, 32)] if qtype in LEGACY else [])
    for rows, cols in shapes:
        w = weight(qtype, rows, cols, rows)
        lin = QuantLinear([w], threads=2, kernels=ks, one_term=one_term)
        wf = w.dequantize().double()
        for m in (1, 5):
            x = torch.randn(m, cols)
            y = lin(x).double()
            # exact arithmetic on the quantized activations, up to float32 rounding; the bound
            # scales with the terms summed (|x| |w|), since a zero point's term cancels much of
            # the integer dot product's (a wrong index or scale errs by the result's own size)
            xq = quantized_activations(x, terms)
            want, size = xq @ wf.T, xq.abs() @ wf.abs().T
            assert ((y - want).abs() <= 1e-5 * size.max(dim=1, keepdim=True).values).all(), (rows, cols, m)
            # and close to the float reference: two int8 terms are about 16-bit precision; one
            # rounds each activation by at most half its step, max|x| / 254 in its group of 32
            ref = reference.linear(x, [w]).double()
            if terms == 2:
                assert (y - ref).norm() / ref.norm() < 1e-4
            else:
                assert ((y - ref).abs() <= 1.001 * rounding_bound(x) @ wf.abs().T + 1e-4).all()


@pytest.mark.parametrize("variant", native.VARIANTS)
def test_fused_parts_of_mixed_types_with_bias(variant):
    # a Q4_K_M-style fused qkv: q and k in Q4_K, v in Q6_K
    ks = kernels(variant)
    torch.manual_seed(0)
    ws = [weight(Q.Q4_K, 64, 256, 1), weight(Q.Q4_K, 32, 256, 2), weight(Q.Q6_K, 32, 256, 3)]
    biases = [QuantWeight(f"b{i}", Q.F32, (w.shape[0],), np.random.default_rng(i).standard_normal(
        w.shape[0]).astype(np.float32).view(np.uint8).reshape(1, -1)) for i, w in enumerate(ws)]
    lin = QuantLinear(ws, biases, threads=2, kernels=ks)
    x = torch.randn(6, 256)
    want = expected_product(x, ws)
    want += torch.cat([b.dequantize() for b in biases]).double()
    assert (lin(x).double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("qtype,one_term", [(Q.Q4_1, False), (Q.Q8_0, False), (Q.Q8_0, True), (Q.Q6_K, False)],
                         ids=["Q4_1", "Q8_0", "Q8_0-one-term", "Q6_K"])
def test_a_rows_result_does_not_depend_on_its_batch(qtype, one_term, variant):
    ks = kernels(variant)
    w = weight(qtype, 48, 512, 5)
    x = torch.randn(11, 512)
    for threads in (1, 2):
        lin = QuantLinear([w], threads=threads, kernels=ks, one_term=one_term)
        full = lin(x)
        for start, stop in [(0, 1), (3, 4), (2, 9), (10, 11)]:
            assert torch.equal(lin(x[start:stop].clone()), full[start:stop])
        # a strided view of the rows gives the same bits as a copy
        wide = torch.randn(11, 700)
        wide[:, 100:612] = x
        assert torch.equal(lin(wide[:, 100:612]), full)


@pytest.mark.parametrize("qtype,one_term", TYPES_AND_TERMS)
def test_amx_tiles_give_the_vnni_paths_bits(qtype, one_term):
    """Batches of 16+ rows run on AMX where the CPU has it; a row must come out the same either
    way, or batch invariance would break at 16 rows."""
    ks = kernels()
    if not ks.amx:
        pytest.skip("no AMX here (or the kernel did not grant tile state)")
    torch.manual_seed(1)
    w = weight(qtype, 48, 512, 9)
    lin = QuantLinear([w], threads=2, kernels=ks, one_term=one_term)
    x = torch.randn(37, 512)  # two AMX tiles and a 5-row tail
    try:
        amx = lin(x)
        ks.set_amx(0)
        vnni = lin(x)
    finally:
        ks.set_amx(1)
    assert torch.equal(amx, vnni)
    assert torch.equal(amx[3:4], lin(x[3:4].clone()))


def test_quantized_linear_refuses_what_it_cannot_run():
    ks = kernels()
    iq = QuantWeight("h", Q.IQ4_NL, (4, 64), np.zeros((4, 36), np.uint8))
    f16 = QuantWeight("h", Q.F16, (4, 64), np.zeros((4, 128), np.uint8))
    assert not QuantLinear.accepts([iq], ks)
    assert not QuantLinear.accepts([weight(Q.Q4_0, 4, 64, 0), weight(Q.Q4_0, 4, 96, 1)], ks)  # widths differ
    assert not QuantLinear.accepts([weight(Q.Q4_0, 4, 64, 0), f16], ks)  # float and quantized parts
    assert not QuantLinear.accepts([weight(Q.Q4_0, 4, 64, 0)], None)
    with pytest.raises(ValueError):
        QuantLinear([iq], kernels=ks)


def layer_ops(variant=None):
    lib = native.layer_ops(variant)
    if lib is None:
        pytest.skip("no C compiler")
    return NativeLayerOps(lib, threads=2)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_fused_rms_norm_matches_torch(rows):
    ops, ref = layer_ops(), LayerOps()
    x, res, w = torch.randn(rows, 576), torch.randn(rows, 576), torch.rand(576) + 0.5
    y, stream = ops.rms_norm(x, w, 1e-5)
    y_ref, _ = ref.rms_norm(x, w, 1e-5)
    assert stream is x and torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    want_y, want_stream = ref.rms_norm(x, w, 1e-5, res.clone())
    y, stream = ops.rms_norm(x, w, 1e-5, res)
    assert stream is res  # updated in place: the residual stream moves on
    assert torch.allclose(stream, want_stream, rtol=1e-6, atol=1e-6)
    assert torch.allclose(y, want_y, rtol=1e-5, atol=1e-6)
    # a view the C code does not take falls back to torch
    q = torch.randn(2, 3, 64)
    assert torch.allclose(ops.rms_norm(q, torch.ones(64), 1e-6)[0], ref.rms_norm(q, torch.ones(64), 1e-6)[0])


def test_fused_rope_in_place_matches_torch():
    from ember.config import ModelConfig
    from ember.ops.rope import rope_tables

    ops, ref = layer_ops(), LayerOps()
    cfg = ModelConfig(architecture="llama", vocab_size=10, hidden_size=576, num_layers=1, num_heads=9,
                      num_kv_heads=3, head_dim=64, intermediate_size=8, context_length=64)
    cos, sin = map(torch.from_numpy, rope_tables(cfg, 64))
    qkv = torch.randn(5, (9 + 3 + 3) * 64)
    q, k, _ = qkv.split([576, 192, 192], dim=-1)
    q, k = q.view(5, 9, 64), k.view(5, 3, 64)
    pos = torch.tensor([0, 7, 8, 33, 63])
    want_q, want_k = ref.rope(q.clone(), k.clone(), pos, cos, sin)
    got_q, got_k = ops.rope(q, k, pos, cos, sin)
    assert got_q.data_ptr() == q.data_ptr()  # rotated where the projection put it
    assert torch.allclose(got_q, want_q, rtol=1e-5, atol=1e-5) and torch.allclose(got_k, want_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 20])
def test_fused_swiglu_matches_torch(rows):
    ops, ref = layer_ops(), LayerOps()
    gu = torch.randn(rows, 2 * 1536) * 4
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamped ends
    assert torch.allclose(ops.swiglu(gu), ref.swiglu(gu), rtol=1e-5, atol=1e-6)


def test_each_build_runs_the_path_it_was_built_for():
    """The numbers would be right on the scalar fallback too, only slow: check each ISA's build
    really compiled its vector path, and that the default is the best this CPU runs."""
    paths = {"avx512": "avx512-vnni", "avx2": "avx2", "scalar": "scalar", "neon": "neon"}
    ran = 0
    for variant in native.VARIANTS:
        if native.runnable(variant)[0]:
            assert kernels(variant).path == paths[variant]
            ran += 1
            if variant == "scalar":
                assert not kernels(variant).vectorized and not kernels(variant).amx
    assert ran >= 1
    best = next(v for v in native.VARIANTS if native.runnable(v)[0])
    assert native.selected()[0] == best and kernels().path == paths[best]
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return
    if native.machine() == "x86_64":
        assert native.runnable("avx2")[0] == all(f in flags for f in ("avx2", "fma", "f16c", "bmi2"))
        assert native.runnable("avx512")[0] == all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"))
        if not ("amx_int8" in flags and "amx_tile" in flags) or not native.runnable("avx512")[0]:
            assert not kernels().amx


@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS, ids=lambda q: q.name)
def test_repacked_weights_are_the_files_size(qtype):
    """Every type stays at its own size in memory (a 5- or 6-bit type is not widened to 8 bits):
    what decode streams per token is what the file holds."""
    ks = kernels()
    per, nbytes = GGML_QUANT_SIZES[qtype]
    for rows, cols in [(48, 512), (3072, 576 if qtype in LEGACY else 768)]:
        assert ks.repacked_size(int(qtype), rows, cols) == rows * cols // per * nbytes
    assert ks.repacked_size(int(qtype), 40, 512) == 48 * 512 // per * nbytes  # padded to whole panels


RUNNABLE = [v for v in native.VARIANTS if native.runnable(v)[0]]


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="this CPU runs only one ISA build: nothing to compare")
@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS, ids=lambda q: q.name)
def test_every_isa_build_gives_the_same_bits(qtype):
    """Every path computes the same integer dots and float steps in the same order: a row's result
    must not depend on the CPU that ran it (nor, with AMX, on the 16-row tiles)."""
    torch.manual_seed(int(qtype))
    w = weight(qtype, 40, 512, 3)
    x = torch.randn(37, 512) * 3  # 37 rows: MR tiles, a tail, and (on AMX) two 16-row tiles
    x[0, :32] = 0.0  # an all-zero block (amax = 0)
    x[1, 5] = 1e4  # one large value in a block: the rest round to small integers
    for one_term in (False, True):
        outs = {v: QuantLinear([w], threads=2, kernels=kernels(v), one_term=one_term)(x) for v in RUNNABLE}
        ref = outs[RUNNABLE[-1]]
        for v, y in outs.items():
            assert torch.equal(y, ref), f"{v} differs from {RUNNABLE[-1]} by {(y - ref).abs().max():.3g} ({one_term=})"


def test_max_cpu_isa_caps_the_choice(monkeypatch):
    """EMBER_MAX_CPU_ISA, like oneDNN's ONEDNN_MAX_CPU_ISA, measures a slower path on a faster CPU."""
    monkeypatch.setenv("EMBER_MAX_CPU_ISA", "scalar")
    native.selected.cache_clear()
    try:
        assert native.selected()[0] == "scalar"
        assert "EMBER_MAX_CPU_ISA" in native.selected()[1] or RUNNABLE == ["scalar"]
    finally:
        native.selected.cache_clear()


ASAN_SCRIPT = r"""
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from ember.gguf.loader import QuantWeight
from ember_cpu_gguf import native
from ember_cpu_gguf.packed import PackedLinear
rng = np.random.default_rng(0)
for variant in [v for v in native.VARIANTS if native.runnable(v)[0]]:
    ks = native.quant_matmul(variant)
    for qtype in [t for t in Q if ks.supported(int(t))]:
        per, nbytes = GGML_QUANT_SIZES[qtype]
        for rows in (40, 48):  # whole panels end at the buffer's end: an overrun is caught
            data = rng.integers(0, 256, (rows, 256 // per * nbytes), dtype=np.uint8)
            for one_term in (False, True):
                lin = PackedLinear([QuantWeight("w", qtype, (rows, 256), data)], None, 2, ks, one_term=one_term)
                for m in (1, 2, 37):  # the 1-2 row tiles, and 4-row tiles with a tail
                    x, y = rng.standard_normal((m, 256)).astype(np.float32), np.empty((m, rows), np.float32)
                    lin.run(x.ctypes.data, 256, m, y.ctypes.data)
print("clean")
"""


def test_repack_and_matmul_stay_in_bounds_under_addresssanitizer(tmp_path):
    """Every type, every ISA this CPU runs, panels ending at the buffer's end, under ASan: a write
    past the panels (once, a 4-bit type wrote a high plane it does not have) fails here, where
    otherwise it crashed a server now and then."""
    import shutil
    import subprocess
    import sys

    cc = native.compiler()
    libasan = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip() if cc else ""
    if not libasan or not shutil.os.path.isabs(libasan):
        pytest.skip("no C compiler with AddressSanitizer's runtime (libasan)")
    # EMBER_KERNEL_FLAGS: the first-use build with the sanitizer (the prebuilt libraries don't match it)
    env = dict(shutil.os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0", EMBER_KERNEL_CACHE=str(tmp_path),
               EMBER_MAX_CPU_ISA="", EMBER_KERNEL_FLAGS="-O1 -fsanitize=address -fno-omit-frame-pointer")
    out = subprocess.run([sys.executable, "-c", ASAN_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr[-3000:]
