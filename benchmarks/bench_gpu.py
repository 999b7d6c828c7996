"""ember against transformers and against the memory-bandwidth roofline, at real models' shapes
with random weights (``dummy:`` models: no checkpoint needed).

Two cases, as issue #5 asks of the GPU backends:

- single-stream decode: one sequence, a 128-token prompt, 256 tokens generated; ember's decode
  speed against the roofline (the bytes one decode step must read — every weight once, the
  output head, the sequence's KV cache — over the memory's bandwidth) and against transformers;
- throughput: 256 sequences with prompt and output lengths drawn from 100..1024, greedy, EOS
  ignored; ember's continuous batching against transformers' ``generate`` in padded batches
  (vLLM's ``benchmark_throughput --backend hf`` method), both counted on the requested tokens.

    python benchmarks/bench_gpu.py --model dummy:llama3-8b --json benchmarks/results/gpu-llama3-8b.json
    python benchmarks/bench_gpu.py --model dummy:qwen3-0.6b

It runs on any backend: on the CPU, with smaller cases, it measures cpu_gguf the same way
(``--device cpu --num-seqs 16 --input-len 16:64 --output-len 16:64``). The bandwidth is the card's
data-sheet figure where the name is known, and is also measured (a read of a 1 GiB buffer).

A dummy model's random weights are drawn by --prefetch-threads threads ahead of the loader (the
same values: each tensor has its own seed), so an 8B model loads in seconds, not the minutes one
core takes to draw 8 billion values. The JSON is written once ember's figures are in, and again
with transformers', so a baseline that fails (its error is recorded) never loses them.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict

from ember.bench import decode_bytes, parse_length, random_requests, throughput
from ember.dummy import DummySpec, is_dummy

# Data-sheet memory bandwidth, bytes/s, by a substring of torch.cuda.get_device_name(); the first
# match wins, so the more specific names come first.
HBM_BANDWIDTH = [
    ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12), ("H200", 4.8e12),
    ("H20", 4.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12), ("MI300X", 5.3e12), ("MI250", 3.2e12),
]


def measured_read_bandwidth(device: str) -> float:
    """Bytes/s of a plain reduction over 1 GiB: what a kernel that only streams memory gets."""
    import torch

    x = torch.ones(1 << 28, dtype=torch.float32, device=device)
    for _ in range(2):
        x.sum()
    _sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    del x
    return (1 << 30) / best


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import torch

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- ember

def prefetch_dummy_weights(threads: int):
    """Draw each dummy weight in a pool of threads as soon as the model's weights are listed, in
    the order the loader reads them (numpy draws and masks with the GIL released). A weight the
    loader reaches before its thread is done is drawn twice, to the same values. Returns a
    function that puts the loader back and stops the pool."""
    from concurrent.futures import ThreadPoolExecutor

    import ember.dummy as dummy

    make = dummy.dummy_weights
    pool = ThreadPoolExecutor(threads, thread_name_prefix="dummy-weights")

    def dummy_weights(*args, **kwargs):
        weights = make(*args, **kwargs)
        for w in weights.values():
            pool.submit(lambda w=w: w.data is None)  # the array stays with its weight, not the future
        return weights

    dummy.dummy_weights = dummy_weights

    def stop():
        dummy.dummy_weights = make
        pool.shutdown(wait=True, cancel_futures=True)

    return stop


def bench_ember(args):
    from ember.llm import LLM

    stop = None
    if is_dummy(args.model) and args.prefetch_threads > 1:
        stop = prefetch_dummy_weights(args.prefetch_threads)
    t = time.perf_counter()
    try:
        llm = LLM(args.model, device=args.device, threads=args.threads, dtype=args.dtype,
                  max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                  gpu_memory_utilization=args.gpu_memory_utilization, eager=args.eager)
    finally:
        if stop is not None:
            stop()
    load_s = time.perf_counter() - t
    engine = llm.engine
    out = {"backend": engine.backend_info.name, "load_s": round(load_s, 2),
           "kv_cache_tokens": engine.kv_capacity_tokens,
           "compute_dtype": engine.backend.compute_dtype(), "kv_dtype": engine.runner.kv_spec.dtype}
    throughput(llm, 1, args.single_input, 16, seed=1)  # warm-up: kernel builds, graphs, page faults
    out["single"] = throughput(llm, 1, args.single_input, args.single_output, seed=2)
    if args.num_seqs:
        out["batch"] = throughput(llm, args.num_seqs, args.input_len, args.output_len, seed=args.seed)
    cfg, device, tokenizer = engine.model_config, engine.backend.device, engine.tokenizer
    stats = engine.backend.memory_stats()
    del engine, llm
    _free(device)
    if str(device).startswith("cuda"):
        import torch

        # what the baseline then has to share the card with (a leak would show here)
        out["memory_GiB"] = {"kv_cache": round(stats.get("kv_cache_bytes", 0) / 2**30, 2),
                             "peak_allocated": round(stats.get("peak_allocated_bytes", 0) / 2**30, 2),
                             "allocated_after_release": round(torch.cuda.memory_allocated() / 2**30, 3)}
    return out, cfg, device, tokenizer


# ------------------------------------------------------------------------------ transformers

def hf_model(cfg, device: str, dtype: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.num_experts or cfg.qk_norm or cfg.attention_bias:
        raise SystemExit("the transformers baseline builds Llama-architecture models only")
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=0, bos_token_id=None, eos_token_id=None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in the compute dtype, not float32 first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    """Seconds for one padded batch to generate exactly `new_tokens` each (left padding)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    _sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(device)
    return time.perf_counter() - t


