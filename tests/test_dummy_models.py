"""Checkpoint-free models (``dummy:``): the shapes, the random weights, the tokenizer, and every
backend running one end to end; plus the benchmark accounting that uses them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

if not torch.cuda.is_available():  # before triton is imported (test_cuda_kernels.py says why)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ember.bench import decode_bytes, random_requests, throughput
from ember.hf.config import model_config_from_hf as config_from_hf
from ember.hf.safetensors import CheckpointError
from ember.dummy import (PRESETS, DummyModelError, dummy_tokenizer, dummy_weights,
                         load_dummy)
from ember.gguf.loader import hf_weight_shapes
from ember.llm import LLM
from ember.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]


def _params(cfg) -> int:
    return sum(int(np.prod(s)) for s in hf_weight_shapes(cfg).values())


def test_presets_have_the_published_sizes():
    # Meta-Llama-3-8B: 8,030,261,248 parameters
    assert _params(PRESETS["llama3-8b"]) == 8_030_261_248
    # Qwen3-0.6B: 596,049,920, less its q/k norms (28 layers x 2 x 128), which "Llama-architecture" drops
    assert _params(PRESETS["qwen3-0.6b"]) == 596_049_920 - 28 * 2 * 128
    # the head is counted once when tied, and a decode step reads it once either way
    assert "lm_head.weight" not in hf_weight_shapes(PRESETS["qwen3-0.6b"])


def test_hf_configs_give_the_same_shapes():
    llama3 = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "rope_scaling": None}
    assert config_from_hf(llama3) == PRESETS["llama3-8b"]
    qwen3 = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
             "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
             "tie_word_embeddings": True}
    cfg = config_from_hf(qwen3)
    assert cfg.qk_norm and cfg.head_dim == 128 and cfg.architecture == "qwen3"
    assert _params(cfg) == 596_049_920
    scaled = config_from_hf({**llama3, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                        "original_max_position_embeddings": 8192}})
    assert scaled.rope_scaling.type == "llama3" and scaled.rope_scaling.factor == 8.0


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_size": None}, "hidden_size must be a positive integer"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"rope_scaling": {"type": "dynamic"}}, "rope_scaling type 'dynamic' is not supported"),
    ({"hidden_size": 100, "num_attention_heads": 3, "num_key_value_heads": 3}, "head_dim is missing"),
])
def test_bad_hf_configs_are_refused_clearly(change, message):
    base = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    with pytest.raises(CheckpointError, match=message):
        config_from_hf({**base, **change})


@pytest.mark.parametrize("ref,message", [
    ("dummy:", "names no shape"),
    ("dummy:tiny?dtype=int4", "dtype must be one of"),
    ("dummy:tiny?layers=2", "unknown option 'layers'"),
    ("dummy:no-such-shape", "neither a preset"),
    ("smollm2", "not a dummy model reference"),
])
def test_bad_references_are_refused_clearly(ref, message):
    with pytest.raises(DummyModelError, match=message):
        load_dummy(ref)


def test_a_config_file_that_is_not_json(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(DummyModelError, match="not a readable JSON config"):
        load_dummy(f"dummy:{bad}")


@pytest.mark.parametrize("dtype,qtype", [("bfloat16", Q.BF16), ("float16", Q.F16), ("float32", Q.F32)])
def test_weights_are_small_random_values_and_reproducible(dtype, qtype):
    cfg = PRESETS["tiny"]
    w = dummy_weights(cfg, dtype, seed=3)
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert q.qtype == qtype and q.shape == (64, 64)
    values = q.dequantize()
    assert values.shape == (64, 64)
    assert float(values.abs().max()) < 2 ** -9 and float(values.abs().min()) >= (2 ** -10 if dtype != "float32" else 0)
    assert 0.4 < float((values > 0).float().mean()) < 0.6  # both signs
    assert np.array_equal(q.data, dummy_weights(cfg, dtype, seed=3)[q.name].data)  # same seed, same bytes
    assert not np.array_equal(q.data, dummy_weights(cfg, dtype, seed=4)[q.name].data)
    assert not np.array_equal(q.data, w["model.layers.1.self_attn.q_proj.weight"].data)
    assert (w["model.norm.weight"].dequantize() == 1).all()  # norms start at one
    assert q.data.dtype == np.uint8 and q.data.shape[0] == 64  # the loader's [rows, row_nbytes] form


def test_an_8b_model_is_not_made_until_read():
    w = dummy_weights(PRESETS["llama3-8b"])  # 8 billion values: only made tensor by tensor, when read
    assert len(w) == 2 + 1 + 32 * 9
    assert w["model.layers.31.input_layernorm.weight"].data.shape == (1, 4096 * 2)


def test_the_tokenizer_is_a_real_byte_level_bpe():
    tok = dummy_tokenizer(1000)
    assert tok.vocab_size == 1000
    text = "hello world, ünïcode ✓"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # " w" merged
    assert tok.eos_token == "<|endoftext|>" and tok.token_to_id("<|im_end|>") in tok.stop_token_ids
    chat = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert tok.decode(chat, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert tok.decode([999]) == "<dummy999>"
    with pytest.raises(DummyModelError, match="at least 259"):
        dummy_tokenizer(100)


def test_a_gguf_source_gives_its_shape_and_tokenizer_but_random_weights(tiny_gguf):
    from ember.loading import load_model

    loaded = load_model(tiny_gguf)
    file_cfg, file_tok, file_w = loaded.config, loaded.tokenizer, loaded.weights
    cfg, tok, w = load_dummy(f"dummy:{tiny_gguf}")
    assert cfg.hidden_size == file_cfg.hidden_size and cfg.num_layers == file_cfg.num_layers
    assert tok.encode("Hello there") == file_tok.encode("Hello there")
    assert set(w) == set(file_w)
    name = "model.layers.0.mlp.up_proj.weight"
    assert w[name].qtype == Q.BF16 and not np.allclose(w[name].dequantize(), file_w[name].dequantize())


def test_generation_and_bad_input_on_a_dummy_model():
    llm = LLM("dummy:tiny", device="cpu_gguf", kv_cache_memory=32 << 20)
    assert llm.engine.model_path is None and llm.engine.model_config.name == "dummy:tiny"
    outs = llm.generate(["hello", [5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [7, 7]
    with pytest.raises(ValueError, match="context length is 2048"):
        llm.generate([[5] * 2048], SamplingParams(max_tokens=1))
    again = llm.generate(["hello"], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids  # and the engine is healthy


# Each in-tree backend's CPU-runnable variant, in float32: random weights of 1e-3 leave logits close
# together, and a bfloat16 backend may rightly pick the other of two near-equal tokens.
BACKENDS = [("ember_cpu_gguf.backend", "CpuGgufBackend", None),
            ("ember_cuda.backend", "InterpretedCudaBackend", "triton"),
            ("ember_rocm.backend", "InterpretedRocmBackend", "triton"),
            ("ember_xpu.backend", "PortableXpuBackend", None),
            ("ember_tpu.backend", "JaxCpuBackend", "jax")]


@pytest.mark.parametrize("module,cls,needs", BACKENDS, ids=[b[1] for b in BACKENDS])
def test_every_backend_runs_a_dummy_model_like_the_reference(module, cls, needs):
    """The conformance kit's end-to-end check without a model file: bfloat16 weights through each
    backend's own upload path, batched, with the prefix-cache repeat."""
    import importlib

    if needs:
        pytest.importorskip(needs)
    from ember.backend import BackendOptions
    from ember.testing import run_check

    backend = getattr(importlib.import_module(module), cls)
    options = BackendOptions(dtype="float32") if needs or "Xpu" in cls else BackendOptions()
    assert "4 of 4" in run_check("end_to_end", backend, options, model="dummy:tiny", max_tokens=8)


