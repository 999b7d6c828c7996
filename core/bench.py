"""``ember bench``: offline throughput over random prompts, reported as one JSON object."""
from __future__ import annotations

import random
import time

from ember.sampling_params import SamplingParams


def parse_length(s: str) -> int | tuple[int, int]:
    """A token count ("128"), or "MIN:MAX" for lengths drawn uniformly per request."""
    lo, sep, hi = s.partition(":")
    try:
        values = [int(v) for v in ((lo, hi) if sep else (s,))]
    except ValueError:
        raise ValueError(f"not a length (N or MIN:MAX): {s!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"lengths must be at least 1: {s!r}")
    if sep and values[0] > values[1]:
        raise ValueError(f"MIN must not exceed MAX: {s!r}")
    return tuple(values) if sep else values[0]


def random_requests(vocab: int, special: set[int], num_seqs: int, input_len, output_len,
                    seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, tokens to generate) for each request: random tokens, so no two prompts
    share a prefix and nothing hits the prefix cache; lengths fixed or uniform in [min, max]."""
    rng = random.Random(seed)

    def draw(length) -> int:
        return rng.randint(*length) if isinstance(length, tuple) else length

    requests = []
    for _ in range(num_seqs):
        n = draw(input_len)
        prompt: list[int] = []
        while len(prompt) < n:
            t = rng.randrange(vocab)
            if t not in special:
                prompt.append(t)
        requests.append((prompt, draw(output_len)))
    return requests


def throughput(llm, num_seqs: int, input_len, output_len, seed: int = 0) -> dict:
    engine = llm.engine
    requests = random_requests(engine.tokenizer.vocab_size, set(engine.tokenizer.stop_token_ids),
                               num_seqs, input_len, output_len, seed)
    prompt_tokens = sum(len(p) for p, _ in requests)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    # prefill alone: every prompt to its first token
    t0 = time.perf_counter()
    _run(engine, [(p, first) for p, _ in requests])
    prefill_s = time.perf_counter() - t0
    engine.block_manager.reset_prefix_cache()  # so the full run recomputes its prompts

    # the full run; decode speed taken over the steps that only decode
    for p, n in requests:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
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
        "input_len": _describe(input_len),
        "output_len": _describe(output_len),
        "prompt_tokens": prompt_tokens,
        "output_tokens": gen_tokens,
        "prefill_tok_s": round(prompt_tokens / prefill_s, 2),
        "decode_tok_s": round(decode_tokens / decode_s, 2) if decode_s else None,
        "output_tok_s": round(gen_tokens / total_s, 2),
        "total_tok_s": round((prompt_tokens + gen_tokens) / total_s, 2),
        "elapsed_s": round(total_s, 3),
    }


def decode_bytes(cfg, weight_itemsize: float, kv_itemsize: int, context: int) -> int:
    """Bytes one decode step of one sequence reads: each layer's weights (the routed experts
    only, for MoE), the output head, and `context` tokens of K and V in every layer."""
    h, hd, ff = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    attn = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd * h + h * cfg.num_heads * hd
    experts = cfg.num_experts_per_tok or 1
    mlp = 3 * h * ff * experts + (cfg.num_experts * h if cfg.num_experts else 0)
    weights = cfg.num_layers * (attn + mlp) + cfg.vocab_size * h
    kv = context * cfg.num_layers * 2 * cfg.num_kv_heads * hd * kv_itemsize
    return int(weights * weight_itemsize + kv)


def _describe(length) -> int | str:
    return f"{length[0]}:{length[1]}" if isinstance(length, tuple) else length


def _run(engine, requests) -> None:
    for p, params in requests:
        engine.add_request(p, params)
    while engine.has_unfinished_requests():
        engine.step()
