"""The core's torch model runner: the shared llama-family model, driven with a backend's kernels
and KV allocator. The one module of the engine that imports torch."""
from __future__ import annotations

import numpy as np
import torch

from ember.backend import AttentionMetadata, Backend
from ember.config import CacheConfig, ModelConfig
from ember.engine.model_runner import (ModelRunner, SampleResult, kv_spec_for, seeded_generator,
                                       structured_masks)
from ember.engine.scheduler import SchedulerOutput
from ember.engine.sequence import Sequence


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
        self.generators: dict[int, np.random.Generator] = {}
        self.eos_token_ids = set()

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> np.random.Generator | None:
        if seq.params.seed is None:
            return None
        g = self.generators.get(seq.seq_id)
        if g is None:
            g = self.generators[seq.seq_id] = seeded_generator(seq)
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
        # The sampler is numpy on the host. A device backend should bring a device-side sampler of
        # its own rather than pay this copy (and the sync it implies) every step.
        logits = logits.float()
        if logits.device.type != "cpu":
            logits = logits.cpu()
        out = self.sampler(logits.numpy(), rows)
        results = {}
        for j, (_, s) in enumerate(sampling):
            results[s.seq.seq_id] = SampleResult(
                out.token_ids[j],
                out.logprobs[j] if out.logprobs else None,
                out.top_logprobs[j] if out.top_logprobs else None,
            )
        return results
