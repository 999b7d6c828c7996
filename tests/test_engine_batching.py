"""Continuous batching on the real model: batch invariance, preemption, prefix caching, aborts."""
import pytest

from ember.llm import LLM
from ember.sampling_params import SamplingParams

from conftest import PROMPTS

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def sixteen_prompts(llm):
    extra = ["Tell me a long story about a dragon who learns to paint, with many details about colours.",
             "a", "Summarise the plot of Hamlet in two sentences.", "2+2=",
             "Describe the water cycle step by step, from evaporation to precipitation and collection.",
             "What's the capital of Japan?", "Name a prime number greater than 100.",
             "Write a limerick about a cat who codes in Rust and never sleeps at night."]
    return [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS + extra]


def test_batch_equals_alone_and_survives_preemption(smollm2_gguf):
    llm = LLM(str(smollm2_gguf), max_model_len=512, enable_prefix_caching=False)
    prompts = sixteen_prompts(llm)
    assert len({len(p) for p in prompts}) > 8  # lengths vary
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert together == alone
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks

    # a pool far smaller than 16 sequences need at once: the newest are preempted and recomputed
    small = LLM(str(smollm2_gguf), max_model_len=512, num_kv_blocks=24, enable_prefix_caching=False)
    squeezed = [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY)]
    assert small.engine.scheduler.num_preemptions > 0
    assert squeezed == alone
    assert small.engine.block_manager.num_free_blocks == 24


def test_prefix_cache_reuses_blocks_and_keeps_output(smollm2_gguf, smollm2_llm):
    system = ("You are a meticulous assistant. " * 30).strip()
    msgs = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]
    llm = smollm2_llm
    ids_a = llm.tokenizer.encode_chat(msgs("What is the boiling point of water?"))
    ids_b = llm.tokenizer.encode_chat(msgs("Why do cats purr?"))
    first = llm.generate([ids_a], GREEDY)[0]
    hits_before = llm.engine.block_manager.prefix_hits
    second = llm.generate([ids_b], GREEDY)[0]
    shared = next(i for i, (a, b) in enumerate(zip(ids_a, ids_b)) if a != b)
    block = llm.engine.block_manager.block_size
    assert second.num_cached_tokens == (shared // block) * block > 100
    assert llm.engine.block_manager.prefix_hits - hits_before == second.num_cached_tokens

    uncached = LLM(str(smollm2_gguf), max_model_len=2048, enable_prefix_caching=False)
    assert uncached.generate([ids_b], GREEDY)[0].outputs[0].token_ids == second.outputs[0].token_ids
    assert first.num_cached_tokens == 0 or first.num_cached_tokens < len(ids_a)


def test_abort_mid_generation_frees_every_block(smollm2_llm):
    engine = smollm2_llm.engine
    bm = engine.block_manager
    rids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
            for p in PROMPTS[:4]]
    for _ in range(3):
        engine.step()
    assert bm.num_free_blocks < bm.num_blocks
    for r in rids:
        assert engine.abort_request(r)
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
