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
        from ember.models.registry import model_class

        family = model_class(cfg.architecture)
        self.backend = backend
        self.cfg = cfg
        self.device = torch.device(backend.device)
        self.model = family(cfg, weights, backend, max_positions)
        self.block_size = cache.block_size
        # after the weights, before the pool: a device runner measures its activation peak here
        self.profile()
        self.kv_spec = kv_spec_for(cfg, cache, backend)
        self.num_kv_blocks = self.kv_spec.num_blocks
        self.kv_caches = backend.allocate_kv_cache(self.kv_spec)
        if self.device.type == "cpu":
            self.sampling = HostSampling()
        else:  # on an accelerator the logits stay there: one small copy back per step
            from ember.engine.torch_sampler import DeviceSampling

            self.sampling = DeviceSampling()
        self.eos_token_ids = set()

    def profile(self) -> None:
        """Runs once the model is built and before the KV pool is sized. The default does nothing;
        a device runner runs its largest step here to learn what memory is left for the pool."""

    def release(self, seq: Sequence) -> None:
        self.sampling.release(seq)

    def prepare(self, sched: SchedulerOutput):
        step = StepInputs.of(sched, self.block_size)
        starts = step.query_start_loc
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slots, dtype=torch.long, device=dev),
            block_tables=torch.from_numpy(step.block_tables).to(dev),
            seq_lens=torch.tensor(step.seq_lens, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.long, device=dev),
            query_lens_list=[b - a for a, b in zip(starts, starts[1:])],
            seq_lens_list=step.seq_lens,
            block_size=self.block_size,
        )
        return (torch.tensor(step.token_ids, dtype=torch.long, device=dev),
                torch.tensor(step.positions, dtype=torch.long, device=dev), meta)

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
        last_rows = torch.tensor([starts[i + 1] - 1 for i, _ in sampling], dtype=torch.long, device=self.device)
        return self.sample(self.model.logits(hidden[last_rows]), [s.seq for _, s in sampling])

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, SampleResult]:
        """One token for each of seqs from its row of logits: with the core's numpy sampler on the
        host, or its torch twin on the device, so the logits never cross to the host."""
        if self.device.type != "cpu":
            return self.sampling(logits, seqs, self.eos_token_ids)
        return self.sampling(logits.float().numpy(), seqs, self.eos_token_ids)
