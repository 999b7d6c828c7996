"""ember's tokenizer against independent references: transformers loading the same GGUF file, and
sentencepiece itself for a SentencePiece vocabulary we train and write as a GGUF here."""
from __future__ import annotations

import functools
import io
import json
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from ember.tokenizer import Tokenizer

SMOLLM2_ENV = "EMBER_SMOLLM2_GGUF"

# -- helpers shared with the other tokenizer tests ---------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: str | Path) -> dict:
    """A GGUF file's metadata as a plain dict (gguf.GGUFReader takes ~5 s on SmolLM2)."""
    with open(path, "rb") as f:
        def scalar(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def value(kind):
            if kind == 8:
                return f.read(scalar("<Q")).decode("utf-8")
            if kind == 9:
                item, count = scalar("<I"), scalar("<Q")
                if item in _SCALAR:
                    raw = f.read(count * struct.calcsize(_SCALAR[item]))
                    return np.frombuffer(raw, _SCALAR[item]).tolist()
                return [value(item) for _ in range(count)]
            return scalar(_SCALAR[kind])

        assert f.read(4) == b"GGUF"
        scalar("<I"), scalar("<Q")  # version, tensor count
        return {f.read(scalar("<Q")).decode("utf-8"): value(scalar("<I"))
                for _ in range(scalar("<Q"))}


def smollm2_path() -> Path:
    path = os.environ.get(SMOLLM2_ENV)
    if not path:
        pytest.skip(f"{SMOLLM2_ENV} is not set (path to SmolLM2-135M-Instruct.Q4_1.gguf)")
    return Path(path)


@functools.cache
def smollm2_metadata() -> dict:
    return read_gguf_metadata(smollm2_path())


@functools.cache
def smollm2_reference():
    """transformers' tokenizer for the same file, loaded once for every test module."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I'm fine, thanks.",
    "Numbers like 12345 and 3.14159 appear here, in 2024.",
    "Café naïve résumé über straße, señor.",
    "def foo(x):\n    return x * 2\n",
    "日本語のテキスト 你好世界",
    "emoji 😀🎉 fun",
]


@functools.cache
def spm_model_bytes() -> bytes:
    """A small SentencePiece BPE model with byte fallback, shaped like Llama's (no normalization,
    dummy prefix, digits split)."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 40), model_writer=model, vocab_size=700,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        user_defined_symbols=["<|user|>"], character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    return model.getvalue()


def sentencepiece_processor():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_proto=spm_model_bytes())


