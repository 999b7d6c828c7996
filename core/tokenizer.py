"""The tokenizer a GGUF file describes, built on the `tokenizers` library.

A GGUF carries no tokenizer.json: only llama.cpp's metadata (tokens, scores or merges, token types,
special ids and the name of a pre-tokenizer). We rebuild from those the tokenizer the model was
trained with. Where llama.cpp and transformers' GGUF loader disagree, we side with whichever
reproduces the model's original tokenizer; tests/test_tokenizer.py pins each such case.
"""
from __future__ import annotations

import functools
import logging
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from ember import chat_template as _chat

log = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in the chat formats we know. A file often names only one of them as EOS
# (an instruct model's EOS may be the pretraining one), and generation must stop on any.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<EOT>",
)

# Split regexes from the models' tokenizer.json files (llama.cpp hand-translates the same ones).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    + _CONTRACTION
    + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    + _CONTRACTION
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> the regex that splits text before byte-level BPE (None: GPT-2's own,
# built into ByteLevel).
_SPLIT_REGEX: dict[str, str | None] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), None),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), None),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O),
}
# StarCoder-style tokenizer.json files put every digit on its own before GPT-2's regex.
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# llama.cpp adds BOS for the llama3 family unless the file says otherwise.
_LLAMA3_FAMILY = {"llama-bpe", "llama3", "llama-v3", "falcon3"}
# Their tokenizer.json (and llama.cpp) take a pre-token that is itself in the vocabulary whole,
# before trying any merges.
_IGNORE_MERGES = _LLAMA3_FAMILY | {"tekken"}


