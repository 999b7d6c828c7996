"""cpu_gguf's own model runner: each scheduler step is one C call (csrc/llama_forward.c), and
nothing here imports torch.

It runs the same kernels the torch model uses through the backend contract (the repacked
quantized linears, the fused layer ops, the paged attention), in the same order, over a KV pool
of the same layout, so its numbers match that path; what it removes is the Python between the
kernels (a fifth of a token's time for one stream) and the 1.3 s that `import torch` adds before a
CLI's first token. Models or options it does not cover (mixture-of-experts layers, weight types
the kernel lacks, exact mode) go to the core's torch runner instead: see `unsupported`.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ember.config import CacheConfig, ModelConfig
from ember.backend import HostSampling, ModelRunner, SampleResult, SchedulerOutput, Sequence, StepInputs, kv_spec_for
from ember.models.registry import ARCHITECTURES  # every dense one: the MoE ones are refused below
from ember.ops.rope import rope_tables
from ember_cpu_gguf import native
from ember_cpu_gguf.packed import PackedLinear, dequantize_np

_p, _i64 = ctypes.c_void_p, ctypes.c_int64


class _Llama(ctypes.Structure):
    """csrc/llama_forward.c's Llama, field for field."""

    _fields_ = [(n, _p) for n in ("linear", "rms_norm", "rope", "swiglu", "decode", "write_kv", "prefill")] + [
        (n, _i64) for n in ("n_layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "rot", "threads",
                            "num_blocks", "block_size")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cos", _p), ("sin", _p), ("ld_rope", _i64),
        ("final_norm", _p)] + [
        (n, _p) for n in ("qkv", "o", "gate_up", "down", "in_norm", "post_norm", "q_norm", "k_norm",
                          "k_cache", "v_cache", "lm_head")]


def _layer_names(i: int) -> dict[str, list[str]]:
    p = f"model.layers.{i}."
    return {"qkv": [p + f"self_attn.{x}_proj" for x in "qkv"], "o": [p + "self_attn.o_proj"],
            "gate_up": [p + "mlp.gate_proj", p + "mlp.up_proj"], "down": [p + "mlp.down_proj"]}


def _kernels(kv_dtype: str):
    """The C entry points a step needs, or None when any of them could not be built."""
    ops, qmm, step = native.layer_ops(), native.quant_matmul(), native.llama_forward()
    decode, write, prefill = native.paged_decode(kv_dtype), native.write_kv(kv_dtype), native.paged_prefill(kv_dtype)
    if None in (ops, qmm, step, decode, write, prefill):
        return None
    return ops, qmm, step, decode, write, prefill


def unsupported(backend, cfg: ModelConfig, weights) -> str | None:
    """Why this runner cannot run the model here (the torch runner then does), or None."""
    if backend.options.exact:
        return "exact mode keeps the torch reference"
    if cfg.architecture not in ARCHITECTURES or cfg.num_experts:
        return f"no native step for architecture {cfg.architecture!r}"
    kernels = _kernels(backend.kv_cache_dtype())
    if kernels is None:
        return "the C kernels are not available"
    qmm = kernels[1]
    head = weights.get("lm_head.weight") or weights.get("model.embed_tokens.weight")
    groups = [[head]] if head is not None else [[]]
    for i in range(cfg.num_layers):
        for names in _layer_names(i).values():
            groups.append([weights.get(n + ".weight") for n in names])
    for g in groups:
        if None in g or not PackedLinear.accepts(g, qmm):
            return "a linear layer's weight type has no quantized kernel"
    return None


