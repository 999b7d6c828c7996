"""The operations between a decoder layer's matmuls, in plain torch.

This is what ``Backend.layer_ops()`` returns unless a backend fuses them: the reference numerics
(exact mode uses these), and what any device with torch can run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class LayerOps:
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``weight * y / rms(y)`` for ``y = x + residual`` (or ``y = x`` without one).

        Returns ``(normed, y)``: y is the residual stream the next layer adds to. A backend may
        compute y in place in ``residual``'s storage, so callers pass a residual they own.
        """
        y = x if residual is None else x + residual
        y32 = y.float()
        return weight * (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + eps)), y

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding (rotate-half layout) of q [tokens, heads, head_dim] and k over the
        first ``cos.shape[-1]`` dims; cos, sin: [max_positions, rotary_dim]. May work in place."""
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        return _rotate(q, c, s), _rotate(k, c, s)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for a fused [.., 2 * intermediate] gate/up projection."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