class Tokenizer:
    """Text <-> token ids for one model, plus its special tokens and chat template."""

    def __init__(
        self,
        backend: _Backend,
        tokens: Sequence[str],
        special_ids: Iterable[int],
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        extra_stop_ids: Iterable[int] = (),
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self._tokens = list(tokens)
        self._special = frozenset(special_ids)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        stops = {eos_token_id, *extra_stop_ids}
        stops.update(i for i, t in enumerate(self._tokens) if t in END_OF_TURN_TOKENS
                     and i in self._special)
        stops.discard(None)
        self.stop_token_ids: frozenset[int] = frozenset(stops)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer from a GGUF file's metadata (a plain key -> value mapping)."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens = _string_list(metadata, "tokenizer.ggml.tokens")
        n = len(tokens)
        types = metadata.get("tokenizer.ggml.token_type")
        types = [NORMAL] * n if types is None else _int_list(types, n, "tokenizer.ggml.token_type")

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if not _is_int(value) or not 0 <= value < n:
                raise ValueError(f"tokenizer.ggml.{key} = {value!r} is not a token id below {n}")
            return int(value)

        ids = {key: token_id(key) for key in (
            "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
            "eot_token_id", "eom_token_id")}
        # A file may type its own special ids as normal; they are special all the same.
        special = {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
        special.update(i for i in ids.values() if i is not None)
        user_defined = {i for i, t in enumerate(types) if t == USER_DEFINED} - special

        pre = metadata.get("tokenizer.ggml.pre") or "default"
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, special | user_defined, metadata, pre)
            add_bos_default = pre in _LLAMA3_FAMILY
        elif kind == "llama":
            scores = metadata.get("tokenizer.ggml.scores")
            if scores is None:
                raise ValueError("a 'llama' (SentencePiece) tokenizer needs tokenizer.ggml.scores")
            scores = _float_list(scores, n, "tokenizer.ggml.scores")
            add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            unk = ids["unknown_token_id"]
            backend = _sentencepiece_bpe(tokens, scores, types, add_prefix,
                                         None if unk is None else tokens[unk])
            add_bos_default = True
        else:
            raise ValueError(
                f"unsupported tokenizer.ggml.model {kind!r}: ember builds 'gpt2' (byte-level BPE) "
                "and 'llama' (SentencePiece BPE) tokenizers"
            )

        backend.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
        # User-defined pieces are ordinary text that must never be split, as in llama.cpp.
        backend.add_tokens(
            [AddedToken(tokens[i], special=False, normalized=False) for i in sorted(user_defined)])
        _check_ids(backend, tokens, special | user_defined)

        template = metadata.get("tokenizer.chat_template")
        return cls(
            backend, tokens, special,
            bos_token_id=ids["bos_token_id"],
            eos_token_id=ids["eos_token_id"],
            pad_token_id=ids["padding_token_id"],
            unk_token_id=ids["unknown_token_id"],
            extra_stop_ids=[i for i in (ids["eot_token_id"], ids["eom_token_id"]) if i is not None],
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=template if isinstance(template, str) and template.strip() else None,
        )

    @classmethod
    def from_hf_directory(cls, directory: str | os.PathLike,
                          extra_stop_ids: Iterable[int] = ()) -> Tokenizer:
        """Build the tokenizer of a Hugging Face model directory: tokenizer.json (through the
        `tokenizers` library, as transformers' fast tokenizers are) and tokenizer_config.json
        (special tokens, BOS/EOS, chat template; or chat_template.jinja beside it).
        extra_stop_ids: more ids that end generation (generation_config.json's EOS list)."""
        from ember.hf.safetensors import CheckpointError

        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{d}: no tokenizer.json (ember reads the `tokenizers` library's "
                                  f"format; a tokenizer.model alone is not enough)")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:  # the library raises plain Exceptions for malformed files
            raise CheckpointError(f"{path}: not a tokenizer the `tokenizers` library can read: {e}") from None
        config = _read_tokenizer_config(d)
        vocab = backend.get_vocab(with_added_tokens=True)
        if not vocab:
            raise CheckpointError(f"{path}: the vocabulary is empty")
        tokens = [""] * (max(vocab.values()) + 1)
        for piece, i in vocab.items():
            tokens[i] = piece
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

        def named(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):  # an AddedToken as transformers serialises it
                value = value.get("content")
            if value is None:
                return None
            if not isinstance(value, str) or backend.token_to_id(value) is None:
                raise CheckpointError(f"{d / 'tokenizer_config.json'}: {key} {value!r} is not a token "
                                      f"of tokenizer.json")
            return backend.token_to_id(value)

        bos, eos = named("bos_token"), named("eos_token")
        # Whether tokenizer.json's post-processor puts BOS/EOS around a text, unless the config says.
        probe_plain = backend.encode("a", add_special_tokens=False).ids
        probe = backend.encode("a", add_special_tokens=True).ids
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos is not None and len(probe) > len(probe_plain) and probe[0] == bos
        add_eos = config.get("add_eos_token")
        if not isinstance(add_eos, bool):
            add_eos = eos is not None and len(probe) > len(probe_plain) and probe[-1] == eos
        return cls(
            backend, tokens, special | {i for i in (bos, eos) if i is not None},
            bos_token_id=bos, eos_token_id=eos, pad_token_id=named("pad_token"),
            unk_token_id=named("unk_token"), extra_stop_ids=extra_stop_ids,
            add_bos=add_bos, add_eos=add_eos, chat_template=_chat_template_of(d, config),
        )

    # -- vocabulary -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._tokens[i] for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def to_json(self) -> str:
        """The `tokenizers` library's JSON for this tokenizer (what grammar engines read)."""
        return self._backend.to_str()

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (a byte-level piece may be part of a character).
        Special tokens give their literal text; ids past the vocabulary give b""."""
        if not 0 <= token_id < len(self._tokens):
            return b""
        piece = self._tokens[token_id]
        if token_id in self._special:
            return piece.encode()
        if isinstance(self._backend.decoder, decoders.ByteLevel):
            unbyte = _byte_alphabet_inverse()
            try:
                return bytes(unbyte[c] for c in piece)
            except KeyError:  # an added token, kept as literal text
                return piece.encode()
        if m := _BYTE_TOKEN.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self._tokens[self.bos_token_id]

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self._tokens[self.eos_token_id]

    # -- text -----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. Special tokens written in the text are always recognised; the flag
        only controls the BOS/EOS the file asks to add around it."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return _chat.render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """The prompt for a conversation. Templates that want a BOS usually write it themselves, so
        one is added only when the file asks for it and the rendered text lacks it; never an EOS,
        since generation continues the prompt."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        ids = self.encode(text, add_special_tokens=False)
        bos = self.bos_token_id
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, add_bos={self.add_bos})")


# -- builders -----------------------------------------------------------------------------------


def _read_tokenizer_config(d: Path) -> dict:
    from ember.hf.config import read_json

    path = d / "tokenizer_config.json"
    return read_json(path, "tokenizer config") if path.is_file() else {}


