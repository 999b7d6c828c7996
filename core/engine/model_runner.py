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
    reproducible, and every runner that samples on the host draws the same tokens from the same
    logits. (On a device, ember.engine.torch_sampler draws from torch's generators: the same
    distribution, another stream.)"""
    if seq.params.seed is None:
        return None
    # Seeds are signed 64-bit (OpenAI's API allows negative ones); numpy takes non-negative integers.
    return np.random.default_rng((seq.params.seed + seq.index) % 2**64)


def kv_spec_for(cfg: ModelConfig, cache: CacheConfig, backend: Backend) -> KVCacheSpec:
    probe = KVCacheSpec(cfg.num_layers, 1, cache.block_size, cfg.num_kv_heads, cfg.head_dim,
                        backend.kv_cache_dtype())
    budget = cache.kv_cache_memory or backend.default_kv_memory() or DEFAULT_KV_BYTES
    num_blocks = cache.num_blocks if cache.num_blocks is not None else budget // probe.bytes_per_block()
    if num_blocks < 1:
        raise ValueError(f"the KV-cache budget ({budget} bytes) is smaller than one block "
                         f"({probe.bytes_per_block()} bytes)")
    return KVCacheSpec(cfg.num_layers, num_blocks, cache.block_size, cfg.num_kv_heads, cfg.head_dim,
                       probe.dtype)


@dataclass
class StepInputs:
    """A step's tokens flattened the way every runner feeds them: each scheduled chunk's tokens
    back to back, with their positions and KV-cache slots."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_start_loc: list[int]  # chunk i is rows query_start_loc[i]:query_start_loc[i + 1]
    seq_lens: list[int]  # context of each sequence after the step
    block_tables: np.ndarray  # [num_seqs, widest table] int64, padded with 0

    @classmethod
    def of(cls, sched: SchedulerOutput, block_size: int) -> "StepInputs":
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, seq_lens = [0], []
        for s in sched.scheduled:
            seq, a, b = s.seq, s.start, s.end
            ids += seq.token_slice(a, b)
            positions += range(a, b)
            table = seq.block_table
            slots += [table[p // block_size] * block_size + p % block_size for p in range(a, b)]
            seq_lens.append(b)
            starts.append(starts[-1] + b - a)
        tables = np.zeros((len(sched.scheduled), max(len(s.seq.block_table) for s in sched.scheduled)), np.int64)
        for i, s in enumerate(sched.scheduled):
            tables[i, : len(s.seq.block_table)] = s.seq.block_table
        return cls(ids, positions, slots, starts, seq_lens, tables)


class HostSampling:
    """The sampling half of a step, for runners whose logits reach the host: each sequence's
    SamplingRow (with its seeded RNG, kept for the sequence's life, and its grammar mask), then
    the core sampler. Shared, so that every such runner draws the same tokens from the same logits."""

    def __init__(self) -> None:
        from ember.sampler import Sampler

        self.sampler = Sampler()
        self.generators: dict[int, np.random.Generator] = {}

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> np.random.Generator | None:
        if seq.params.seed is None:
            return None
        g = self.generators.get(seq.seq_id)
        if g is None:
            g = self.generators[seq.seq_id] = seeded_generator(seq)
        return g

    def __call__(self, logits: np.ndarray, seqs: list[Sequence], eos_token_ids: set[int]) -> dict[int, SampleResult]:
        """One token for each of seqs, whose logits are the rows of a [len(seqs), vocab] array."""
        rows = sampling_rows(seqs, eos_token_ids, logits.shape[-1], self._generator)
        return sample_results(seqs, self.sampler(logits, rows))


def sampling_rows(seqs: list[Sequence], eos_token_ids: set[int], width: int, generator_of) -> list:
    """Each sequence's SamplingRow, with the generator generator_of(seq) gives it and, for a
    sequence with a grammar, its allowed-token mask: what both the host and the device sampler take."""
    from ember.sampler import SamplingRow

    rows = [SamplingRow(params=seq.params, prompt_token_ids=seq.prompt_token_ids,
                        output_token_ids=seq.output_token_ids, generator=generator_of(seq),
                        eos_token_ids=eos_token_ids) for seq in seqs]
    structured = [j for j, seq in enumerate(seqs) if seq.matcher is not None]
    if structured:
        masks = structured_masks([seqs[j] for j in structured], width)
        for k, j in enumerate(structured):
            rows[j].allowed = masks[k]
    return rows


def sample_results(seqs: list[Sequence], out) -> dict[int, SampleResult]:
    """A sampler's output (ember.sampler.SamplerOutput), by sequence id."""
    return {seq.seq_id: SampleResult(out.token_ids[j], out.logprobs[j] if out.logprobs else None,
                                     out.top_logprobs[j] if out.top_logprobs else None)
            for j, seq in enumerate(seqs)}
