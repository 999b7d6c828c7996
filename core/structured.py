"""Structured output: a grammar (JSON, JSON Schema, regex, Lark) turned into a per-step token mask.

The grammar engine is llguidance (as in vLLM's "guidance" backend and llama.cpp): it walks the
tokenizer's trie against an Earley parser, so a mask costs tens of microseconds rather than a pass
over the vocabulary in Python. ember's part is small:

- one ``LLTokenizer`` per ember ``Tokenizer`` (building it reads the whole vocabulary, ~0.3 s);
- a cache of compiled grammars, so n samples or repeated requests with one schema pay once: a
  compiled matcher in its start state is kept and each sequence gets a ``deep_copy`` of it;
- :class:`StructuredMatcher`, one per sequence, which the runner asks for a mask and the engine
  advances with each token it appends.

Errors in a spec are found when the request is added (``compile`` raises ValueError with
llguidance's message); nothing about a bad spec can surface later inside the engine loop.

What the mask guarantees is a valid prefix. A request ends with finish_reason "stop" once its
output is complete (only EOS could follow), but max_tokens or the context length can cut it first:
then finish_reason is "length" and the text may be incomplete (unterminated JSON, say).
Semantics worth knowing: JSON properties are generated in the schema's order; whitespace between
JSON tokens is bounded (JSON_WHITESPACE); ``\\d`` in a regex means [0-9].
"""
from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from ember.sampling_params import StructuredOutput

if TYPE_CHECKING:
    from ember.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class InvalidStructuredOutput(ValueError):
    """A schema, regex or grammar that cannot be compiled. A ValueError, so the API layers that
    turn ValueError into a client error (HTTP 400) need no special case."""


# Whitespace between JSON tokens: bounded per gap. llguidance's default is unbounded
# ([ \t\n\r]+), and a small model under a schema can fall into emitting newlines forever instead
# of the next key. Sixteen characters still admits pretty-printed output a few levels deep.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"
_JSON_DEFAULTS = {"whitespace_pattern": JSON_WHITESPACE}

_ANY_OBJECT = {"type": "object"}


def spec_key(spec: StructuredOutput) -> tuple[str, str]:
    """A hashable identity for the grammar a spec asks for; schemas that differ only in spacing
    share one compiled grammar. Key order is kept: it is the order the properties are generated in."""
    if spec.json_object:
        return ("json_schema", json.dumps(_ANY_OBJECT))
    if spec.json_schema is not None:
        schema = spec.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InvalidStructuredOutput(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidStructuredOutput(
                f"json_schema must be a JSON object (or true/false), got {type(schema).__name__}")
        try:
            return ("json_schema", json.dumps(schema))
        except (TypeError, ValueError) as e:
            raise InvalidStructuredOutput(f"json_schema is not JSON-serialisable: {e}") from None
    if spec.regex is not None:
        return ("regex", spec.regex)
    return ("lark", spec.grammar)


def _grammar_text(key: tuple[str, str]) -> str:
    import llguidance as llg

    kind, text = key
    if kind == "json_schema":
        # Defaults, not overrides: a schema's own "x-guidance" options still win.
        try:
            return llg.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_DEFAULTS)
        except ValueError as e:
            raise InvalidStructuredOutput(f"invalid json_schema: {e}") from None
    if kind == "regex":
        # \d as [0-9] (as in JSON Schema's "pattern" and xgrammar): the Rust default takes every
        # Unicode digit, and a model asked for a phone number should not be offered U+1FBF8.
        return llg.LLMatcher.grammar_from_lark(f"start: /{llg.regex_to_lark(text, 'd')}/")
    return llg.LLMatcher.grammar_from_lark(text)


_WHAT = {"json_schema": "json_schema", "regex": "regex", "lark": "grammar"}


