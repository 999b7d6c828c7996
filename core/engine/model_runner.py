"""Runs one scheduler step on a backend: batch metadata in, sampled tokens out."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ember.backend import AttentionMetadata, Backend, KVCacheSpec
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


def structured_masks(seqs: list[Sequence], width: int) -> torch.Tensor:
    """[len(seqs), width] bool: each sequence's grammar-allowed next tokens (CPU). For any runner
    that wants to honour Sequence.matcher."""
    import numpy as np

    # numpy, not torch.zeros: a single-threaded fill does not wait on torch's intra-op threads
    masks = np.zeros((len(seqs), width), dtype=np.bool_)
    for k, seq in enumerate(seqs):
        seq.matcher.fill_mask(masks[k])
    return torch.from_numpy(masks)


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


class TorchModelRunner(ModelRunner):
    """Drives the core's torch model with a backend's kernels and KV allocator."""

    supports_structured_output = True

    def __init__(self, backend: Backend, cfg: ModelConfig, weights, cache: CacheConfig,
                 max_positions: int | None = None):
        from ember.models import MODEL_FAMILIES
        from ember.sampler import Sampler

        family = MODEL_FAMILIES.get(cfg.architecture)
        if family is None:
            raise ValueError(f"no model implementation for architecture {cfg.architecture!r} "
                             f"(have: {', '.join(sorted(MODEL_FAMILIES))})")
        self.backend = backend
        self.cfg = cfg
        self.model = family(cfg, weights, backend, max_positions)
        self.kv_spec = kv_spec_for(cfg, cache, backend)
        self.num_kv_blocks = self.kv_spec.num_blocks
        self.block_size = cache.block_size
        self.kv_caches = backend.allocate_kv_cache(self.kv_spec)
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}
        self.eos_token_ids = set()

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.params.seed
        if seed is None:
            return None
        g = self.generators.get(seq.seq_id)
        if g is None:
            # n samples of one seeded request differ from each other but are each reproducible
            g = self.generators[seq.seq_id] = torch.Generator().manual_seed(seed + seq.index)
        return g

    def prepare(self, sched: SchedulerOutput):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        for s in sched.scheduled:
            seq, a, b = s.seq, s.start, s.end
            input_ids += seq.token_slice(a, b)
            positions += range(a, b)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(a, b)]
            query_lens.append(b - a)
            seq_lens.append(b)
            starts.append(starts[-1] + b - a)
        width = max(len(s.seq.block_table) for s in sched.scheduled)
        tables = torch.zeros(len(sched.scheduled), width, dtype=torch.long)
        for i, s in enumerate(sched.scheduled):
            tables[i, : len(s.seq.block_table)] = torch.tensor(s.seq.block_table, dtype=torch.long)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            block_tables=tables,
            seq_lens=torch.tensor(seq_lens, dtype=torch.long),
            query_start_loc=torch.tensor(starts, dtype=torch.long),
            query_lens_list=query_lens,
            seq_lens_list=seq_lens,
            block_size=bs,
        )
        return torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), meta

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[int, SampleResult]:
        from ember.sampler import SamplingRow

        input_ids, positions, meta = self.prepare(sched)
        hidden = self.model.forward(input_ids, positions, self.kv_caches, meta)
        starts = meta.query_start_loc.tolist()
        sampling = [(i, s) for i, s in enumerate(sched.scheduled) if s.samples]
        for i, s in enumerate(sched.scheduled):
            if s.seq.want_prompt_logits and s.start < s.seq.num_prompt_tokens:
                # logits for every prompt position, gathered across chunks
                rows = hidden[starts[i]: starts[i] + min(s.end, s.seq.num_prompt_tokens) - s.start]
                chunk = self.model.logits(rows)
                s.seq.prompt_logits = chunk if s.seq.prompt_logits is None else torch.cat([s.seq.prompt_logits, chunk])
        if not sampling:
            return {}
        last_rows = torch.tensor([starts[i + 1] - 1 for i, _ in sampling], dtype=torch.long)
        logits = self.model.logits(hidden[last_rows])
        rows = [SamplingRow(params=s.seq.params, prompt_token_ids=s.seq.prompt_token_ids,
                            output_token_ids=s.seq.output_token_ids, generator=self._generator(s.seq),
                            eos_token_ids=self.eos_token_ids)
                for _, s in sampling]
        # After the logits are queued, so on an asynchronous device the grammar work overlaps the
        # forward pass; a batch with no structured row never gets here past the list test.
        structured = [j for j, (_, s) in enumerate(sampling) if s.seq.matcher is not None]
        if structured:
            masks = structured_masks([sampling[j][1].seq for j in structured], logits.shape[-1])
            for k, j in enumerate(structured):
                rows[j].allowed = masks[k]
        out = self.sampler(logits.float(), rows)
        results = {}
        for j, (_, s) in enumerate(sampling):
            results[s.seq.seq_id] = SampleResult(
                out.token_ids[j],
                out.logprobs[j] if out.logprobs else None,
                out.top_logprobs[j] if out.top_logprobs else None,
            )
        return results
