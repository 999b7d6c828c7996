"""JaxModelRunner: executes the engine's scheduler steps with one jitted JAX program per step.

Like the core's runners it flattens a step with StepInputs and samples on the host with
HostSampling (so it draws the same tokens from the same logits, seeds and grammar masks included).
What is its own: the step's shapes are padded to buckets (batching.py) so XLA compiles a handful
of programs, not one per step; the KV pool lives on the device and is donated to each step, which
updates it in place; and only the rows that sample (or whose prompt logits were asked for) leave
the device.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from ember.config import CacheConfig, ModelConfig
from ember.backend import HostSampling, ModelRunner, SampleResult, SchedulerOutput, Sequence, StepInputs, kv_spec_for
from ember_tpu import attention, model
from ember_tpu.attention import PagedInputs
from ember_tpu.batching import bucket, pad_batch

log = logging.getLogger(__name__)


class JaxModelRunner(ModelRunner):
    supports_structured_output = True  # HostSampling applies the grammar masks

    def __init__(self, backend, cfg: ModelConfig, weights, cache: CacheConfig):
        why = model.unsupported(cfg)
        if why:
            raise ValueError(why)
        self.backend, self.cfg, self.block_size = backend, cfg, cache.block_size
        self.device = backend.jax_device()
        self.dtype = jnp.dtype(backend.compute_dtype())
        self.params = model.load_params(cfg, weights, self.dtype, self.device, cfg.context_length)
        # sized after the weights are on the device, so the memory they take is not offered twice
        self.kv_spec = kv_spec_for(cfg, cache, backend)
        self.num_kv_blocks = self.kv_spec.num_blocks
        self.k_pool, self.v_pool = backend.allocate_kv_pool(self.kv_spec)
        self.use_pallas = backend.platform == "tpu" and attention.pallas_supported(cfg.head_dim, cache.block_size)
        self.buckets = backend.buckets
        self.sampling = HostSampling()
        self.eos_token_ids = set()
        # how many programs the step has been traced into (each is one XLA compilation)
        self.traces = 0
        self._step = jax.jit(self._traced_step, static_argnames=("plan",), donate_argnums=(1, 2))

    def _traced_step(self, params, k_pool, v_pool, token_ids, inputs, sample_rows, *, plan):
        self.traces += 1  # runs once per trace, never per call
        return model.step(params, k_pool, v_pool, token_ids, inputs, sample_rows, cfg=self.cfg,
                          num_blocks=self.num_kv_blocks, plan=plan, dtype=self.dtype)

    def release(self, seq: Sequence) -> None:
        self.sampling.release(seq)

    def execute(self, sched: SchedulerOutput) -> dict[int, SampleResult]:
        step = StepInputs.of(sched, self.block_size)
        starts = step.query_start_loc
        batch = pad_batch(starts, step.seq_lens, step.slots, step.block_tables, step.token_ids, self.buckets)
        T, S, W = batch.shape
        sampling = [(s.seq, starts[i + 1] - 1) for i, s in enumerate(sched.scheduled) if s.samples]
        # one logits row per sequence slot: a step never samples more rows than it has sequences
        rows = np.zeros(S, np.int32)
        rows[: len(sampling)] = [r for _, r in sampling]
        inputs = PagedInputs(batch.slots, batch.positions, batch.token_seq, batch.tables, batch.seq_lens)
        plan = attention.plan_for(batch.decode, T, W, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim,
                                  self.use_pallas)
        logits, hidden = self._run(batch.token_ids, inputs, rows, plan)

        for i, s in enumerate(sched.scheduled):
            seq = s.seq
            if seq.want_prompt_logits and s.start < seq.num_prompt_tokens:
                n = min(s.end, seq.num_prompt_tokens) - s.start
                chunk = self._logits_of(hidden, np.arange(starts[i], starts[i] + n))
                # numpy, as the engine's other torch-free runner (cpu_gguf's) gives them
                seq.prompt_logits = chunk if seq.prompt_logits is None else np.concatenate([seq.prompt_logits, chunk])
        if not sampling:
            return {}
        host = np.asarray(jax.device_get(logits))[: len(sampling)]
        return self.sampling(host, [seq for seq, _ in sampling], self.eos_token_ids)

    def _run(self, token_ids, inputs, rows, plan):
        try:
            # exact mode: float32 matmuls in full precision (a TPU's default is one bfloat16 pass)
            with jax.default_matmul_precision("highest" if self.backend.options.exact else None):
                logits, hidden, self.k_pool, self.v_pool = self._step(self.params, self.k_pool, self.v_pool,
                                                                      token_ids, inputs, rows, plan=plan)
        except Exception as e:
            if not plan.pallas or self.k_pool.is_deleted():
                raise
            # A kernel Mosaic cannot compile for these shapes fails before anything ran (the pool is
            # intact): say so once, and use the jax.numpy path from now on.
            log.warning("the Pallas paged-attention kernel failed to compile (%s); using the jax.numpy "
                        "attention for decode steps", e)
            self.use_pallas = False
            T, W = len(token_ids), inputs.tables.shape[1]
            plan = attention.plan_for(True, T, W, self.block_size, self.cfg.num_kv_heads, self.cfg.head_dim, False)
            return self._run(token_ids, inputs, rows, plan)
        return logits, hidden

    def _logits_of(self, hidden: jax.Array, rows: np.ndarray) -> np.ndarray:
        padded = np.zeros(bucket(len(rows), self.buckets.tokens), np.int32)
        padded[: len(rows)] = rows
        out = model.logits_at(self.params["lm_head"], hidden, padded)
        return np.asarray(jax.device_get(out))[: len(rows)]
