"""ember.gguf.quants must equal gguf.quants.dequantize bit for bit."""
import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
import gguf.quants as gq

from ember.gguf import GGUFError, SUPPORTED_QTYPES, dequantize, row_nbytes

# Byte offsets of the fp16 scales inside one block; every other byte may be anything.
FP16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
QUANTIZABLE = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
SHAPES = [(1, 256), (3, 512), (2, 3, 256)]  # rows of whole K-blocks also fit the 32-blocks


def random_blocks(qtype: Q, shape, seed: int) -> np.ndarray:
    """Random bytes for `shape` values with finite, sign-mixed fp16 scales."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def reference(raw: np.ndarray, qtype: Q, shape) -> torch.Tensor:
    rows = raw.reshape(-1, row_nbytes(qtype, shape[-1]))
    return torch.from_numpy(np.ascontiguousarray(gq.dequantize(rows, qtype))).reshape(shape)


def assert_bit_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.equal(ours.view(torch.int32), ref.float().view(torch.int32))


def test_supported_set():
    expected = {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    assert SUPPORTED_QTYPES == expected


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", sorted(FP16_FIELDS, key=int), ids=lambda t: t.name)
def test_random_blocks_match_gguf(qtype, shape):
    raw = random_blocks(qtype, shape, seed=int(qtype) * 100 + len(shape))
    assert_bit_equal(dequantize(raw, qtype, shape), reference(raw, qtype, shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_floats_match_gguf(qtype, shape):
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., :32] = 0.0  # an all-zero block (zero scale)
    raw = np.ascontiguousarray(gq.quantize(x, qtype)).view(np.uint8).reshape(-1)
    ours = dequantize(raw, qtype, shape)
    assert_bit_equal(ours, reference(raw, qtype, shape))
    assert torch.allclose(ours, torch.from_numpy(x), atol=0.5)  # and it decodes to x roughly


def test_f32_is_exact_and_does_not_alias():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    raw = x.view(np.uint8).reshape(-1)
    out = dequantize(raw, Q.F32, (4, 8))
    assert torch.equal(out, torch.from_numpy(x))
    out[0, 0] = 123.0
    assert x[0, 0] != 123.0


def test_torch_input_and_read_only_numpy_input():
    raw = random_blocks(Q.Q4_K, (2, 256), seed=1)
    ref = reference(raw, Q.Q4_K, (2, 256))
    assert_bit_equal(dequantize(torch.from_numpy(raw.copy()), Q.Q4_K, (2, 256)), ref)
    ro = raw.copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when wrapping read-only memory
        assert_bit_equal(dequantize(ro, Q.Q4_K, (2, 256)), ref)
    # rows given as a 2-D [rows, row_nbytes] array (how QuantWeight stores them)
    assert_bit_equal(dequantize(raw.reshape(2, -1), Q.Q4_K, (2, 256)), ref)


def test_row_nbytes():
    assert row_nbytes(Q.Q4_1, 576) == 18 * 20
    assert row_nbytes(Q.Q6_K, 512) == 2 * 210
    assert row_nbytes(Q.F32, 7) == 28
    with pytest.raises(GGUFError, match="block size"):
        row_nbytes(Q.Q4_0, 33)


def test_unsupported_and_wrong_sizes():
    with pytest.raises(GGUFError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), Q.IQ2_XXS, (1, 256))
    with pytest.raises(GGUFError, match="999"):
        dequantize(np.zeros(4, np.uint8), 999, (1,))
    with pytest.raises(GGUFError, match="needs 36 bytes"):
        dequantize(np.zeros(18, np.uint8), Q.Q4_0, (2, 32))