def bench_hf(args, cfg, device: str, vocab: int, special: set[int]) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model = hf_model(cfg, device, args.hf_dtype)
    out = {"load_s": round(time.perf_counter() - t, 2), "dtype": args.hf_dtype,
           "attn_implementation": model.config._attn_implementation, "batch_size": args.hf_batch_size}
    (prompt, _), = random_requests(vocab, special, 1, args.single_input, 1, seed=2)
    hf_generate(model, [prompt], 16, device)  # warm-up
    t1 = hf_generate(model, [prompt], 1, device)
    tn = hf_generate(model, [prompt], args.single_output, device)
    out["single"] = {"decode_tok_s": round((args.single_output - 1) / (tn - t1), 2)}
    if args.num_seqs:
        requests = random_requests(vocab, special, args.num_seqs, args.input_len, args.output_len, args.seed)
        elapsed = 0.0
        for i in range(0, len(requests), args.hf_batch_size):
            batch = requests[i:i + args.hf_batch_size]
            elapsed += hf_generate(model, [p for p, _ in batch], max(n for _, n in batch), device)
        prompt_tokens = sum(len(p) for p, _ in requests)
        output_tokens = sum(n for _, n in requests)
        out["batch"] = {"num_seqs": args.num_seqs, "prompt_tokens": prompt_tokens,
                        "output_tokens": output_tokens, "elapsed_s": round(elapsed, 3),
                        "output_tok_s": round(output_tokens / elapsed, 2),
                        "total_tok_s": round((prompt_tokens + output_tokens) / elapsed, 2)}
    del model
    _free(device)
    return out


# ---------------------------------------------------------------------------------- report

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dummy:llama3-8b", help="a dummy: shape (or any model ember loads)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default=None, help="ember's compute dtype (default: the backend's)")
    p.add_argument("--hf-dtype", default="bfloat16")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--single-input", type=int, default=128)
    p.add_argument("--single-output", type=int, default=256)
    p.add_argument("--num-seqs", type=int, default=256, help="0: single stream only")
    p.add_argument("--input-len", type=parse_length, default=(100, 1024))
    p.add_argument("--output-len", type=parse_length, default=(100, 1024))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--prefetch-threads", type=int, default=min(16, os.cpu_count() or 1),
                   help="threads drawing a dummy model's weights ahead of the loader (1: none)")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)

    ember, cfg, device, tokenizer = bench_ember(args)
    import torch

    name = torch.cuda.get_device_name() if str(device).startswith("cuda") else _cpu_name()
    spec = next((bw for key, bw in HBM_BANDWIDTH if key in name), None) if str(device).startswith("cuda") else None
    measured = measured_read_bandwidth(device)
    # dummy weights are read in their own dtype; a GGUF file's, dequantized at load, in bfloat16
    itemsize = 4 if is_dummy(args.model) and DummySpec.parse(args.model).dtype == "float32" else 2
    kv_itemsize = {"float32": 4}.get(ember["kv_dtype"], 2)
    context = args.single_input + args.single_output // 2  # the mean context over the decode
    step_bytes = decode_bytes(cfg, itemsize, kv_itemsize, context)
    decode = ember["single"]["decode_tok_s"]
    roof = {"bytes_per_token": step_bytes, "mean_context": context,
            "measured_read_GBps": round(measured / 1e9, 1),
            "roofline_tok_s_measured": round(measured / step_bytes, 1),
            "share_of_measured": round(decode * step_bytes / measured, 3)}
    if spec:
        roof.update({"spec_GBps": spec / 1e9, "roofline_tok_s_spec": round(spec / step_bytes, 1),
                     "share_of_spec": round(decode * step_bytes / spec, 3)})
    result = {"model": args.model, "device": name, "date": time.strftime("%Y-%m-%d"),
              "versions": _versions(), "config": asdict(cfg), "ember": ember, "roofline": roof, "args": {
                  k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}}
    _write(result, args.json)
    if not args.skip_hf:
        try:
            hf = bench_hf(args, cfg, device, tokenizer.vocab_size, set(tokenizer.stop_token_ids))
        except Exception as e:  # noqa: BLE001 - ember's figures stand; say why the baseline has none
            result["transformers_error"] = f"{type(e).__name__}: {e}"
            _write(result, args.json)
            print(f"the transformers baseline failed: {result['transformers_error']}", file=sys.stderr)
            return 1
        result["transformers"] = hf
        result["ratios"] = {"single_decode": round(decode / hf["single"]["decode_tok_s"], 2)}
        if args.num_seqs:
            result["ratios"]["throughput_total"] = round(
                ember["batch"]["total_tok_s"] / hf["batch"]["total_tok_s"], 2)
            result["ratios"]["throughput_output"] = round(
                ember["batch"]["output_tok_s"] / hf["batch"]["output_tok_s"], 2)
        _write(result, args.json)
    print(json.dumps(result, indent=2))
    return 0


def _write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


if __name__ == "__main__":
    sys.exit(main())
