"""Inputs for the quantized-matmul tests (x86 and ARM under qemu): GGUF weights of every type the
kernels take, and the activations exactly as the kernels quantize them."""
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants as gq

from ember.gguf.loader import QuantWeight

LEGACY = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def weight(qtype, rows, cols, seed) -> QuantWeight:
    """Legacy types through gguf's quantizer; K-quant blocks built byte by byte (gguf only
    dequantizes those): random integers and sub-block scales, small positive float16 scales."""
    rng = np.random.default_rng(seed)
    if qtype in LEGACY:
        data = gq.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    else:
        per, nbytes = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows, cols // per, nbytes), dtype=np.uint8)

        def halves(lo, hi):
            return rng.uniform(lo, hi, (rows, cols // per)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)

        # where each type keeps its float16 d (and dmin)
        d_at = {Q.Q6_K: 208, Q.Q3_K: 108, Q.Q2_K: 80}.get(qtype, 0)
        raw[:, :, d_at:d_at + 2] = halves(1e-3, 1e-2)
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q2_K):
            raw[:, :, d_at + 2:d_at + 4] = halves(0, 1e-2)
        data = raw.reshape(rows, -1)
    return QuantWeight(f"w{seed}", qtype, (rows, cols), np.ascontiguousarray(data.view(np.uint8)))


def activation_terms(qtype, one_term: bool = False) -> int:
    """The int8 activation terms the kernel multiplies a type's weights by (fmt_for in
    csrc/quant_matmul.c): two, or one where the layer asks (--int8-activations)."""
    return 1 if one_term else 2


def quantized_activations(x: torch.Tensor, terms: int = 2) -> torch.Tensor:
    """What the kernel multiplies: per row and per 32 values, x / (max|x| / 127) as one or two
    int8 terms, hi and lo / 256 (see csrc/quant_matmul.c), back to float."""
    b = x.reshape(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    v = b * inv
    hi = torch.round(v)
    lo = torch.round((v - hi) * 256).clamp(-127, 127) if terms == 2 else torch.zeros_like(hi)
    return ((256 * hi + lo).double() * (amax.double() / 127 / 256)).reshape(x.shape)


def expected_product(x: torch.Tensor, ws, one_term: bool = False) -> torch.Tensor:
    """x @ W.T in float64 for the parts ws, each on the activations the kernel gives its type."""
    return torch.cat([quantized_activations(x, activation_terms(w.qtype, one_term)) @ w.dequantize().double().T
                      for w in ws], dim=1)


def kernels(variant=None):
    """cpu_gguf's quant_matmul build for an ISA variant (None: the one chosen here), or skip with
    the reason this CPU cannot run it."""
    import pytest
    from ember_cpu_gguf import native

    if variant is not None:
        ok, why = native.runnable(variant)
        if not ok:
            pytest.skip(f"{variant}: {why}")
    k = native.quant_matmul(variant)
    if k is None:
        pytest.skip("no C compiler: the pure-torch fallback is what runs here")
    return k
