"""The cuda backend's model runner: the core's torch runner plus what a GPU needs around it.

- A profiling pass sizes the KV pool: the largest step the engine may schedule runs once over a
  throwaway pool, and the pool gets what --gpu-memory-utilization leaves after the weights, that
  peak and the memory outside torch's allocator (vLLM's accounting).
- Decode steps replay CUDA graphs captured at a ladder of batch sizes (off with --eager): a
  step of small kernels costs its launches, not its FLOPs, at small batches.
- Sampling runs on the device (ember.engine.torch_sampler, through the core runner).
"""
from __future__ import annotations

import logging
import time

import torch

from ember.backend import AttentionMetadata, KVCacheSpec
from ember.engine.model_runner import StepInputs
from ember.engine.scheduler import SchedulerOutput
from ember.engine.torch_runner import TorchModelRunner

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture, as vLLM's: 1, 2, 4, then every multiple of 8, up to max_num_seqs
    (capped at 512); a step of n sequences replays the smallest size >= n, its rows padded."""
    top = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if sizes[-1] < top:
        sizes.append(top)
    return sizes


def kv_budget(total: int, utilization: float, peak_torch: int, non_torch: int) -> int:
    """Bytes for the KV pool: the utilization share of the device, less the profiled peak of
    torch's allocator (weights and the largest step's activations) and what others hold."""
    return int(total * utilization) - peak_torch - non_torch


class CudaModelRunner(TorchModelRunner):
    def __init__(self, backend, cfg, weights, cache, max_positions=None):
        super().__init__(backend, cfg, weights, cache, max_positions)
        self.graphs = None
        if self.device.type == "cuda" and not backend.options.eager:
            if cfg.num_experts:
                log.info("CUDA graphs off: MoE routing decides its shapes on the host")
            else:
                self.graphs = DecodeGraphs(self, capture_sizes(backend.options.max_num_seqs))

    # --- profiling ----------------------------------------------------------------------------
    def profile(self) -> None:
        if self.device.type != "cuda":
            return  # the interpreter on host memory: the backend's host-memory budget stands
        opts, cfg, dev = self.backend.options, self.cfg, self.device
        tokens = max(1, min(opts.max_num_batched_tokens, cfg.context_length))
        blocks = -(-tokens // self.block_size) + 1  # block 0 left unused, as in the engine's pools
        spec = KVCacheSpec(cfg.num_layers, blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim,
                           self.backend.kv_cache_dtype())
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        pool = self.backend.allocate_kv_cache(spec)
        pool_bytes = spec.bytes_per_block() * blocks
        with torch.inference_mode():
            ids = torch.zeros(tokens, dtype=torch.long, device=dev)
            positions = torch.arange(tokens, device=dev)
            table = torch.arange(1, blocks, device=dev).unsqueeze(0)
            meta = AttentionMetadata(
                slot_mapping=positions + self.block_size, block_tables=table,
                seq_lens=torch.tensor([tokens], device=dev),
                query_start_loc=torch.tensor([0, tokens], device=dev),
                query_lens_list=[tokens], seq_lens_list=[tokens], block_size=self.block_size)
            hidden = self.model.forward(ids, positions, pool, meta)
            # the sampler's worst case: a full sort of every sampling row's logits
            rows = min(tokens, opts.max_num_seqs)
            logits = self.model.logits(hidden[:rows]).float()
            torch.sort(logits, dim=-1, descending=True)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - pool_bytes
        del pool, hidden, logits
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        non_torch = max(0, total - free - torch.cuda.memory_reserved(dev))
        budget = kv_budget(total, opts.memory_utilization, peak, non_torch)
        log.info("profiled a %d-token step: peak %.2f GiB in torch (weights and activations), %.2f GiB "
                 "outside it; %.2f GiB left for the KV cache at utilization %.2f", tokens, peak / 2**30,
                 non_torch / 2**30, budget / 2**30, opts.memory_utilization)
        if budget < spec.bytes_per_block():
            raise MemoryError(f"no memory left for the KV cache: {total / 2**30:.1f} GiB x {opts.memory_utilization} "
                              f"utilization, less {peak / 2**30:.1f} GiB for weights and activations and "
                              f"{non_torch / 2**30:.1f} GiB held outside torch (raise --gpu-memory-utilization "
                              f"or lower --max-num-batched-tokens)")
        self.backend.kv_budget = budget

    # --- steps --------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput):
        if self.graphs is not None and self.graphs.fits(sched):
            logits = self.graphs.run(StepInputs.of(sched, self.block_size))
            return self.sample(logits, [s.seq for s in sched.scheduled])
        return super().execute(sched)


class DecodeGraphs:
    """Decode steps as CUDA graphs: the model's forward and its logits, captured once per batch
    size over static input buffers; a step copies its inputs in and replays.

    Rows past a step's sequences are padding: slot -1 (the K/V write skips it) and a context of
    one token. The decode kernel's grid is sized for the longest context the engine serves, its
    split partials preallocated, so one graph serves every context length."""

    def __init__(self, runner: CudaModelRunner, sizes: list[int]):
        from ember_cuda.kernels.paged_attention import decode_config, decode_splits, decode_workspace

        self.runner = runner
        cfg, dev = runner.cfg, runner.device
        self.sizes = sizes
        top = sizes[-1]
        self.width = -(-cfg.context_length // runner.block_size)  # block-table width of the longest context
        self.ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.slots = torch.full((top,), -1, dtype=torch.long, device=dev)
        self.tables = torch.zeros(top, self.width, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(top, dtype=torch.long, device=dev)
        self.starts = torch.arange(top + 1, dtype=torch.long, device=dev)
        dtype = runner.kv_caches[0][0].dtype
        config = decode_config(_spec(dev), cfg.head_dim, cfg.num_heads // cfg.num_kv_heads, dtype)
        self.workspace = decode_workspace(top, cfg.num_heads, cfg.head_dim,
                                          decode_splits(cfg.context_length, config), dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        t0 = time.perf_counter()
        self._capture_all()
        log.info("captured %d decode graphs (batch 1..%d) in %.1f s", len(self.graphs), top, time.perf_counter() - t0)

    def _meta(self, n: int) -> AttentionMetadata:
        return AttentionMetadata(self.slots[:n], self.tables[:n], self.seq_lens[:n], self.starts[: n + 1],
                                 [1] * n, [1] * n, self.runner.block_size)

    def _forward(self, n: int) -> torch.Tensor:
        model = self.runner.model
        hidden = model.forward(self.ids[:n], self.positions[:n], self.runner.kv_caches, self._meta(n))
        return model.logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        attn = self.runner.model.attn
        attn.decode_workspace = self.workspace
        pool = None
        stream = torch.cuda.Stream(self.runner.device)
        try:
            # largest first, so the smaller graphs reuse the first one's memory pool
            for n in reversed(self.sizes):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm up: Triton compiles and autotunes outside capture
                        self._forward(n)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(n)
                pool = graph.pool()
                self.graphs[n] = (graph, out)
        finally:
            attn.decode_workspace = None
        torch.cuda.synchronize(self.runner.device)

    def fits(self, sched: SchedulerOutput) -> bool:
        n = len(sched.scheduled)
        return (0 < n <= self.sizes[-1]
                and all(s.end - s.start == 1 and s.samples
                        and not (s.seq.want_prompt_logits and s.start < s.seq.num_prompt_tokens)
                        and len(s.seq.block_table) <= self.width for s in sched.scheduled))

    def run(self, step: StepInputs) -> torch.Tensor:
        n = len(step.seq_lens)
        size = next(s for s in self.sizes if s >= n)
        width = step.block_tables.shape[1]
        self.ids[:n].copy_(torch.tensor(step.token_ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(step.positions), non_blocking=True)
        self.slots[:n].copy_(torch.tensor(step.slots), non_blocking=True)
        self.slots[n:size].fill_(-1)
        self.seq_lens[:n].copy_(torch.tensor(step.seq_lens), non_blocking=True)
        self.seq_lens[n:size].fill_(1)
        self.tables[:n, :width].copy_(torch.from_numpy(step.block_tables), non_blocking=True)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]


def _spec(device):
    from ember_cuda.kernels.launch import describe

    return describe(device)
