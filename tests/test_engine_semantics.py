"""Request semantics through the engine on the real model: stops, lengths, seeds, n, errors."""
import pytest

from ember.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


def chat(llm, q):
    return llm.tokenizer.encode_chat([{"role": "user", "content": q}])


def test_max_tokens_finishes_with_length(smollm2_llm):
    out = smollm2_llm.generate([chat(smollm2_llm, "Count from 1 to 100.")],
                               SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_eos_stops_unless_ignored(smollm2_llm):
    ids = chat(smollm2_llm, "Say just the word yes.")
    out = smollm2_llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=64))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in smollm2_llm.tokenizer.stop_token_ids
    assert "<|im_end|>" not in out.text


def test_stop_string_cuts_text(smollm2_llm):
    ids = chat(smollm2_llm, "List the planets of the solar system in order.")
    full = smollm2_llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    word = "Earth" if "Earth" in full.text else full.text.split()[3]
    out = smollm2_llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=40, stop=[word]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == word
    assert out.text == full.text[: full.text.index(word)]
    inc = smollm2_llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=40, stop=[word],
                                                     include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == full.text[: full.text.index(word) + len(word)]


def test_stop_token_ids(smollm2_llm):
    ids = chat(smollm2_llm, "Why is the sky blue?")
    full = smollm2_llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    stop_tok = full.token_ids[5]
    out = smollm2_llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_tok]))[0].outputs[0]
    first = full.token_ids.index(stop_tok)
    assert out.token_ids == full.token_ids[: first + 1] and out.stop_reason == stop_tok


def test_seeded_sampling_reproducible_alone_and_in_batch(smollm2_llm):
    ids = chat(smollm2_llm, "Write a short poem about the sea.")
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    a = smollm2_llm.generate([ids], p)[0].outputs[0].token_ids
    b = smollm2_llm.generate([ids], p)[0].outputs[0].token_ids
    others = [chat(smollm2_llm, q) for q in ("Hi", "What is AI?", "Tell me a joke.")]
    batch = smollm2_llm.generate(others + [ids] + others,
                                 [SamplingParams(temperature=0.8, max_tokens=10)] * 3 + [p] + [SamplingParams(temperature=0.0, max_tokens=30)] * 3)
    assert a == b == batch[3].outputs[0].token_ids
    c = smollm2_llm.generate([ids], SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True))[0]
    assert c.outputs[0].token_ids != a


def test_n_samples_and_logprobs(smollm2_llm):
    ids = chat(smollm2_llm, "Name a colour.")
    out = smollm2_llm.generate([ids], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=2,
                                                     ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids) == 8 and all(lp <= 0 for lp in o.logprobs)
        assert all(len(t) == 2 for t in o.top_logprobs)


def test_streamed_deltas_add_up(smollm2_llm):
    engine = smollm2_llm.engine
    rid = engine.add_request(chat(smollm2_llm, "Describe a rainbow with emoji 🌈."),
                             SamplingParams(temperature=0.0, max_tokens=40, stop=["\n\n"]))
    pieces, final = [], None
    while final is None:
        for out in engine.step():
            if out.request_id == rid:
                pieces.append(out.outputs[0].delta_text)
                if out.finished:
                    final = out
    assert "".join(pieces) == final.outputs[0].text
    # only the very end may hold a character that max_tokens cut in half
    assert "\ufffd" not in "".join(pieces[:-1])


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "empty"),
    ([10**9], SamplingParams(), "token ids"),
    (list(range(5000)), SamplingParams(), "context length"),
    ([1, 2, 3], SamplingParams(max_tokens=5000), "does not fit"),
])
def test_bad_requests_are_rejected_and_leave_engine_clean(smollm2_llm, prompt, params, match):
    engine = smollm2_llm.engine
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
