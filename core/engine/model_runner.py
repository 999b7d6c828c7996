"""What the engine needs from a model runner, and the torch-free pieces every runner shares.

The core's own runner (TorchModelRunner) lives in ember.engine.torch_runner, so that a backend with
a runner of its own never imports torch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ember.backend import Backend, KVCacheSpec
from ember.config import CacheConfig, ModelConfig
from ember.engine.scheduler import SchedulerOutput
from ember.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class ModelRunner(ABC):
    """What the engine needs from whatever executes the model."""

    num_kv_blocks: int
    kv_spec: KVCacheSpec

    @abstractmethod
    def execute(self, sched: SchedulerOutput) -> dict[int, SampleResult]:
        """Compute every scheduled chunk into the KV cache; sample one token for each sequence
        whose chunk reaches its end. Returns seq_id -> result."""

    def release(self, seq: Sequence) -> None:
        """Forget per-sequence state (its RNG) once it is finished or aborted."""

    eos_token_ids: set[int] = set()
    # Whether execute() applies Sequence.matcher's token masks; the engine refuses structured
    # requests on a runner that would silently ignore them.
    supports_structured_output: bool = False


DEFAULT_KV_BYTES = 512 * 1024**2


def structured_masks(seqs: list[Sequence], width: int) -> np.ndarray:
    """[len(seqs), width] bool: each sequence's grammar-allowed next tokens. For any runner that
    wants to honour Sequence.matcher."""
    masks = np.zeros((len(seqs), width), dtype=np.bool_)
    for k, seq in enumerate(seqs):
        seq.matcher.fill_mask(masks[k])
    return masks


def seeded_generator(seq: Sequence) -> np.random.Generator | None:
    """The RNG of a seeded request's sample, for SamplingRow.generator: created once and kept by the
    runner for the sequence's life. n samples of one request differ from each other but are each
    reproducible, and every runner that uses this draws the same tokens from the same logits."""
    if seq.params.seed is None:
        return None
    # Seeds are signed 64-bit (OpenAI's API allows negative ones); numpy takes non-negative integers.
    return np.random.default_rng((seq.params.seed + seq.index) % 2**64)


def kv_spec_for(cfg: ModelConfig, cache: CacheConfig, backend: Backend) -> KVCacheSpec:
    probe = KVCacheSpec(cfg.num_layers, 1, cache.block_size, cfg.num_kv_heads, cfg.head_dim,
                        backend.kv_cache_dtype())
    budget = cache.kv_cache_memory or backend.available_kv_memory() or DEFAULT_KV_BYTES
    num_blocks = cache.num_blocks if cache.num_blocks is not None else budget // probe.bytes_per_block()
    if num_blocks < 1:
        raise ValueError(f"the KV-cache budget ({budget} bytes) is smaller than one block "
                         f"({probe.bytes_per_block()} bytes)")
    return KVCacheSpec(cfg.num_layers, num_blocks, cache.block_size, cfg.num_kv_heads, cfg.head_dim,
                       probe.dtype)
