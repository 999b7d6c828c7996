"""The cuda backend as a whole: availability, the conformance kit in Triton's interpreter (CPU
tensors, the same code a GPU runs), the KV budget, graph sizes; and, on a GPU, the real thing."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (test_cuda_kernels.py says why)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from ember.backend import BackendOptions  # noqa: E402
from ember.testing import run_check  # noqa: E402
from ember_cuda.backend import CudaBackend, InterpretedCudaBackend  # noqa: E402
from ember_cuda.runner import capture_sizes, kv_budget  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None,
                               reason="needs an NVIDIA GPU with a CUDA build of torch")
# With a GPU the kernels are built for it, not for the interpreter (TRITON_INTERPRET is left unset
# above), so the interpreted variant cannot run in the same process.
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the kernels run on the GPU here, not in Triton's interpreter")
# The backend the tests that need no particular device build: the real one where it can run.
HERE = CudaBackend if CudaBackend.availability().ok else InterpretedCudaBackend


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_unavailable_without_a_gpu_says_why():
    avail = CudaBackend.availability()
    assert not avail.ok
    if torch.version.cuda is None:
        assert "CPU-only build" in avail.reason and "download.pytorch.org" in avail.reason
    else:
        assert "no CUDA device" in avail.reason


def test_the_interpreter_variant_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in InterpretedCudaBackend.availability().reason


def test_options_are_checked():
    with pytest.raises(ValueError, match="computes in bfloat16, float16, float32, not int8"):
        CudaBackend(BackendOptions(dtype="int8"))
    with pytest.raises(ValueError, match="memory utilization must be in"):
        CudaBackend(BackendOptions(memory_utilization=1.5))


# --- the conformance kit over the backend's own code, in the interpreter -----------------------

@interpreted
@pytest.mark.parametrize("check,dtype", [("attention", "float32"), ("linear", "float32"), ("linear", "bfloat16"),
                                         ("kv_allocator", "bfloat16")])
def test_conformance_in_the_interpreter(check, dtype):
    run_check(check, InterpretedCudaBackend, BackendOptions(dtype=dtype))


@interpreted
@pytest.mark.slow
def test_conformance_attention_bfloat16_in_the_interpreter():
    run_check("attention", InterpretedCudaBackend, BackendOptions(dtype="bfloat16"))


@interpreted
@pytest.mark.slow
def test_conformance_end_to_end_in_the_interpreter(smollm2_gguf):
    # 4 greedy tokens a prompt, not 16: each step is hundreds of interpreted kernel programs
    run_check("end_to_end", InterpretedCudaBackend, BackendOptions(dtype="float32"), model=str(smollm2_gguf),
              max_tokens=4)


def test_tied_embedding_and_head_share_one_tensor():
    from ember.testing.conformance import random_weight
    import numpy as np

    backend = HERE(BackendOptions(dtype="bfloat16"))
    w = random_weight("Q8_0", 64, 96, np.random.default_rng(0), "model.embed_tokens.weight")
    emb, head = backend.create_embedding(w), backend.create_linear([w])
    assert emb.table is head.weight and emb.table.dtype == torch.bfloat16
    fused = backend.create_linear([w, w])
    assert fused.weight.shape == (128, 96)


def test_layer_ops_keep_the_compute_dtype():
    from ember_cuda.layers import DtypeKeepingOps

    ops = DtypeKeepingOps()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    normed, y = ops.rms_norm(x, torch.ones(64), 1e-6, x.clone())
    assert normed.dtype == y.dtype == torch.bfloat16
    want = (2 * x.float()) * torch.rsqrt((2 * x.float()).pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(normed.float(), want, atol=2e-2)
    q, k = torch.randn(3, 4, 64, dtype=torch.bfloat16), torch.randn(3, 2, 64, dtype=torch.bfloat16)
    cos, sin = torch.ones(8, 64), torch.zeros(8, 64)
    q2, k2 = ops.rope(q, k, torch.tensor([0, 1, 2]), cos, sin)
    assert q2.dtype == torch.bfloat16 and torch.equal(q2, q) and torch.equal(k2, k)


# --- memory and graphs, the parts that need no GPU ---------------------------------------------

def test_kv_budget_is_what_the_share_leaves():
    gib = 2**30
    # an 80 GiB card at 0.9: 72 GiB, less 16 GiB of weights and activations, less 1 GiB outside torch
    assert kv_budget(80 * gib, 0.9, 16 * gib, 1 * gib) == 55 * gib
    assert kv_budget(80 * gib, 0.1, 16 * gib, 0) < 0  # the runner refuses this with a message


def test_profiling_runs_the_largest_step_as_whole_prompts():
    from ember.ops import reference
    from ember_cuda.runner import profile_step

    # the step budget (10 tokens) as prompts of at most the model's length (4), each its own blocks
    ids, positions, meta, blocks = profile_step(10, 256, 4, 2, "cpu")
    assert meta.query_lens_list == meta.seq_lens_list == [4, 4, 2] and len(ids) == 10
    assert positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert blocks == 1 + 2 + 2 + 1 and meta.block_tables.tolist() == [[1, 2], [3, 4], [5, 0]]
    slots = meta.slot_mapping.tolist()
    assert sorted(slots) == list(range(2, 12))  # every slot of blocks 1..5 once, block 0 unused
    # no more sequences than the engine runs at once, and never an empty step
    assert profile_step(8192, 2, 1000, 16, "cpu")[2].seq_lens_list == [1000, 1000]
    assert profile_step(0, 4, 8, 16, "cpu")[2].seq_lens_list == [1]
    # metadata the reference's attention accepts: each prompt attends within itself
    q, k, v = torch.randn(3, 10, 2, 8, dtype=torch.float64)
    cache = torch.zeros(blocks, 2, 2, 8, dtype=torch.float64)
    out = reference.paged_attention(q, k, v, cache, cache.clone(), meta, 1.0)
    assert torch.allclose(out[4], v[4]) and torch.allclose(out[8], v[8])  # a prompt's first token sees itself


def test_capture_sizes():
    assert capture_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(4096)[-1] == 512


# --- on a GPU ---------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.slow
def test_gpu_graphs_and_eager_agree_and_match_the_reference(smollm2_gguf):
    from ember.llm import LLM
    from ember.sampling_params import SamplingParams
    from ember.testing.conformance import ReferenceBackend, greedy_tokens

    p = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = ["The capital of France is", "def fib(n):", "1, 2, 3, 4,"]
    runs = {}
    for eager in (False, True):
        llm = LLM(str(smollm2_gguf), device="cuda", dtype="float32", eager=eager, max_model_len=512)
        runs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
        assert (llm.engine.runner.graphs is None) == eager
        del llm
        torch.cuda.empty_cache()
    assert runs[False] == runs[True]
    run_check("end_to_end", CudaBackend, BackendOptions(dtype="float32"), model=str(smollm2_gguf))
    assert greedy_tokens(CudaBackend, str(smollm2_gguf), BackendOptions(dtype="float32"))[0] == \
        greedy_tokens(ReferenceBackend, str(smollm2_gguf))[0]


@needs_gpu
def test_gpu_kv_pool_is_sized_by_profiling(smollm2_gguf):
    from ember.llm import LLM

    llm = LLM(str(smollm2_gguf), device="cuda", gpu_memory_utilization=0.5, eager=True, max_model_len=512)
    free, total = torch.cuda.mem_get_info()
    stats = llm.engine.backend.memory_stats()
    assert 0 < stats["kv_cache_bytes"] <= 0.5 * total
    assert torch.cuda.memory_reserved() <= 0.5 * total * 1.02


def test_torch_build_is_read_without_importing_torch():
    from ember_cuda.backend import torch_build

    build = torch_build()
    assert build == {"__version__": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip}


# --- on a GPU, with models that need no file ----------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("check", ["attention", "linear", "kv_allocator"])
def test_gpu_conformance(check, dtype):
    run_check(check, CudaBackend, BackendOptions(dtype=dtype))


@needs_gpu
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_gpu_conformance_end_to_end_on_a_dummy_model(eager):
    # random weights: in float32, where the kit holds a backend to the reference's greedy tokens
    run_check("end_to_end", CudaBackend, BackendOptions(dtype="float32", eager=eager), model="dummy:tiny")


def _gpu_llm(**kwargs):
    from ember.llm import LLM
    from ember.plugins import PluginRegistry

    return LLM("dummy:tiny", device="cuda", registry=PluginRegistry.of(CudaBackend), **kwargs)


@needs_gpu
def test_gpu_graphs_replay_padded_batches_as_eager_steps_run_them():
    from ember.sampling_params import SamplingParams

    # 5 and 11 sequences replay the graphs of 8 and 16 (rows padded); one context of ~1000
    # tokens crosses the decode kernel's 512-key splits
    prompts = [f"{i} " + "count " * (3 * i + 1) for i in range(10)] + ["count " * 200]
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    runs = {}
    for eager in (False, True):
        llm = _gpu_llm(dtype="float32", eager=eager, max_model_len=2048, max_num_seqs=16,
                       kv_cache_memory=256 * 2**20)
        assert (llm.engine.runner.graphs is None) == eager
        runs[eager] = [[o.outputs[0].token_ids for o in llm.generate(batch, p)] for batch in (prompts[:5], prompts)]
        del llm
        torch.cuda.empty_cache()
    assert runs[False] == runs[True]


@needs_gpu
def test_gpu_kv_pool_of_a_dummy_model_is_sized_by_profiling():
    llm = _gpu_llm(gpu_memory_utilization=0.3, eager=True, max_model_len=512)
    free, total = torch.cuda.mem_get_info()
    stats = llm.engine.backend.memory_stats()
    assert 0.2 * total < stats["kv_cache_bytes"] <= 0.3 * total
    assert torch.cuda.memory_reserved() <= 0.3 * total * 1.02
    del llm
    torch.cuda.empty_cache()
