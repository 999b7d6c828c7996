"""cpu_gguf's linear and embedding layers against the core's reference dequantize-then-matmul."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from ember.gguf.loader import QuantWeight
from ember.ops import reference
from ember_cpu_gguf.linear import DenseLinear, QuantizedEmbedding, _mkl_packing


def quant_weight(name, qtype, rows, cols, seed):
    rng = np.random.default_rng(seed)
    data = quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype).view(np.uint8)
    return QuantWeight(name, qtype, (rows, cols), data.reshape(rows, -1))


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.F32])
@pytest.mark.parametrize("pack", [True, False])
def test_fused_linear_matches_reference(qtype, pack):
    ws = [quant_weight(f"w{i}", qtype, rows, 64, i) for i, rows in enumerate((96, 32, 32))]
    if pack and not _mkl_packing():
        pytest.skip("this torch has no MKL: the packed path is not available")
    lin = DenseLinear(ws, pack=pack)
    for m in (1, 5, 64):
        x = torch.randn(m, 64)
        want = reference.linear(x, ws)
        assert torch.allclose(lin(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _mkl_packing(), reason="this torch has no MKL: the packed path is not available")
def test_mkl_packed_rows_do_not_depend_on_their_batch_on_avx512():
    """MKL's packed GEMM gives a row the same bits in any batch on an Intel AVX-512 CPU (plain
    sgemm's one-row path differs in the last bit). Elsewhere MKL picks other kernels and it does
    not hold: on AVX2, and on AMD's AVX-512 CPUs (Zen 4), where MKL runs its AVX2 code."""
    from ember_cpu_gguf import native

    if not native.runnable("avx512")[0]:
        pytest.skip("MKL's packed GEMM is batch-invariant only on AVX-512 CPUs, and this one has none")
    if "GenuineIntel" not in open("/proc/cpuinfo").read():
        pytest.skip("MKL runs its AVX-512 kernels on Intel CPUs only; this CPU is not an Intel one")
    ws = [quant_weight(f"w{i}", GGMLQuantizationType.Q8_0, rows, 64, i) for i, rows in enumerate((96, 32, 32))]
    lin = DenseLinear(ws, pack=True)
    x = torch.randn(64, 64)
    assert torch.equal(lin(x)[:1], lin(x[:1].contiguous()))


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.F32])
def test_embedding_dequantizes_only_looked_up_rows_exactly(qtype):
    w = quant_weight("emb", qtype, 100, 64, 7)
    emb = QuantizedEmbedding(w)
    ids = torch.tensor([[3, 99, 0], [3, 5, 7]])
    assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, w.dequantize()))
