"""Streaming detokenization: whole characters only, the same text as a full decode, and a cost
per token that does not grow with the output."""
from __future__ import annotations

import pytest

from ember.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from ember.tokenizer import Tokenizer
from test_tokenizer import byte_level_metadata, smollm2_metadata, spm_metadata

HEAVY = ("Emoji 😀🎉👍🏽🧑‍🚀🇫🇷 and 中文测试，日本語のテキスト、한국어 ✓ ∑ x² … done 🦀\n"
         "Ωμέγα Привет мир — naïve café\t🤖🫠")


class CountingDecoder:
    """Wraps a tokenizer to record how much each decode call is asked to do."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls = 0
        self.tokens_decoded = 0
        self.longest = 0

    def decode(self, ids, skip_special_tokens=True):
        ids = list(ids)
        self.calls += 1
        self.tokens_decoded += len(ids)
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id):
        return self.tokenizer.is_special(token_id)


@pytest.fixture(scope="module", params=["sentencepiece", "byte-level", "smollm2"])
def tok(request) -> Tokenizer:
    if request.param == "sentencepiece":
        return Tokenizer.from_gguf_metadata(spm_metadata())
    if request.param == "byte-level":
        return Tokenizer.from_gguf_metadata(byte_level_metadata("gpt-2"))
    return Tokenizer.from_gguf_metadata(smollm2_metadata())


def stream(tokenizer, ids, prompt=(), skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas = [detok.step(i) for i in ids]
    deltas.append(detok.flush())
    return detok, deltas


def test_stream_never_splits_a_character(tok):
    ids = tok.encode(HEAVY, add_special_tokens=False)
    detok, deltas = stream(tok, ids, prompt=tok.encode("Say something:"))
    assert "".join(deltas) == tok.decode(ids) == HEAVY == detok.output_text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1]  # some characters did span several tokens and were held back
    text = ""
    for delta in deltas:
        text += delta
        assert HEAVY.startswith(text)


def test_each_prefix_of_the_output(tok):
    # Stopping after any token: the stream plus flush() is what decode() gives for that prefix,
    # and everything before flush() is free of half characters.
    text = "a😀b中c🇫🇷"
    ids = tok.encode(text, add_special_tokens=False)
    for n in range(len(ids) + 1):
        detok, deltas = stream(tok, ids[:n])
        assert "\ufffd" not in "".join(deltas[:-1])
        assert text.startswith("".join(deltas[:-1]))
        full = tok.decode(ids[:n])
        if not full.endswith("\ufffd"):
            assert "".join(deltas) == full
        else:  # cut inside a character: flush() hands over the unfinished bytes as U+FFFD
            assert deltas[-1].endswith("\ufffd")


def test_special_tokens(tok):
    eos = tok.eos_token_id
    ids = [*tok.encode("Hello world", add_special_tokens=False), eos,
           *tok.encode(" again and", add_special_tokens=False), eos, eos,
           *tok.encode(" 中文", add_special_tokens=False)]
    for skip in (True, False):
        _, deltas = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert tok.eos_token not in "".join(stream(tok, ids)[1])
    assert tok.eos_token in "".join(stream(tok, ids, skip_special_tokens=False)[1])


def test_first_word_is_decoded_as_in_a_full_decode(tok):
    prompt = tok.encode("Question: hi\nAnswer:")
    ids = tok.encode(" Sure", add_special_tokens=False)
    detok, deltas = stream(tok, ids, prompt=prompt)
    assert detok.output_text == tok.decode(ids)
    assert detok.num_prompt_tokens == len(prompt)


def test_nothing_generated(tok):
    detok = IncrementalDetokenizer(tok, [1, 2, 3])
    assert detok.flush() == "" and detok.output_text == ""


def test_cost_per_token_is_bounded(tok):
    ids = tok.encode((HEAVY + " and some plain English words, 12345.\n") * 40,
                     add_special_tokens=False)
    assert len(ids) > 2000
    counter = CountingDecoder(tok)
    _, deltas = stream(counter, ids)
    assert "".join(deltas) == tok.decode(ids)
    # two decodes of a short window per token, however long the output gets
    assert counter.calls <= 2 * len(ids) + 2
    assert counter.longest <= 2 * (MAX_PENDING_TOKENS + 1)
    assert counter.tokens_decoded <= 12 * len(ids)


def test_invalid_bytes_do_not_grow_the_window():
    # A model can emit bytes that never form a character; the held-back window must not grow
    # with them, and the text around them still comes out whole.
    tok = Tokenizer.from_gguf_metadata(byte_level_metadata("gpt-2"))
    continuation = tok.token_to_id("\u0122")  # the byte-level spelling of 0x80
    assert tok.decode([continuation]) == "\ufffd"
    ids = [*tok.encode("ok ", add_special_tokens=False), *[continuation] * 50,
           *tok.encode("😀 fine", add_special_tokens=False)]
    counter = CountingDecoder(tok)
    _, deltas = stream(counter, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert "".join(deltas).endswith("\ufffd😀 fine")
    assert counter.longest <= 2 * (MAX_PENDING_TOKENS + 1)


def test_sentencepiece_invalid_bytes_are_bounded_too():
    tok = Tokenizer.from_gguf_metadata(spm_metadata())
    garbage = tok.token_to_id("<0x80>")
    ids = [*tok.encode("ok", add_special_tokens=False), *[garbage] * 50,
           *tok.encode(" fine", add_special_tokens=False)]
    counter = CountingDecoder(tok)
    _, deltas = stream(counter, ids)
    assert counter.longest <= 2 * (MAX_PENDING_TOKENS + 1)
    text = "".join(deltas)
    assert text.startswith("ok\ufffd") and text.endswith(" fine")
    assert text.count("\ufffd") == 50
