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
from ember.backend import SchedulerOutput, StepInputs, TorchModelRunner

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture, as vLLM's: 1, 2, 4, then every multiple of 8, up to max_num_seqs
    (capped at 512); a step of n sequences replays the smallest size >= n, its rows padded."""
    top = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if sizes[-1] < top:
        sizes.append(top)
    return sizes


def profile_step(max_tokens: int, max_seqs: int, max_len: int, block_size: int, device):
    """The largest step the engine may schedule, as the profiling pass runs it: max_tokens new
    tokens (the per-step budget) as fresh prompts of at most max_len tokens each, at most
    max_seqs of them, over a throwaway pool of exactly the blocks they need (block 0 left unused,
    as in the engine's pools). Returns (token ids, positions, AttentionMetadata, blocks)."""
    tokens = max(1, min(max_tokens, max_seqs * max_len))
    lens = [max_len] * (tokens // max_len) + ([tokens % max_len] if tokens % max_len else [])
    tables, slots, next_block = [], [], 1
    for n in lens:
        row = list(range(next_block, next_block + -(-n // block_size)))
        next_block += len(row)
        tables.append(row)
        slots += [row[p // block_size] * block_size + p % block_size for p in range(n)]
    width = max(len(r) for r in tables)
    table = torch.tensor([r + [0] * (width - len(r)) for r in tables], dtype=torch.long, device=device)
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device), block_tables=table,
        seq_lens=torch.tensor(lens, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.long, device=device),
        query_lens_list=lens, seq_lens_list=list(lens), block_size=block_size)
    positions = torch.cat([torch.arange(n, dtype=torch.long, device=device) for n in lens])
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    return ids, positions, meta, next_block


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
        ids, positions, meta, blocks = profile_step(opts.max_num_batched_tokens, opts.max_num_seqs,
                                                    cfg.context_length, self.block_size, dev)
        spec = KVCacheSpec(cfg.num_layers, blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim,
                           self.backend.kv_cache_dtype())
        tokens = len(positions)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        pool = self.backend.allocate_kv_cache(spec)
        pool_bytes = spec.bytes_per_block() * blocks
        with torch.inference_mode():
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
        log.info("profiled a %d-token step of %d sequences: peak %.2f GiB in torch (weights and activations), "
                 "%.2f GiB outside it; %.2f GiB left for the KV cache at utilization %.2f", tokens, meta.num_seqs,
                 peak / 2**30, non_torch / 2**30, budget / 2**30, opts.memory_utilization)
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
        # the attention's own settings (a backend's tiles over the device's defaults): the split
        # length the captured launches use is the one the workspace is sized by
        config = {**decode_config(_spec(dev), cfg.head_dim, cfg.num_heads // cfg.num_kv_heads, dtype),
                  **runner.model.attn.tiles.get("decode", {})}
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
