"""``ember bench``: offline throughput over random prompts, reported as one JSON object."""
from __future__ import annotations

import random
import time

from ember.sampling_params import SamplingParams


def throughput(llm, num_seqs: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    engine = llm.engine
    rng = random.Random(seed)
    vocab = engine.tokenizer.vocab_size
    special = set(engine.tokenizer.stop_token_ids)
    # random tokens, so no two prompts share a prefix and nothing hits the cache
    prompts = [[t for t in (rng.randrange(vocab) for _ in range(input_len * 2)) if t not in special][:input_len]
               for _ in range(num_seqs)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    # prefill alone: every prompt to its first token
    t0 = time.perf_counter()
    _run(engine, prompts, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    prefill_s = time.perf_counter() - t0
    engine.block_manager.reset_prefix_cache()  # so the full run recomputes its prompts

    # the full run; decode speed taken over the steps that only decode
    for p in prompts:
        engine.add_request(p, params)
    decode_s, decode_tokens, gen_tokens = 0.0, 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        only_decode = bool(engine.scheduler.running) and not engine.scheduler.waiting and all(
            s.num_computed_tokens == s.num_tokens - 1 for s in engine.scheduler.running)
        ts = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - ts
        n = sum(len(o.outputs[0].delta_token_ids) for o in outs)
        gen_tokens += n
        if only_decode:
            decode_s += dt
            decode_tokens += n
    total_s = time.perf_counter() - t0
    return {
        "backend": engine.backend_info.name,
        "threads": getattr(engine.backend, "threads", None),
        "num_seqs": num_seqs,
        "input_len": input_len,
        "output_len": output_len,
        "prefill_tok_s": round(num_seqs * input_len / prefill_s, 2),
        "decode_tok_s": round(decode_tokens / decode_s, 2) if decode_s else None,
        "total_tok_s": round((num_seqs * input_len + gen_tokens) / total_s, 2),
        "elapsed_s": round(total_s, 3),
    }


def _run(engine, prompts, params) -> None:
    for p in prompts:
        engine.add_request(p, params)
    while engine.has_unfinished_requests():
        engine.step()
