"""cpu_gguf's float-weight matmul (csrc/float_matmul.h: F32, F16 and BF16 weights, as unquantized
GGUF tensors and Hugging Face checkpoints hold them) on every ISA build this CPU runs: against a
float64 reference within float32's accumulation bound, bit for bit the same on every path, and a
row's result independent of its batch."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ember.gguf.loader import QuantWeight
from ember_cpu_gguf import native
from ember_cpu_gguf.linear import QuantLinear

from quant_inputs import kernels

FLOATS = [Q.F32, Q.F16, Q.BF16]
RUNNABLE = [v for v in native.VARIANTS if native.runnable(v)[0]]




def float_weight(qtype, rows, cols, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    t = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
    data = w.to(t).contiguous().view(torch.uint8).numpy().reshape(rows, -1)
    return QuantWeight(f"w{seed}", qtype, (rows, cols), data)


@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("qtype", FLOATS, ids=lambda q: q.name)
def test_float_linear_matches_float64(qtype, variant):
    ks = kernels(variant)
    for rows, cols in [(40, 256), (7, 96), (33, 576)]:
        w = float_weight(qtype, rows, cols, rows)
        lin = QuantLinear([w], threads=2, kernels=ks)
        wf = w.dequantize().double()
        for m in (1, 2, 5, 9):
            x = torch.randn(m, cols)
            y = lin(x).double()
            want, size = x.double() @ wf.T, x.double().abs() @ wf.abs().T
            # 16 lanes of cols/16 fused multiply-adds, then 4 folds: at most n float32 roundings
            n = cols // 16 + 4
            assert ((y - want).abs() <= n * 2.0**-24 * size * 1.01).all(), (rows, cols, m)


@pytest.mark.parametrize("variant", native.VARIANTS)
def test_fused_float_parts_with_bias(variant):
    ks = kernels(variant)
    ws = [float_weight(Q.BF16, 64, 128, 1), float_weight(Q.BF16, 32, 128, 2), float_weight(Q.BF16, 32, 128, 3)]
    biases = [QuantWeight(f"b{i}", Q.F32, (w.shape[0],), np.random.default_rng(i).standard_normal(
        w.shape[0]).astype(np.float32).view(np.uint8).reshape(1, -1)) for i, w in enumerate(ws)]
    x = torch.randn(6, 128)
    fused = QuantLinear(ws, biases, threads=2, kernels=ks)(x)
    parts = torch.cat([QuantLinear([w], [b], threads=1, kernels=ks)(x) for w, b in zip(ws, biases)], dim=1)
    assert torch.equal(fused, parts)


@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("qtype", FLOATS, ids=lambda q: q.name)
def test_a_rows_result_does_not_depend_on_its_batch(qtype, variant):
    ks = kernels(variant)
    w = float_weight(qtype, 45, 512, 5)
    x = torch.randn(11, 512)
    for threads in (1, 2):
        lin = QuantLinear([w], threads=threads, kernels=ks)
        full = lin(x)
        for start, stop in [(0, 1), (3, 4), (2, 9), (10, 11)]:
            assert torch.equal(lin(x[start:stop].clone()), full[start:stop])
        wide = torch.randn(11, 700)
        wide[:, 100:612] = x
        assert torch.equal(lin(wide[:, 100:612]), full)


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="this CPU runs only one ISA build: nothing to compare")
@pytest.mark.parametrize("qtype", FLOATS, ids=lambda q: q.name)
def test_every_isa_build_gives_the_same_bits(qtype):
    w = float_weight(qtype, 41, 512, 3)
    x = torch.randn(37, 512) * 3
    x[0, :32] = 0.0
    x[1, 5] = 1e4
    outs = {v: QuantLinear([w], threads=2, kernels=kernels(v))(x) for v in RUNNABLE}
    ref = outs[RUNNABLE[-1]]
    for v, y in outs.items():
        assert torch.equal(y, ref), f"{v} differs from {RUNNABLE[-1]} by {(y - ref).abs().max():.3g}"


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda q: q.name)
def test_float_weights_stay_at_their_size(qtype):
    ks = kernels()
    w = float_weight(qtype, 48, 512, 0)
    lin = QuantLinear([w], threads=1, kernels=ks)
    assert lin.nbytes == w.data.nbytes


def fp8_weight(rows, cols, block, seed):
    from ember.quant.fp8 import Float8Weight

    g = torch.Generator().manual_seed(seed)
    data = (torch.randn(rows, cols, generator=g) * 40).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    data[0, :16] = np.arange(16, dtype=np.uint8)  # subnormals and zero
    data[1, :16] = np.arange(16, dtype=np.uint8) | 0x80
    scales = (torch.rand(rows, cols // block, generator=g) * 0.01 + 1e-4).numpy()
    return Float8Weight("w8", (rows, cols), data, scales)


@pytest.mark.parametrize("variant", native.VARIANTS)
@pytest.mark.parametrize("block", ["row", 128])
def test_fp8_linear_matches_float64(variant, block):
    ks = kernels(variant)
    for rows, cols in [(40, 256), (9, 512)]:
        w = fp8_weight(rows, cols, cols if block == "row" else block, rows)
        lin = QuantLinear([w], threads=2, kernels=ks)
        assert lin.nbytes == rows * cols + rows * (cols // w.block) * 4  # a byte a weight, and the scales
        wf = w.dequantize().double()
        for m in (1, 3, 8):
            x = torch.randn(m, cols)
            y = lin(x).double()
            want, size = x.double() @ wf.T, x.double().abs() @ wf.abs().T
            n = cols // 16 + 4 + cols // w.block
            assert ((y - want).abs() <= n * 2.0**-24 * size * 1.01).all(), (rows, cols, m)
            assert torch.equal(lin(x[-1:].clone()), lin(x)[-1:])


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="this CPU runs only one ISA build: nothing to compare")
def test_fp8_gives_the_same_bits_on_every_isa():
    w = fp8_weight(41, 512, 128, 3)
    x = torch.randn(13, 512)
    outs = {v: QuantLinear([w], threads=2, kernels=kernels(v))(x) for v in RUNNABLE}
    for v, y in outs.items():
        assert torch.equal(y, outs[RUNNABLE[-1]]), v