class GrammarCompiler:
    """Compiles specs against one tokenizer and hands out matchers. Thread-safe: the server may
    validate on its own threads while the engine loop compiles on another."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 64) -> None:
        import llguidance as llg

        # Not the tokenizer itself: compiler_for keys a weak dictionary by it, and a strong
        # reference from the value would keep it alive forever.
        self.vocab_size = tokenizer.vocab_size
        self.stop_ids = sorted(tokenizer.stop_token_ids)
        try:
            # The tokenizers JSON carries the byte-level/SentencePiece details llguidance needs to
            # know each token's bytes; every stop token counts as EOS, as it does for the engine.
            self.ll_tokenizer = llg.LLTokenizer(
                tokenizer.to_json(), n_vocab=tokenizer.vocab_size,
                eos_token=self.stop_ids or None)
        except Exception as e:
            raise InvalidStructuredOutput(
                f"structured output is not available for this model's tokenizer: {e}") from e
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput):
        """The llguidance matcher for `spec` in its start state (shared; never advance it)."""
        import llguidance as llg

        key = spec_key(spec)
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                return template
        grammar = _grammar_text(key)
        # The constructor never raises on a bad grammar: it returns a matcher in an error state.
        template = llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if template.is_error():
            raise InvalidStructuredOutput(f"invalid {_WHAT[key[0]]}: {template.get_error().strip()}")
        with self._lock:
            self._cache[key] = template
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template

    def matcher(self, spec: StructuredOutput) -> StructuredMatcher:
        return StructuredMatcher(self.compile(spec).deep_copy(), self.vocab_size, self.stop_ids)


# One compiler (LLTokenizer and grammar cache) per Tokenizer object, dropped with it.
_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def compiler_for(tokenizer: Tokenizer) -> GrammarCompiler:
    with _COMPILERS_LOCK:
        compiler = _COMPILERS.get(tokenizer)
        if compiler is None:
            compiler = _COMPILERS[tokenizer] = GrammarCompiler(tokenizer)
        return compiler


def validate(tokenizer: Tokenizer, spec: StructuredOutput) -> None:
    """Raise InvalidStructuredOutput (a ValueError) if `spec` does not compile. The grammar is
    cached, so validating before submitting costs the engine nothing later."""
    compiler_for(tokenizer).compile(spec)


def make_matcher(tokenizer: Tokenizer, spec: StructuredOutput) -> StructuredMatcher:
    return compiler_for(tokenizer).matcher(spec)


class StructuredMatcher:
    """One sequence's position in its grammar.

    The mask it gives allows only tokens that keep the output a prefix of some string in the
    language (where the grammar forces text, only that text's canonical tokens), and the stop
    tokens exactly when the output so far is complete. Ids past the tokenizer's vocabulary (a
    model's padded embedding rows) are never allowed.
    """

    __slots__ = ("_m", "_vocab", "_stop_ids", "error")

    def __init__(self, matcher, vocab_size: int, stop_ids: list[int]) -> None:
        self._m = matcher
        self._vocab = vocab_size
        self._stop_ids = stop_ids
        self.error: str | None = None  # set once llguidance reports an internal failure

    def fill_mask(self, out: np.ndarray) -> None:
        """Write the allowed tokens into `out`, a zeroed bool vector as wide as the logits."""
        width = min(self._vocab, out.shape[0])
        if self.error is None:
            try:
                # One byte per token (0 or 200) rather than llguidance's packed bitmask, so the
                # conversion is a single comparison.
                bias = self._m.compute_logit_bias()
                np.not_equal(np.frombuffer(bias, dtype=np.uint8, count=width), 0, out=out[:width])
                if self._m.is_error():
                    self._fail(self._m.get_error())
            except Exception as e:  # a broken matcher ends its own request, not the engine loop
                self._fail(f"{type(e).__name__}: {e}")
        if self.error is not None:
            # Let the sequence end cleanly: offer only its stop tokens, and the engine finishes it.
            out[:] = False
            for t in self._stop_ids:
                if t < out.shape[0]:
                    out[t] = True

    def allowed_mask(self, vocab_size: int | None = None) -> np.ndarray:
        row = np.zeros(vocab_size or self._vocab, dtype=np.bool_)
        self.fill_mask(row)
        return row

    def advance(self, token_id: int) -> bool:
        """Consume a sampled token; False (and `error` set) if the grammar could not take it."""
        if self.error is not None:
            return False
        try:
            ok = self._m.consume_token(token_id)
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}")
            return False
        if not ok:
            self._fail(self._m.get_error() or f"token {token_id} is not allowed by the grammar")
        return ok

    def is_finished(self) -> bool:
        """The output is complete and nothing but a stop token may follow."""
        return self.error is None and self._m.is_stopped()

    def is_accepting(self) -> bool:
        """The output so far is a complete string of the language (more may still follow)."""
        return self.error is None and self._m.is_accepting()

    def _fail(self, message: str) -> None:
        self.error = message.strip() or "unknown llguidance error"
        log.warning("structured output matcher failed: %s", self.error)
