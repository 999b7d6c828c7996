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
    elif scaling.type == "yarn":
        # YaRN (arXiv:2309.00071): pairs that turn fewer than beta_slow times over the original
        # context are interpolated (divided by factor), those that turn more than beta_fast times
        # kept, with a linear ramp between; the bounds are rounded out to whole pairs.
        def pair_of(rotations: float) -> float:
            return dim * math.log(scaling.original_context_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(pair_of(scaling.beta_fast)), 0)
        high = min(math.ceil(pair_of(scaling.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        inv_freq = inv_freq / scaling.factor * ramp + inv_freq * (1.0 - ramp)
    elif scaling.type not in ("none", ""):
        raise ValueError(f"RoPE scaling {scaling.type!r} is not supported (supported: linear, llama3, yarn)")
    return inv_freq


def rope_attention_factor(scaling: RopeScaling) -> float:
    """What cos and sin are multiplied by: 1 but for YaRN, whose softmax temperature it is."""
    if scaling.type != "yarn":
        return 1.0
    if scaling.attention_factor:
        return scaling.attention_factor
    return 1.0 if scaling.factor <= 1 else 0.1 * math.log(scaling.factor) + 1.0


def rope_tables(cfg: ModelConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin for every position up to max_positions: float32 [max_positions, rotary_dim], in
    HF's rotate-half layout. Computed in float64 and rounded once, so long contexts keep their
    angles exact to float32 precision."""
    inv_freq = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    freqs = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    mscale = rope_attention_factor(cfg.rope_scaling)
    return (np.cos(emb) * mscale).astype(np.float32), (np.sin(emb) * mscale).astype(np.float32)
