"""Streaming detokenization: the text each new token adds, never half a character.

A token's text depends on its neighbours (a byte-level token can hold a fragment of a UTF-8
character; a SentencePiece decoder strips the space of the first word), so a token cannot be
decoded alone. Following vLLM, we decode a short window twice: up to the last emitted token
(`_read`) and up to the newest, both from an earlier anchor (`_prefix`), and emit the difference.
While the newer text ends in U+FFFD a character is still incomplete and nothing is emitted.
Each step decodes O(window) tokens, whatever the length of the output.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"

# A UTF-8 character is at most 4 bytes, so at most 3 tokens can hold an unfinished one. Text still
# unfinished after this many pending tokens has invalid bytes in it, and is emitted as it decodes
# (all but the last 3 tokens, which could yet begin a valid character).
MAX_PENDING_TOKENS = 8
_TAIL = 3


class _Decoder(Protocol):
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...

    def is_special(self, token_id: int) -> bool: ...


class IncrementalDetokenizer:
    """Turns a request's output tokens into text deltas, one step per token.

    The output is decoded on its own, without the prompt, so that the streamed text equals
    `tokenizer.decode(output_ids)` exactly (vLLM primes with prompt tokens, which keeps the space
    a SentencePiece vocabulary puts before the first word; a non-streamed decode drops it).
    """

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Iterable[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.num_prompt_tokens = len(list(prompt_token_ids))
        self.token_ids: list[int] = []  # every output token, special ones included
        self._ids: list[int] = []  # the ones that carry text
        self._prefix = 0
        self._read = 0
        self._pieces: list[str] = []
        self._text = ""

    def step(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (possibly "")."""
        self.token_ids.append(token_id)
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):
            # Left out of the window altogether: a skipped token at its start would make the
            # SentencePiece decoder strip the next word's space as if it began the text.
            return ""
        self._ids.append(token_id)
        end = len(self._ids)
        text = self._decode(self._prefix, end)
        if text.endswith(REPLACEMENT_CHAR):
            if end - self._read <= MAX_PENDING_TOKENS:
                return ""
            end -= _TAIL
            text = self._decode(self._prefix, end)
        return self._emit(text, end)

    def flush(self) -> str:
        """The text still held back at the end of the output (an unfinished character shows as
        U+FFFD, as in a full decode)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self._decode(self._prefix, len(self._ids)), len(self._ids))

    @property
    def output_text(self) -> str:
        if self._pieces:
            self._text += "".join(self._pieces)
            self._pieces.clear()
        return self._text

    def _emit(self, text: str, end: int) -> str:
        # Decoders are prefix-stable at character boundaries, so the text up to `_read` is a
        # prefix of `text`, and what follows it is new.
        delta = text[len(self._decode(self._prefix, self._read)):]
        self._prefix, self._read = self._read, end
        if delta:
            self._pieces.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        return self.tokenizer.decode(self._ids[start:end],
                                     skip_special_tokens=self.skip_special_tokens)
