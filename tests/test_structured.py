"""Structured output (SamplingParams.structured): grammar masks from llguidance, and the engine's
use of them on the real model.

Unit tests run on a tiny byte-level tokenizer (no model file needed) and on SmolLM2's real
tokenizer; end-to-end tests generate with SmolLM2 and check every output against the spec.
A request stopped by max_tokens before its grammar completes ends with finish_reason "length" and
its text may be incomplete (e.g. unterminated JSON): the mask guarantees a valid prefix, not a
complete document.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ember.sampling_params import SamplingParams, StructuredOutput
from ember.structured import InvalidStructuredOutput, compiler_for, make_matcher, validate

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
PHONE = r"\d{3}-\d{4}"

BAD_SPECS = [
    (StructuredOutput(json_schema={"type": "frobnicate"}), "json_schema"),
    (StructuredOutput(json_schema="{not json"), "not valid JSON"),
    (StructuredOutput(json_schema=[1, 2]), "JSON object"),
    (StructuredOutput(json_schema={"type": "object", "default": object()}), "serialisable"),
    (StructuredOutput(regex="(unclosed"), "regex"),
    (StructuredOutput(grammar="start: undefined_rule"), "grammar"),
]


# -- a tiny tokenizer: 256 byte tokens, one merge ("ab") and an EOS --------------------------------

@pytest.fixture(scope="module")
def byte_tok():
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from ember.tokenizer import Tokenizer, _byte_alphabet

    alphabet = _byte_alphabet()
    tokens = [alphabet[b] for b in range(256)] + ["ab", "<eos>"]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<eos>", special=True, normalized=False)])
    return Tokenizer(backend, tokens, {257}, eos_token_id=257)


def allowed_ids(matcher, width=None) -> set[int]:
    return set(np.flatnonzero(matcher.allowed_mask(width)).tolist())


def test_regex_mask_steps_and_eos_only_at_completion(byte_tok):
    m = make_matcher(byte_tok, StructuredOutput(regex=r"(ab)+[0-9]"))
    # The grammar forces "ab" first, and llguidance offers forced bytes in their canonical
    # tokenization only: the merged token, not "a" then "b".
    assert allowed_ids(m) == {256}
    assert m.advance(256) and not m.is_accepting()
    assert allowed_ids(m) == {*range(48, 58), ord("a"), 256}  # a digit, or another "ab"
    assert m.advance(ord("7"))
    assert m.is_finished() and allowed_ids(m) == {257}  # only EOS after a complete match


def test_accepting_but_extensible_allows_eos_and_more(byte_tok):
    m = make_matcher(byte_tok, StructuredOutput(regex="x+"))
    assert 257 not in allowed_ids(m)
    assert m.advance(ord("x"))
    assert m.is_accepting() and not m.is_finished()
    assert allowed_ids(m) == {ord("x"), 257}


def test_mask_is_as_wide_as_the_logits(byte_tok):
    m = make_matcher(byte_tok, StructuredOutput(regex="x"))
    m.advance(ord("x"))
    wide = m.allowed_mask(300)  # a model padded past its 258-token vocabulary
    assert wide.shape == (300,) and wide.dtype == np.bool_
    assert np.flatnonzero(wide).tolist() == [257] and not wide[258:].any()
    narrow = np.zeros(200, dtype=np.bool_)  # a tokenizer bigger than the model's logits
    make_matcher(byte_tok, StructuredOutput(regex="q")).fill_mask(narrow)
    assert np.flatnonzero(narrow).tolist() == [ord("q")]


def test_json_object_accepts_only_objects(byte_tok):
    m = make_matcher(byte_tok, StructuredOutput(json_object=True))
    assert allowed_ids(m) <= {ord("{"), ord(" "), ord("\n"), ord("\t"), ord("\r")}
    for ch in '{"k": [1, 2]}':
        assert m.advance(ord(ch)), ch
    assert m.is_finished()


def test_rejected_token_marks_matcher_failed(byte_tok):
    m = make_matcher(byte_tok, StructuredOutput(regex="[0-9]+"))
    assert not m.advance(ord("z"))
    assert m.error and not m.is_finished()
    assert allowed_ids(m) == {257}  # a failed matcher offers only the stop tokens


@pytest.mark.parametrize("spec, what", BAD_SPECS)
def test_invalid_specs_raise_value_error_with_the_reason(byte_tok, spec, what):
    with pytest.raises(ValueError, match=what) as info:
        validate(byte_tok, spec)
    assert isinstance(info.value, InvalidStructuredOutput)


def test_compiler_does_not_keep_its_tokenizer_alive(byte_tok):
    import gc
    import weakref

    from ember.tokenizer import Tokenizer

    tok = Tokenizer(byte_tok._backend, [byte_tok.id_to_token(i) for i in range(258)], {257},
                    eos_token_id=257)
    compiler_for(tok)
    ref = weakref.ref(tok)
    del tok
    gc.collect()
    assert ref() is None


def test_compiled_grammars_are_cached_and_matchers_independent(byte_tok):
    compiler = compiler_for(byte_tok)
    assert compiler_for(byte_tok) is compiler
    spec = StructuredOutput(json_schema=json.dumps({"type": "object"}))
    same = StructuredOutput(json_schema={"type": "object"})
    assert compiler.compile(spec) is compiler.compile(same)
    a, b = compiler.matcher(spec), compiler.matcher(spec)
    assert a.advance(ord("{"))
    assert ord("{") in allowed_ids(b) and ord("{") not in allowed_ids(a)  # b did not move with a


# -- SmolLM2's real tokenizer -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    from ember.gguf.reader import GGUFFile
    from ember.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(GGUFFile(smollm2_gguf).metadata)


@pytest.fixture(scope="module")
def token_texts(smol_tok):
    return [smol_tok.decode([i], skip_special_tokens=False) for i in range(smol_tok.vocab_size)]


def _phone_prefix(s: str) -> bool:
    return re.fullmatch(r"[0-9]{0,3}|[0-9]{3}-[0-9]{0,4}", s) is not None


@pytest.mark.slow
def test_smollm2_regex_mask_allows_only_valid_prefixes(smol_tok, token_texts):
    m = make_matcher(smol_tok, StructuredOutput(regex=PHONE))
    path = smol_tok.encode("555-0123", add_special_tokens=False)
    text = ""
    for step, tok in enumerate(path + [None]):
        allowed = allowed_ids(m)
        stops = allowed & smol_tok.stop_token_ids
        assert stops == (smol_tok.stop_token_ids if step == len(path) else set())
        for t in allowed - stops:
            assert _phone_prefix(text + token_texts[t]), (text, token_texts[t])
        if _phone_prefix(text + "0") and len(text) != 3:  # where a digit may come, all ten may
            assert {smol_tok.token_to_id(str(d)) for d in range(10)} <= allowed
        if tok is None:
            break
        assert tok in allowed
        assert m.advance(tok)
        text += token_texts[tok]
    assert text == "555-0123" and m.is_finished()


@pytest.mark.slow
def test_smollm2_json_schema_mask(smol_tok, token_texts):
    m = make_matcher(smol_tok, StructuredOutput(json_schema=SCHEMA))
    doc = '{"name": "Ada", "age": 36, "color": "green", "tags": ["math"]}'
    ids = smol_tok.encode(doc, add_special_tokens=False)
    text = ""
    for tok in ids:
        allowed = allowed_ids(m)
        assert tok in allowed and not allowed & smol_tok.stop_token_ids
        if text.endswith('"color": "'):
            # inside the enum: only pieces of the three names (and their closing quote)
            for t in allowed:
                assert any(opt.startswith(token_texts[t]) for opt in ('red"', 'green"', 'blue"')), token_texts[t]
        if text.endswith('"age": '):
            for t in allowed:  # minimum 0: digits, never a sign
                assert re.fullmatch(r"[0-9]+|\s+", token_texts[t]), token_texts[t]
        assert m.advance(tok)
        text += token_texts[tok]
    assert text == doc and m.is_finished()
    assert allowed_ids(m) == smol_tok.stop_token_ids


# -- end to end on SmolLM2 ----------------------------------------------------------------------

def _chat(llm, q):
    return llm.tokenizer.encode_chat([{"role": "user", "content": q}])


def _assert_clean(engine):
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


PERSON = "Describe a fictional person as JSON: name, age, favourite color and a few tags."


@pytest.mark.slow
def test_json_schema_greedy_and_sampled_outputs_validate(smollm2_llm):
    jsonschema = pytest.importorskip("jsonschema")
    ids = _chat(smollm2_llm, PERSON)
    spec = StructuredOutput(json_schema=SCHEMA)
    greedy = SamplingParams(temperature=0.0, max_tokens=160, structured=spec)
    sampled = [SamplingParams(temperature=1.0, top_p=0.95, seed=s, n=2, max_tokens=160, structured=spec)
               for s in (1, 2)]
    outs = smollm2_llm.generate([ids] * 3, [greedy, *sampled])
    texts = [o for out in outs for o in out.outputs]
    assert len(texts) == 5
    for o in texts:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in texts}) > 1  # sampling did sample
    _assert_clean(smollm2_llm.engine)


@pytest.mark.slow
def test_json_object_regex_and_grammar(smollm2_llm):
    ids = _chat(smollm2_llm, "Describe a cat as a JSON object with name, age and color.")
    obj, phone, yesno = smollm2_llm.generate([ids, _chat(smollm2_llm, "What's your phone number?"),
                                              _chat(smollm2_llm, "Is the sky blue?")], [
        SamplingParams(temperature=0.0, max_tokens=120, structured=StructuredOutput(json_object=True)),
        SamplingParams(temperature=0.0, max_tokens=20, structured=StructuredOutput(regex=PHONE)),
        SamplingParams(temperature=0.0, max_tokens=20,
                       structured=StructuredOutput(grammar='start: answer "."\nanswer: "yes" | "no"')),
    ])
    assert obj.outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.outputs[0].text), dict)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", phone.outputs[0].text)
    assert yesno.outputs[0].text in ("yes.", "no.")
    # the grammar ended these requests, with or without the model's EOS at the end
    for out in (obj, phone, yesno):
        assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason is None


@pytest.mark.slow
def test_grammar_completion_wins_over_ignore_eos_and_min_tokens(smollm2_llm):
    ids = _chat(smollm2_llm, "Say abc.")
    a, b = smollm2_llm.generate([ids, ids], [
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, structured=StructuredOutput(regex=PHONE)),
        # an empty output would be complete, but min_tokens holds EOS back while more is possible
        SamplingParams(temperature=0.0, max_tokens=30, min_tokens=2, structured=StructuredOutput(regex="(abc)?")),
    ])
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", a.outputs[0].text) and a.outputs[0].finish_reason == "stop"
    assert b.outputs[0].text == "abc" and b.outputs[0].finish_reason == "stop"


@pytest.mark.slow
@pytest.mark.parametrize("spec, what", BAD_SPECS)
def test_invalid_spec_rejected_before_queueing(smollm2_llm, spec, what):
    engine = smollm2_llm.engine
    with pytest.raises(ValueError, match=what):
        engine.add_request([1, 2, 3], SamplingParams(n=2, structured=spec))
    with pytest.raises(ValueError, match=what):  # the offline API rolls back a partly added batch
        smollm2_llm.generate(["hi", "there"], [SamplingParams(), SamplingParams(structured=spec)])
    _assert_clean(engine)


@pytest.mark.slow
def test_unsupporting_runner_rejects_structured_requests(smollm2_llm, monkeypatch):
    monkeypatch.setattr(smollm2_llm.engine.runner, "supports_structured_output", False)
    with pytest.raises(ValueError, match="does not support structured output"):
        smollm2_llm.engine.add_request([1, 2, 3], SamplingParams(structured=StructuredOutput(regex="a")))
    _assert_clean(smollm2_llm.engine)


@pytest.mark.slow
def test_unstructured_rows_unchanged_by_a_structured_neighbour(smollm2_llm):
    plain = [_chat(smollm2_llm, q) for q in ("Why is the sky blue?", "Name three fruits.")]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in smollm2_llm.generate(plain, greedy)]
    structured = SamplingParams(temperature=0.0, max_tokens=24, structured=StructuredOutput(json_schema=SCHEMA))
    mixed = smollm2_llm.generate([plain[0], _chat(smollm2_llm, PERSON), plain[1]], [greedy, structured, greedy])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone


@pytest.mark.slow
def test_max_tokens_cuts_structured_output_with_length(smollm2_llm):
    out = smollm2_llm.generate([_chat(smollm2_llm, PERSON)], SamplingParams(
        temperature=0.0, max_tokens=6, structured=StructuredOutput(json_schema=SCHEMA)))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    assert out.text.startswith("{")
    with pytest.raises(json.JSONDecodeError):  # incomplete, as documented: a prefix, not a document
        json.loads(out.text)


@pytest.mark.slow
def test_failed_matcher_stops_its_request_not_the_engine(smollm2_llm):
    from ember.engine.llm_engine import STRUCTURED_OUTPUT_ERROR

    engine = smollm2_llm.engine

    class Broken:  # stands in for llguidance's matcher going wrong mid-request
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def consume_token(self, tok):
            raise RuntimeError("simulated llguidance failure")

    bad = engine.add_request(_chat(smollm2_llm, PERSON), SamplingParams(
        temperature=0.0, max_tokens=30, structured=StructuredOutput(json_object=True)))
    good = engine.add_request(_chat(smollm2_llm, "Hi"), SamplingParams(temperature=0.0, max_tokens=8))
    seq = engine.requests[bad].seqs[0]
    seq.matcher._m = Broken(seq.matcher._m)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    failed = final[bad].outputs[0]
    assert failed.finish_reason == "stop" and failed.stop_reason == STRUCTURED_OUTPUT_ERROR
    assert len(failed.token_ids) == 1
    assert final[good].outputs[0].finish_reason in ("stop", "length")
    _assert_clean(engine)


@pytest.mark.slow
def test_preempted_structured_requests_keep_their_output(smollm2_gguf, smollm2_llm):
    from ember.llm import LLM

    # 7 blocks of 16 tokens hold two prompts but not two prompts plus their outputs: the newest
    # is preempted mid-output and recomputed, and its matcher must not see its tokens twice.
    llm = LLM(str(smollm2_gguf), max_model_len=512, num_kv_blocks=7, enable_prefix_caching=False)
    prompts = [_chat(llm, f"Describe {q} as JSON.") for q in ("a cat", "a robot", "a wizard")]
    p = SamplingParams(temperature=0.0, max_tokens=24, structured=StructuredOutput(json_schema=SCHEMA))
    squeezed = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_clean(llm.engine)
    # the shared engine (same weights, room for all three) is the reference without preemption
    assert squeezed == [o.outputs[0].token_ids for o in smollm2_llm.generate(prompts, p)]