class NativeModelRunner(ModelRunner):
    supports_structured_output = True

    def __init__(self, backend, cfg: ModelConfig, weights, cache: CacheConfig):
        self.cfg, self.block_size = cfg, cache.block_size
        self.kv_spec = kv_spec_for(cfg, cache, backend)
        self.num_kv_blocks = self.kv_spec.num_blocks
        self.kv = backend.allocate_kv_arrays(self.kv_spec)
        ops, qmm, self._lib, decode, write, prefill = _kernels(self.kv_spec.dtype)
        self._ops, threads = ops, backend.threads
        self.sampling = HostSampling()
        self.eos_token_ids = set()

        def linear(names, bias=False):
            ws = [weights[n + ".weight"] for n in names]
            bs = [weights.get(n + ".bias") for n in names] if bias else None
            return PackedLinear(ws, bs, threads, qmm, one_term=backend.options.int8_activations)

        def norm(name):
            return np.ascontiguousarray(dequantize_np(weights[name]).reshape(-1))

        # everything the C side points at stays alive here
        self._keep = []
        layers = [_layer_names(i) for i in range(cfg.num_layers)]
        per_layer = {k: [linear(layer[k], bias=k == "qkv" and cfg.attention_bias) for layer in layers]
                     for k in ("qkv", "o", "gate_up", "down")}
        norms = {"in_norm": [norm(f"model.layers.{i}.input_layernorm.weight") for i in range(cfg.num_layers)],
                 "post_norm": [norm(f"model.layers.{i}.post_attention_layernorm.weight") for i in range(cfg.num_layers)]}
        if cfg.qk_norm:
            for k in ("q_norm", "k_norm"):
                norms[k] = [norm(f"model.layers.{i}.self_attn.{k}.weight") for i in range(cfg.num_layers)]
        self.embed = weights["model.embed_tokens.weight"]
        self.lm_head = linear(["lm_head" if "lm_head.weight" in weights else "model.embed_tokens"])
        self.vocab = self.lm_head.out_features
        self.final_norm = norm("model.norm.weight")
        self.cos, self.sin = rope_tables(cfg, cfg.context_length)

        def array(items, ptr):
            arr = (_p * len(items))(*(ptr(x) for x in items))
            self._keep.append(arr)
            return ctypes.cast(arr, _p)

        m = self._model = _Llama()
        for name, fn in (("linear", qmm.run), ("rms_norm", ops.rms_norm), ("rope", ops.rope),
                         ("swiglu", ops.swiglu), ("decode", decode), ("write_kv", write), ("prefill", prefill)):
            setattr(m, name, native.address(fn))
        m.n_layers, m.hidden, m.heads, m.kv_heads = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        m.head_dim, m.inter, m.rot, m.threads = cfg.head_dim, cfg.intermediate_size, cfg.rotary_dim, threads
        m.num_blocks, m.block_size = self.kv_spec.num_blocks, cache.block_size
        m.eps, m.scale = cfg.rms_norm_eps, cfg.head_dim ** -0.5
        m.cos, m.sin, m.ld_rope = self.cos.ctypes.data, self.sin.ctypes.data, self.cos.shape[1]
        m.final_norm = self.final_norm.ctypes.data
        for k, lins in per_layer.items():
            setattr(m, k, array(lins, lambda lin: lin.handle))
        for k, arrs in norms.items():
            setattr(m, k, array(arrs, lambda a: a.ctypes.data))
        m.k_cache = array([k for k, _ in self.kv], lambda a: a.ctypes.data)
        m.v_cache = array([v for _, v in self.kv], lambda a: a.ctypes.data)
        m.lm_head = self.lm_head.handle
        self._keep += [per_layer, norms]
        self._step = self._lib.ember_llama_step
        self._step.argtypes = [ctypes.POINTER(_Llama), _i64, _p, _p, _p, ctypes.c_int, _p, _p, _p, _i64,
                               ctypes.c_int, _i64, _p, _p, _p]
        self._model_ref = ctypes.byref(m)

    def release(self, seq: Sequence) -> None:
        self.sampling.release(seq)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        w = self.embed
        x = np.empty((len(ids), w.shape[1]), dtype=np.float32)
        data = w.data
        rc = self._ops.dequant_rows(int(w.qtype), data.ctypes.data, data.strides[0], ids.ctypes.data, len(ids),
                                    x.ctypes.data, w.shape[1])
        if rc != 0:  # a type the C lookup lacks (the K-quants): the gguf package's dequantizer
            from gguf.quants import dequantize

            x[:] = dequantize(data[ids], w.qtype).reshape(len(ids), -1)
        return x

    def execute(self, sched: SchedulerOutput) -> dict[int, SampleResult]:
        step = StepInputs.of(sched, self.block_size)
        starts = step.query_start_loc
        # the rows that leave the C step: every prompt position of a sequence that wants prompt
        # logits, and the last row of each chunk that samples
        out_rows: list[int] = []
        prompt_rows: list[tuple[Sequence, int, int]] = []  # (seq, first out row, count)
        sampling: list[tuple[Sequence, int]] = []  # (seq, out row)
        for i, s in enumerate(sched.scheduled):
            seq, a, b = s.seq, s.start, s.end
            if seq.want_prompt_logits and a < seq.num_prompt_tokens:
                n = min(b, seq.num_prompt_tokens) - a
                prompt_rows.append((seq, len(out_rows), n))
                out_rows += range(starts[i], starts[i] + n)
            if s.samples:
                sampling.append((seq, len(out_rows)))
                out_rows.append(starts[i + 1] - 1)
        n_seqs, T = len(sched.scheduled), len(step.token_ids)
        tables = step.block_tables
        ids_a = np.array(step.token_ids, dtype=np.int64)
        pos_a, slots_a = np.array(step.positions, dtype=np.int64), np.array(step.slots, dtype=np.int64)
        starts_a, lens_a = np.array(starts, dtype=np.int64), np.array(step.seq_lens, dtype=np.int64)
        rows_a = np.array(out_rows, dtype=np.int64)
        x = self._embed(ids_a)
        hidden = np.empty((len(out_rows), self.cfg.hidden_size), dtype=np.float32)
        logits = np.empty((len(out_rows), self.vocab), dtype=np.float32)
        rc = self._step(self._model_ref, T, x.ctypes.data, pos_a.ctypes.data, slots_a.ctypes.data, n_seqs,
                        starts_a.ctypes.data, lens_a.ctypes.data, tables.ctypes.data, tables.shape[1],
                        int(T == n_seqs), len(out_rows), rows_a.ctypes.data, hidden.ctypes.data, logits.ctypes.data)
        if rc != 0:
            raise RuntimeError(f"the native step failed (code {rc}: -1 out of memory; see csrc/llama_forward.c)")
        for seq, first, n in prompt_rows:
            chunk = logits[first: first + n]
            seq.prompt_logits = chunk.copy() if seq.prompt_logits is None else np.concatenate([seq.prompt_logits, chunk])
        if not sampling:
            return {}
        # without prompt rows the logits are exactly the sampled rows, in order: no gathered copy
        picked = logits[[row for _, row in sampling]] if prompt_rows else logits
        return self.sampling(picked, [seq for seq, _ in sampling], self.eos_token_ids)
