"""cpu_gguf's fused layer operations (csrc/layer_ops.c), with the core's torch versions for any
input the C code does not take (other dtypes, non-row-major views, per-head norms)."""
from __future__ import annotations

import torch

from ember.ops.layer_ops import LayerOps


def _rows(t: torch.Tensor) -> bool:
    """A float32 [rows, width] view with unit stride along the width."""
    return t.dtype == torch.float32 and t.dim() == 2 and t.stride(1) == 1


def heads_view(t: torch.Tensor) -> bool:
    """A float32 [tokens, heads, head_dim] view whose heads sit back to back within a token (the
    tokens may be strided: q, k and v as views of one fused projection)."""
    return t.dtype == torch.float32 and t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


class NativeLayerOps(LayerOps):
    def __init__(self, lib, threads: int):
        self.lib = lib
        self.threads = threads

    def rms_norm(self, x, weight, eps, residual=None):
        if not (_rows(x) and weight.dtype == torch.float32 and weight.is_contiguous()
                and (residual is None or (_rows(residual) and residual.shape == x.shape))):
            return super().rms_norm(x, weight, eps, residual)
        m, d = x.shape
        out = torch.empty(m, d)
        self.lib.rms_norm(x.data_ptr(), x.stride(0), residual.data_ptr() if residual is not None else None,
                          residual.stride(0) if residual is not None else 0, weight.data_ptr(), out.data_ptr(), d,
                          m, d, eps, self.threads)
        return out, (x if residual is None else residual)

    def rope(self, q, k, positions, cos, sin):
        if not (heads_view(q) and heads_view(k) and q.shape[2] == k.shape[2] and positions.dtype == torch.int64
                and positions.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
                and cos.dtype == sin.dtype == torch.float32 and positions.numel() == q.shape[0]):
            return super().rope(q, k, positions, cos, sin)
        self.lib.rope(q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1], q.shape[0],
                      positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.stride(0), q.shape[2], cos.shape[1])
        return q, k

    def swiglu(self, gate_up):
        if not _rows(gate_up) or gate_up.shape[1] % 2:
            return super().swiglu(gate_up)
        m, width = gate_up.shape
        out = torch.empty(m, width // 2)
        self.lib.swiglu(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), width // 2, m, width // 2,
                        self.threads)
        return out
