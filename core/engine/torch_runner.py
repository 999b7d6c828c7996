"""The core's torch model runner: the shared llama-family model, driven with a backend's kernels
and KV allocator. The one module of the engine that imports torch."""
from __future__ import annotations

import torch

from ember.backend import AttentionMetadata, Backend
from ember.config import CacheConfig, ModelConfig
from ember.engine.model_runner import HostSampling, ModelRunner, SampleResult, StepInputs, kv_spec_for
from ember.engine.scheduler import SchedulerOutput
from ember.engine.sequence import Sequence


class TorchModelRunner(ModelRunner):
    """Drives the core's torch model with a backend's kernels and KV allocator."""

    supports_structured_output = True

    def __init__(self, backend: Backend, cfg: ModelConfig, weights, cache: CacheConfig,
                 max_positions: int | None = None):
        from ember.models import MODEL_FAMILIES

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
        self.sampling = HostSampling()
        self.eos_token_ids = set()

    def release(self, seq: Sequence) -> None:
        self.sampling.release(seq)

    def prepare(self, sched: SchedulerOutput):
        step = StepInputs.of(sched, self.block_size)
        starts = step.query_start_loc
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slots, dtype=torch.long),
            block_tables=torch.from_numpy(step.block_tables),
            seq_lens=torch.tensor(step.seq_lens, dtype=torch.long),
            query_start_loc=torch.tensor(starts, dtype=torch.long),
            query_lens_list=[b - a for a, b in zip(starts, starts[1:])],
            seq_lens_list=step.seq_lens,
            block_size=self.block_size,
        )
        return (torch.tensor(step.token_ids, dtype=torch.long), torch.tensor(step.positions, dtype=torch.long),
                meta)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[int, SampleResult]:
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
        # The sampler is numpy on the host. A device backend should bring a device-side sampler of
        # its own rather than pay this copy (and the sync it implies) every step.
        logits = logits.float()
        if logits.device.type != "cpu":
            logits = logits.cpu()
        return self.sampling(logits.numpy(), [s.seq for _, s in sampling], self.eos_token_ids)
