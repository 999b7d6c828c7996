"""ember and llama.cpp, case by case: single-stream decode, 512-token prefill, and decode
throughput at 8, 32 and 64 sequences (128-token prompts, 128 new tokens each). One round each:
every case already averages over its 128 steps (see ember.bench.throughput)."""
from __future__ import annotations

import pytest

from conftest import FIGURES, record

BATCHES = (8, 32, 64)


@pytest.fixture(scope="module")
def llm(model_path, threads):
    from ember.llm import LLM

    from ember.bench import throughput

    llm = LLM(str(model_path), threads=threads, max_model_len=1024, kv_cache_memory=1024**3)
    throughput(llm, 1, 128, 16)  # a warm-up pass, as llama-bench makes
    return llm


@pytest.fixture(scope="module")
def llamacpp():
    import llamacpp

    if llamacpp.find_tool("llama-bench") is None and not llamacpp.has_python_package():
        pytest.skip("llama.cpp not found: build it with benchmarks/build_llamacpp.sh and set LLAMA_CPP_BIN")
    return llamacpp


def _ember(benchmark, llm, case, n, prompt, gen, key):
    from ember.bench import throughput

    out = benchmark.pedantic(throughput, args=(llm, n, prompt, gen), rounds=1, iterations=1)
    record(benchmark, case, "ember", out[key])


def test_ember_decode_1(benchmark, llm):
    _ember(benchmark, llm, "decode, 1 sequence", 1, 128, 128, "decode_tok_s")


def test_ember_prefill_512(benchmark, llm):
    _ember(benchmark, llm, "prefill, 512 tokens", 1, 512, 1, "prefill_tok_s")


@pytest.mark.parametrize("n", BATCHES)
def test_ember_decode_batched(benchmark, llm, n):
    _ember(benchmark, llm, f"decode, {n} sequences", n, 128, 128, "decode_tok_s")


def test_llamacpp_decode_1(benchmark, llamacpp, model_path, threads):
    tok_s = benchmark.pedantic(llamacpp.bench_decode, args=(model_path, threads), kwargs={"n": 128},
                               rounds=1, iterations=1)
    record(benchmark, "decode, 1 sequence", "llama.cpp", tok_s)


def test_llamacpp_prefill_512(benchmark, llamacpp, model_path, threads):
    tok_s = benchmark.pedantic(llamacpp.bench_prefill, args=(model_path, threads), kwargs={"n": 512},
                               rounds=1, iterations=1)
    record(benchmark, "prefill, 512 tokens", "llama.cpp", tok_s)


def test_llamacpp_decode_batched(benchmark, llamacpp, model_path, threads):
    if llamacpp.find_tool("llama-batched-bench") is None:
        pytest.skip("llama-batched-bench not found (benchmarks/build_llamacpp.sh builds it)")
    res = benchmark.pedantic(llamacpp.bench_batched, args=(model_path, threads),
                             kwargs={"npl": list(BATCHES), "npp": 128, "ntg": 128}, rounds=1, iterations=1)
    for n in BATCHES:
        FIGURES[(f"decode, {n} sequences", "llama.cpp")] = res[n]
    benchmark.extra_info["tok_s"] = {str(n): res[n] for n in BATCHES}