def spm_metadata(**overrides) -> dict:
    """GGUF metadata for the trained model, as llama.cpp's converter writes it."""
    sp = sentencepiece_processor()
    n = sp.get_piece_size()

    def token_type(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if sp.id_to_piece(i) == "<|user|>" else 1

    metadata = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    metadata.update(overrides)
    return {k: v for k, v in metadata.items() if v is not None}


def write_gguf(path: Path, metadata: dict) -> Path:
    """Metadata only: transformers needs no tensors to build a tokenizer."""
    writer = gguf.GGUFWriter(str(path), metadata["general.architecture"])
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in metadata:
        writer.add_tokenizer_pre(metadata["tokenizer.ggml.pre"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in metadata:
        writer.add_token_scores(metadata["tokenizer.ggml.scores"])
    if "tokenizer.ggml.merges" in metadata:
        writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_reference(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# -- SmolLM2: byte-level BPE, pre-tokenizer "smollm" --------------------------------------------

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "12345 3.14159",
    "1,000,000.00 and -42 and 0x1F",
    "  lots   of    spaces  ",
    " leading space",
    "trailing space ",
    "line1\nline2\n\nline4\n",
    "\ttab\t\tdouble tab",
    "a\r\nwindows\r\n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": "value", "list": [1, 2, 3]}',
    "I'm sure they'll say it's fine; we've done THAT'S",
    "emoji 😀🎉👍🏽 end",
    "🧑‍🚀 astronaut, 🇫🇷 flag",
    "中文测试，日本語のテキスト、한국어",
    "Café naïve résumé über straße señor",
    "ÀÉÎÕÜ ß ﬁ Ωμέγα Привет мир",
    "\u00a0non-breaking\u2009thin space\u200bzero width",
    "math: ∑ x² ≤ ∞, α→β",
    "<|im_start|>user\nhi<|im_end|>\n",
    "text<|im_end|>more text",
    "<|endoftext|><repo_name>ember<file_sep>main.py",
    "<|im_start|>not closed <|im_",
    "x" * 200,
    "!!!??? ... ---",
    "http://example.com/path?query=1&b=2#frag",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_metadata())


@pytest.fixture(scope="module")
def smol_ref():
    return smollm2_reference()


@pytest.mark.slow
def test_smollm2_special_tokens(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == (1, 2, 2)
    assert smol.bos_token == "<|im_start|>" and smol.eos_token == "<|im_end|>"
    assert smol.stop_token_ids == {2, 0}  # <|im_end|> and <|endoftext|>
    assert not smol.add_bos and not smol.add_eos
    assert smol.is_special(1) and not smol.is_special(smol.encode("Hello")[0])
    assert smol.id_to_token(1) == "<|im_start|>"
    assert smol.convert_ids_to_tokens(smol.encode(" hello world")) == ["Ġhello", "Ġworld"]
    assert smol.encode("<|im_start|>") == [1]
    assert smol.chat_template and "<|im_start|>" in smol.chat_template


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_matches_transformers(smol, smol_ref, text):
    ids = smol.encode(text)
    assert ids == smol_ref.encode(text)
    bare = smol_ref.encode(text, add_special_tokens=False)
    assert smol.encode(text, add_special_tokens=False) == bare
    assert smol.convert_ids_to_tokens(ids) == smol_ref.convert_ids_to_tokens(ids)
    assert smol.decode(ids, skip_special_tokens=False) == text
    assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_digits_are_single_tokens(smol):
    # "smollm" isolates every digit, as llama.cpp and the model's tokenizer.json do.
    assert smol.convert_ids_to_tokens(smol.encode("x 2024")) == ["x", "Ġ", "2", "0", "2", "4"]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Why? 🤔"}],
    [{"role": "user", "content": "Écris du code:\n```py\nprint('日本')\n```"}],
]


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_chat_encoding_matches_transformers(smol, smol_ref, messages):
    text = smol_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smol.apply_chat_template(messages) == text
    assert smol.encode_chat(messages) == smol_ref.encode(text, add_special_tokens=False)
    assert smol.encode_chat(messages)[0] == smol.bos_token_id  # written by the template, once


# -- byte-level pre-tokenizers on a small trained vocabulary ------------------------------------

BYTE_LEVEL_CORPUS = [
    "The year 2024 had 12345 items and 3.14159 pies; I'm sure they'll say it's fine.",
    "Numbers 100 200 300 1000 999 12 34 56", "def f(x):\n    return x + 1\n\n",
    "中文测试 日本語 한국어", "HELLO World CamelCaseWords don't", "  spaces   and\ttabs\r\n",
]
PRE_TOKENIZER_TEXTS = [
    "The year 2024 had 12345 items", "I'm sure THEY'LL say", "x  \n\n  y\r\n", "中文测试 日本語",
    "CamelCaseWords don't", "a 3.14159 b", " 1 22 333 4444", "<|im_end|>hello", "tabs\tand  spaces ",
]


@functools.cache
def byte_level_metadata(pre: str) -> dict:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_end|>"], show_progress=False)
    backend.train_from_iterator(BYTE_LEVEL_CORPUS * 30, trainer)
    model = json.loads(backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t.startswith("<|") else 1 for t in tokens],
        "tokenizer.ggml.merges": [" ".join(m) for m in model["merges"]],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["gpt-2", "default", "llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, pre):
    metadata = byte_level_metadata(pre)
    ours = Tokenizer.from_gguf_metadata(metadata)
    ref = load_reference(write_gguf(tmp_path / "bl.gguf", metadata))
    for text in PRE_TOKENIZER_TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_pre_tokenizer_splits_differ_where_they_should():
    def pieces(pre, text):
        tok = Tokenizer.from_gguf_metadata(byte_level_metadata(pre))
        return tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))

    # GPT-2 keeps a number whole; llama3 cuts it in threes ("202" "4"); qwen2 and smollm take
    # digits one at a time.
    assert pieces("gpt-2", " 12345") == ["Ġ12345"]
    assert pieces("smollm", " 12345") == ["Ġ", "1", "2", "3", "4", "5"]
    assert pieces("qwen2", " x2024") == ["Ġx", "2", "0", "2", "4"]
    assert pieces("llama-bpe", " x2024") == ["Ġx", "2", "02", "4"]
    # the llama3 family adds BOS unless the file says otherwise; GPT-2 style vocabularies don't.
    assert Tokenizer.from_gguf_metadata(byte_level_metadata("llama-bpe")).add_bos
    assert not Tokenizer.from_gguf_metadata(byte_level_metadata("gpt-2")).add_bos


def test_unknown_pre_tokenizer_falls_back_to_gpt2(caplog):
    metadata = dict(byte_level_metadata("gpt-2"), **{"tokenizer.ggml.pre": "brand-new"})
    tok = Tokenizer.from_gguf_metadata(metadata)
    assert "brand-new" in caplog.text
    gpt2 = Tokenizer.from_gguf_metadata(byte_level_metadata("gpt-2"))
    assert tok.encode("The year 2024") == gpt2.encode("The year 2024")


def test_byte_level_tokens_outside_the_alphabet():
    # Converters sometimes write special tokens raw (DeepSeek's "<｜end▁of▁sentence｜>"):
    # they must keep their id and be matched literally, not respelled into a new token.
    metadata = dict(byte_level_metadata("gpt-2"))
    tokens = list(metadata["tokenizer.ggml.tokens"]) + ["<｜end▁of▁sentence｜>"]
    metadata.update({"tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.token_type": metadata["tokenizer.ggml.token_type"] + [3],
                     "tokenizer.ggml.eot_token_id": len(tokens) - 1})
    tok = Tokenizer.from_gguf_metadata(metadata)
    end = len(tokens) - 1
    assert tok.encode("hi<｜end▁of▁sentence｜>") == tok.encode("hi") + [end]
    assert tok.decode([end], skip_special_tokens=False) == "<｜end▁of▁sentence｜>"
    assert end in tok.stop_token_ids and tok.vocab_size == len(tokens)


# -- SentencePiece ("llama") --------------------------------------------------------------------

SPM_TEXTS = [
    "The quick brown fox", "Hello world! How are you today?", "x 12345 3.14",
    "Café ü 日本 😀 zzz Ω", "\n\ttab", "def foo(x):\n    return x * 2\n", "über straße naïve",
    "  hi  there", " lead", "trail ", "   ", "ĳ ǅ ﬀ", "",
]


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(spm_metadata())


@pytest.fixture(scope="module")
def spm_ref(tmp_path_factory):
    return load_reference(write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", spm_metadata()))


def test_spm_vocabulary(spm):
    sp = sentencepiece_processor()
    assert spm.vocab_size == sp.get_piece_size()
    assert spm.add_bos and not spm.add_eos  # llama.cpp's default for a SentencePiece vocabulary
    assert (spm.bos_token, spm.eos_token) == ("<s>", "</s>")
    assert spm.stop_token_ids == {sp.eos_id()}
    assert spm.is_special(sp.unk_id()) and spm.is_special(sp.bos_id())
    assert spm.id_to_token(sp.piece_to_id("<0x41>")) == "<0x41>"
    assert spm.encode("<s>") == [sp.bos_id(), sp.bos_id()]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_matches_sentencepiece(spm, text):
    sp = sentencepiece_processor()
    ids = spm.encode(text)
    assert ids == [sp.bos_id()] + sp.encode(text)
    assert spm.decode(ids) == sp.decode(ids) == text


def test_spm_byte_fallback(spm):
    # characters the vocabulary lacks become their UTF-8 bytes
    ids = spm.encode("🦀", add_special_tokens=False)
    assert spm.convert_ids_to_tokens(ids) == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    assert spm.decode(ids) == "🦀"


@pytest.mark.slow
@pytest.mark.parametrize("text", [t for t in SPM_TEXTS if not t.startswith(" ")])
def test_spm_matches_transformers(spm, spm_ref, text):
    ids = spm.encode(text)
    assert ids == spm_ref.encode(text)
    assert spm.decode(ids) == spm_ref.decode(ids, skip_special_tokens=True)


def test_spm_where_transformers_differs(spm):
    """Two deliberate differences from transformers' GGUF loader (5.x), both following
    sentencepiece and llama.cpp: (1) text that starts with spaces keeps all of them
    (transformers' Metaspace skips the dummy prefix there and loses a space: "  hi" -> " hi");
    (2) text right after a special token gets the ▁ prefix, which is what Meta's Llama code
    produces by encoding each segment with sentencepiece (transformers adds none)."""
    sp = sentencepiece_processor()
    assert spm.encode("  hi") == [sp.bos_id()] + sp.encode("  hi")
    assert spm.decode(spm.encode("  hi")) == "  hi"
    assert spm.encode("</s>next", add_special_tokens=False) == [sp.eos_id()] + sp.encode("next")
    assert spm.encode("<s>[INST]") == [sp.bos_id()] + spm.encode("[INST]")


def test_spm_user_defined_token_is_never_split(spm):
    user = spm.token_to_id("<|user|>")
    ids = spm.encode("x<|user|>y", add_special_tokens=False)
    assert user in ids and not spm.is_special(user)
    assert spm.decode(ids) == "x<|user|> y"  # user-defined text is kept; "y" got its ▁
    assert spm.decode([user, *spm.encode("a", add_special_tokens=False)]) == "<|user|> a"


def test_spm_without_space_prefix():
    tok = Tokenizer.from_gguf_metadata(spm_metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert not tok.id_to_token(ids[0]).startswith("▁")
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(tok.encode(" Hello")) == " Hello"


def test_add_bos_and_eos_flags():
    tok = Tokenizer.from_gguf_metadata(spm_metadata(**{
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True}))
    ids = tok.encode("Hello")
    assert ids[0] != tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.encode("Hello", add_special_tokens=False) == ids[:-1]


def test_encode_chat_adds_bos_once():
    template_with_bos = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    template_without = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    messages = [{"role": "user", "content": "Hello"}]
    for template in (template_with_bos, template_without):
        tok = Tokenizer.from_gguf_metadata(spm_metadata(**{"tokenizer.chat_template": template}))
        ids = tok.encode_chat(messages)
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert tok.eos_token_id not in ids
        assert tok.decode(ids) == "[user] Hello\n"


def test_extra_stop_tokens():
    sp = sentencepiece_processor()
    user = sp.piece_to_id("<|user|>")
    tok = Tokenizer.from_gguf_metadata(spm_metadata(**{"tokenizer.ggml.eom_token_id": user}))
    assert tok.stop_token_ids == {sp.eos_id(), user}
    assert tok.is_special(user)  # a stop token is never text


# -- malformed metadata -------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": [1, 2, 3]}, "strings"),
    ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer.ggml.model 'bert'"),
    ({"tokenizer.ggml.model": None}, "unsupported tokenizer.ggml.model None"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "token_type"),
    ({"tokenizer.ggml.scores": None}, "scores"),
    ({"tokenizer.ggml.scores": [0.0]}, "scores"),
    ({"tokenizer.ggml.bos_token_id": 10**6}, "bos_token_id"),
    ({"tokenizer.ggml.eos_token_id": "2"}, "eos_token_id"),
])
def test_malformed_spm_metadata(change, message):
    metadata = dict(spm_metadata(), **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Tokenizer.from_gguf_metadata(metadata)


@pytest.mark.parametrize("merges, message", [
    (None, "needs tokenizer.ggml.merges"),
    (["Ġ t", "a b c"], r"merges\[1\]"),
    (["Ġt"], r"merges\[0\]"),
    ([("Ġ", "t")], r"merges\[0\]"),
    (["Ġ  t"], r"merges\[0\]"),
    (["nothere atall"], "does not fit"),
])
def test_malformed_merges(merges, message):
    metadata = dict(byte_level_metadata("gpt-2"), **{"tokenizer.ggml.merges": merges})
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_gguf_metadata(metadata)
