"""Rotary-embedding tables, in numpy so that runners without torch share them bit for bit."""
from __future__ import annotations

import math

import numpy as np

from ember.config import ModelConfig, RopeScaling


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """float64 inverse frequencies of the rotary pairs, with the model's context scaling."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if scaling.type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        old = scaling.original_context_length
        low_wl, high_wl = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        scaled = np.where(wavelen > low_wl, inv_freq / scaling.factor, inv_freq)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq, scaled)
    elif scaling.type not in ("none", ""):
        raise ValueError(f"RoPE scaling {scaling.type!r} is not supported yet (supported: linear, llama3)")
    return inv_freq


def rope_tables(cfg: ModelConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin for every position up to max_positions: float32 [max_positions, rotary_dim], in
    HF's rotate-half layout. Computed in float64 and rounded once, so long contexts keep their
    angles exact to float32 precision."""
    inv_freq = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    freqs = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