# --- the benchmark's accounting ------------------------------------------------------------------

def test_random_requests_draw_lengths_and_avoid_special_tokens():
    reqs = random_requests(300, {256, 258}, 50, (10, 20), (3, 9), seed=1)
    assert reqs == random_requests(300, {256, 258}, 50, (10, 20), (3, 9), seed=1)
    assert all(10 <= len(p) <= 20 and 3 <= n <= 9 for p, n in reqs)
    assert {len(p) for p, _ in reqs} != {10} and not any(t in (256, 258) for p, _ in reqs for t in p)
    assert all(len(p) == 12 and n == 4 for p, n in random_requests(300, set(), 5, 12, 4))


def test_throughput_counts_the_requested_tokens():
    llm = LLM("dummy:tiny", device="cpu_gguf", kv_cache_memory=32 << 20)
    r = throughput(llm, 6, (8, 16), (2, 5), seed=7)
    reqs = random_requests(llm.tokenizer.vocab_size, set(llm.tokenizer.stop_token_ids), 6, (8, 16), (2, 5), 7)
    assert r["prompt_tokens"] == sum(len(p) for p, _ in reqs)
    assert r["output_tokens"] == sum(n for _, n in reqs)
    assert r["input_len"] == "8:16" and r["num_seqs"] == 6


def test_decode_bytes_is_every_weight_but_the_embedding_plus_the_kv_read():
    cfg = PRESETS["llama3-8b"]
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    embedding = cfg.vocab_size * cfg.hidden_size
    assert decode_bytes(cfg, 2, 2, 0) == 2 * (8_030_261_248 - embedding - norms)
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2  # 128 KiB in bf16
    assert decode_bytes(cfg, 2, 2, 1000) - decode_bytes(cfg, 2, 2, 0) == 1000 * kv_per_token == 1000 * 131072


def test_the_gpu_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/bench_gpu.py, at a tiny size on the CPU: the harness the GPU figures come from
    must not rot between GPU sessions. It measures nothing here; it checks the counts."""
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--model", "dummy:tiny", "--device", "cpu",
           "--single-input", "16", "--single-output", "8", "--num-seqs", "6", "--input-len", "4:12",
           "--output-len", "2:6", "--hf-batch-size", "4", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)
    r = json.loads(out.read_text())
    assert r["ember"]["batch"]["output_tokens"] == r["transformers"]["batch"]["output_tokens"]
    assert r["ember"]["batch"]["prompt_tokens"] == r["transformers"]["batch"]["prompt_tokens"]
    assert r["roofline"]["bytes_per_token"] == decode_bytes(PRESETS["tiny"], 2, 2, 16 + 4)
    assert r["ratios"]["throughput_total"] > 0 and r["roofline"]["measured_read_GBps"] > 0


def test_the_cli_runs_a_dummy_model():
    run = subprocess.run([sys.executable, "-m", "ember.cli", "run", "dummy:tiny", "hi", "--no-server",
                          "--max-tokens", "3", "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    bad = subprocess.run([sys.executable, "-m", "ember.cli", "run", "dummy:nope", "hi", "--no-server"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "neither a preset" in bad.stderr and "Traceback" not in bad.stderr