def _chat_template_of(d: Path, config: Mapping[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template (a string, or a list of named ones: the default),
    else chat_template.jinja beside it (where transformers 4.43 and later save it)."""
    from ember.hf.safetensors import CheckpointError

    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (d / "chat_template.jinja").is_file():
        try:
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{d / 'chat_template.jinja'}: cannot read: {e}") from None
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{d / 'tokenizer_config.json'}: chat_template must be a string")
    return template if template and template.strip() else None


def _byte_level_bpe(tokens: list[str], added: set[int], metadata: Mapping[str, Any],
                    pre: str) -> _Backend:
    """GPT-2-style BPE over bytes spelled as printable characters."""
    merges = _parse_merges(metadata.get("tokenizer.ggml.merges"))
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        # Added tokens keep their literal text, which is what gets matched in the input. Any other
        # token outside the byte alphabet was written raw by its converter; BPE needs its bytes.
        if i not in added and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    if len(vocab) < len(tokens):
        log.warning("%d duplicate tokens in the vocabulary; the first of each is used",
                    len(tokens) - len(vocab))

    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    except Exception as exc:  # tokenizers reports a merge of unknown tokens as a bare Exception
        raise ValueError(
            f"tokenizer.ggml.merges does not fit tokenizer.ggml.tokens: {exc}") from exc
    backend = _Backend(model)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in _SPLIT_REGEX:
        log.warning("unknown tokenizer.ggml.pre %r: splitting text with GPT-2's regex", pre)
    regex = _SPLIT_REGEX.get(pre)
    if regex is None:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre in _DIGITS_FIRST:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    else:
        steps = [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return pre_tokenizers.Sequence(steps)


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int],
                       add_space_prefix: bool, unk_token: str | None) -> _Backend:
    """SentencePiece BPE: spaces become ▁, unknown characters fall back to <0xNN> byte tokens.

    The ▁ prefix is a normalizer rather than a Metaspace pre-tokenizer, because Metaspace skips it
    when the text already starts with a space ("  hi" would lose one). As a normalizer it also
    applies after every special token, as in llama.cpp and Meta's Llama reference code.
    """
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    model = models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores, types, vocab),
                       unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    backend = _Backend(model)
    steps = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode_steps)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int],
                        vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule: of all adjacent pairs, join the one whose
    result scores highest. Only normal pieces are ever produced by merging."""
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL or vocab.get(piece) != i:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_alphabet_inverse() -> dict[str, int]:
    return {c: b for b, c in _byte_alphabet().items()}


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> character map: printable bytes stand for themselves, the rest
    are moved past U+0100 so that no token contains whitespace or control characters."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {b: chr(b) for b in keep}
    moved = (b for b in range(256) if b not in alphabet)
    alphabet.update((b, chr(0x100 + k)) for k, b in enumerate(moved))
    return alphabet


# -- metadata validation ------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _sequence(value: Any, key: str, what: str) -> list:
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
        raise ValueError(f"{key} must be a list of {what}")
    return list(value)


def _string_list(metadata: Mapping[str, Any], key: str) -> list[str]:
    value = metadata.get(key)
    if value is None:
        raise ValueError(f"{key} is missing: the file has no vocabulary")
    value = _sequence(value, key, "strings")
    if not value:
        raise ValueError(f"{key} is empty: the file has no vocabulary")
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings")
    return value


def _int_list(value: Any, n: int, key: str) -> list[int]:
    value = _sequence(value, key, "integers")
    if len(value) != n or not all(_is_int(v) for v in value):
        raise ValueError(f"{key} must be a list of {n} integers, one per token")
    return [int(v) for v in value]


def _float_list(value: Any, n: int, key: str) -> list[float]:
    value = _sequence(value, key, "numbers")
    if len(value) != n or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                  for v in value):
        raise ValueError(f"{key} must be a list of {n} numbers, one per token")
    return [float(v) for v in value]


def _parse_merges(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("a 'gpt2' (byte-level BPE) tokenizer needs tokenizer.ggml.merges")
    merges = []
    for k, merge in enumerate(value):
        parts = merge.split(" ") if isinstance(merge, str) else None
        if parts is None or len(parts) != 2 or not all(parts):
            raise ValueError(f"tokenizer.ggml.merges[{k}] = {merge!r}: expected two tokens "
                             "separated by one space")
        merges.append((parts[0], parts[1]))
    return merges


def _check_ids(backend: _Backend, tokens: list[str], ids: Iterable[int]) -> None:
    for i in ids:
        got = backend.token_to_id(tokens[i])
        if got != i:
            log.warning("special token %r appears twice in the vocabulary (ids %s and %d); its "
                        "text encodes to %s", tokens[i], got, i, got)
