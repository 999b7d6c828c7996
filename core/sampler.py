"""Batched token sampler with vLLM V1's semantics over a [B, V] float32 numpy array of logits.

Order (as vLLM V1): structured-output mask -> min_tokens mask -> repetition / frequency / presence
penalties -> greedy rows take the argmax (the first maximum on ties); the other rows go through
temperature -> min_p -> top_k -> top_p -> a draw.
Logprobs come from the raw logits, before any of that (vLLM's default "raw_logprobs").

Batch invariance: every transform is row-local (no statistic crosses rows), and a seeded row's noise
comes only from its own generator, of which it draws a full vocabulary's worth every step whatever
the batch, so a request's token never depends on the rest of the batch. Unseeded rows share the
Sampler's generator.

numpy and single-threaded, so the core never imports torch. Speed comes from doing less rather than
from threads: rows are handled one at a time while they sit in cache, a row pays only for the
transforms it asks for, and the truncating transforms narrow a row to its few candidate tokens
before anything is exponentiated or drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .sampling_params import SamplingParams

_NEG_INF = np.float32(-np.inf)
# A cut at this logit keeps every token but the masked (-inf) ones.
_LOWEST = np.finfo(np.float32).min


@dataclass
class SamplingRow:
    """One sequence to sample a token for, with the history its penalties need."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Created once per sample by the runner (model_runner.seeded_generator) and kept across
    # steps, so the request's draws are a function of its seed and step count only.
    # (ember.engine.torch_sampler puts a torch.Generator here: the same role on the device.)
    generator: Any = None
    eos_token_ids: set[int] = field(default_factory=set)
    # Structured output: a bool array as wide as the logits, True where the grammar allows the
    # token. None (every unstructured row) costs nothing.
    allowed: np.ndarray | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    def __init__(self, generator: np.random.Generator | None = None) -> None:
        # Shared by all unseeded rows.
        self.generator = generator if generator is not None else np.random.default_rng()

    def __call__(self, logits: np.ndarray, rows: list[SamplingRow]) -> SamplerOutput:
        raw = np.ascontiguousarray(logits, dtype=np.float32)
        if raw.ndim != 2 or raw.shape[0] != len(rows):
            raise ValueError(f"logits {raw.shape} do not match {len(rows)} rows")
        tokens = [self._choose(x, r) for x, r in zip(raw, rows)]
        logprobs, top = _logprobs(raw, tokens, rows)
        return SamplerOutput(tokens, logprobs, top)

    def _choose(self, raw: np.ndarray, r: SamplingRow) -> int:
        x = _adjusted(raw, r)
        return int(np.argmax(x)) if r.params.greedy else self._draw(x, r)

    def _draw(self, x: np.ndarray, r: SamplingRow) -> int:
        """temperature -> min_p -> top_k -> top_p -> a draw, on one row."""
        p = r.params
        ids = _truncate(x, p, masked=r.allowed is not None)  # None: every token is a candidate
        z = x if ids is None else x[ids]
        if p.temperature != 1.0:
            z = z / np.float32(p.temperature)
        # Unnormalised probabilities (the top token's is 1): the draw below is scale-free.
        w = np.exp(z - z.max())
        if p.top_p < 1.0:
            keep = _nucleus(w, p.top_p)
            ids = np.flatnonzero(keep) if ids is None else ids[keep]
            w = w[keep]
        # Exponential race: argmax(w / E) with E ~ Exp(1) picks token i with probability w_i / sum(w),
        # and lets each seeded row draw from its own generator. With E = -log(U) that is
        # argmin(w / log U): log U < 0 for U in [0, 1), so no negation pass is needed, and U = 0
        # (log U = -inf) merely excludes a token with chance 2**-24.
        u = self._uniforms(r, x.shape[0], ids)
        with np.errstate(divide="ignore"):
            j = int(np.argmin(w / np.log(u)))
        return j if ids is None else int(ids[j])

    def _uniforms(self, r: SamplingRow, vocab: int, ids: np.ndarray | None) -> np.ndarray:
        """U(0, 1) for each candidate: token i's is the i-th of the row's draws."""
        if r.generator is not None:
            # A seeded row always draws a full vocabulary's worth, however few candidates it has,
            # so its stream advances identically alone or batched.
            u = r.generator.random(vocab, dtype=np.float32)
            return u if ids is None else u[ids]
        return self.generator.random(vocab if ids is None else len(ids), dtype=np.float32)


def _adjusted(x: np.ndarray, r: SamplingRow) -> np.ndarray:
    """The row's logits after its grammar mask, min_tokens ban and penalties: `x` itself when none
    applies, else a private copy, since the raw logits still feed the logprobs."""
    if r.allowed is not None:
        if r.allowed.shape[-1] != x.shape[-1]:
            raise ValueError(
                f"allowed-token mask width {r.allowed.shape[-1]} != logits width {x.shape[-1]}")
        x = np.where(r.allowed, x, _NEG_INF)
        private = True
    else:
        private = False
    banned = _min_tokens_ban(r, x.shape[-1])
    penalised = _has_penalty(r)
    if (banned or penalised) and not private:
        x = x.copy()
    if banned:
        x[banned] = _NEG_INF
    if penalised:
        _penalise(x, r)
    return x


def _min_tokens_ban(r: SamplingRow, vocab: int) -> list[int]:
    """The tokens that would end the request before it has min_tokens outputs."""
    if len(r.output_token_ids) >= r.params.min_tokens:
        return []
    banned = set(r.params.stop_token_ids or ())
    # As in vLLM: with ignore_eos, EOS does not stop the request, so it need not be held back.
    if not r.params.ignore_eos:
        banned |= r.eos_token_ids
    # The model's vocabulary may be padded past the tokenizer's; ids beyond it cannot occur.
    cols = [t for t in banned if 0 <= t < vocab]
    if r.allowed is not None and cols and not _allows_other(r.allowed, cols):
        # A complete grammar output may only be followed by a stop token: the grammar wins over
        # min_tokens rather than leaving the row with nothing to sample.
        return []
    return cols


def _allows_other(allowed: np.ndarray, cols: list[int]) -> bool:
    return np.count_nonzero(allowed) > np.count_nonzero(allowed[cols])


def _has_penalty(r: SamplingRow) -> bool:
    p = r.params
    active = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    # Penalties only ever touch tokens already seen.
    return active and bool(r.prompt_token_ids or r.output_token_ids)


def _penalise(x: np.ndarray, r: SamplingRow) -> None:
    """In place: repetition penalty over prompt and output tokens, then frequency and presence
    penalties over output tokens only (vLLM's order and scope). Only seen tokens are touched."""
    p = r.params
    if p.repetition_penalty != 1.0:
        # Repeated ids write identical values, so duplicates are harmless.
        seen = np.array(r.prompt_token_ids + r.output_token_ids)
        vals = x[seen]
        penalty = np.float32(p.repetition_penalty)
        # Dividing a positive logit and multiplying a negative one both push it down (CTRL / vLLM).
        x[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
        ids, counts = np.unique(np.array(r.output_token_ids), return_counts=True)
        # OpenAI's definition: a flat presence charge once a token has appeared, plus one per use.
        x[ids] = (x[ids] - np.float32(p.frequency_penalty) * counts.astype(np.float32)
                  - np.float32(p.presence_penalty))


def _truncate(x: np.ndarray, p: SamplingParams, masked: bool) -> np.ndarray | None:
    """The ids of the tokens min_p and top_k leave, or None when every token stays.

    Both cut at a logit, and temperature scales all logits alike, so the cuts are found on the
    unscaled logits and the kept tokens are those at or above the higher cut: top_k after min_p
    is exactly that, since min_p keeps a top set of its own.
    """
    floor = _LOWEST
    if p.min_p > 0.0:
        # p_i >= min_p * p_max  <=>  x_i >= max(x) + temperature * ln(min_p)
        floor = max(floor, _f32_at_least(float(x.max()) + p.temperature * math.log(p.min_p)))
    if 0 < p.top_k < x.shape[0]:
        return _top_ids(x, p.top_k, floor)
    if floor > _LOWEST or masked:
        # a grammar usually allows a few tokens: racing the rest would be wasted draws
        return np.flatnonzero(x >= floor)
    return None


def _f32_at_least(v: float) -> np.float32:
    """The smallest float32 not below v, so that for float32 x, x >= it exactly when x >= v."""
    f = np.float32(v)
    return f if float(f) >= v else np.nextafter(f, np.float32(np.inf))


# Strided groups for the top-k search: token j falls in group j % _GROUPS.
_GROUPS = 1024


def _top_ids(x: np.ndarray, k: int, floor: float = -np.inf) -> np.ndarray:
    """Ids (ascending) of the entries at or above both `floor` and x's k-th largest value: the top
    k and every entry tied with the k-th, so the set never depends on how equal values sort."""
    n = x.shape[0]
    if k >= n:
        return np.flatnonzero(x >= floor)
    if k <= _GROUPS and n >= 2 * _GROUPS:
        # The k-th largest group maximum is reached by k entries (each its own group's maximum),
        # so it is at most the k-th largest value, and in practice just below it: one cheap pass
        # narrows the row to a few more than k entries, where the exact cut is then found.
        main = n - n % _GROUPS
        gmax = x[:main].reshape(-1, _GROUPS).max(axis=0)
        tail = x[main:]
        np.maximum(gmax[: len(tail)], tail, out=gmax[: len(tail)])
        bound = np.partition(gmax, _GROUPS - k)[_GROUPS - k]
    else:
        bound = np.partition(x, n - k)[n - k]
    ids = np.flatnonzero(x >= max(bound, floor))
    if len(ids) > k:
        vals = x[ids]
        ids = ids[vals >= np.partition(vals, len(ids) - k)[len(ids) - k]]
    return ids


# Nucleus search window: most nuclei are a few hundred tokens at most, so the top this many
# probabilities decide them without sorting the whole vocabulary. Fixed (not batch-derived) so a
# row always takes the same path; a row whose nucleus outgrows it is sorted in full.
_TOP_P_WINDOW = 1024


def _nucleus(w: np.ndarray, top_p: float) -> np.ndarray:
    """Which tokens the nucleus keeps, given unnormalised probabilities: the smallest set of most
    likely tokens whose mass reaches top_p (the top token always; ties with its last token too)."""
    probs = w / w.sum()
    n = probs.shape[0]
    if n > _TOP_P_WINDOW:
        window = np.partition(probs, n - _TOP_P_WINDOW)[n - _TOP_P_WINDOW:]
        cut, decided = _nucleus_cut(window, top_p)
        if not decided:
            cut, _ = _nucleus_cut(probs, top_p)
    else:
        cut, _ = _nucleus_cut(probs, top_p)
    return probs >= cut


def _nucleus_cut(top_probs: np.ndarray, top_p: float) -> tuple[np.float32, bool]:
    """The probability of the last nucleus token, and whether these top probs sufficed to say."""
    desc = np.sort(top_probs)[::-1]
    # Exclusive prefix sums are monotone, so the kept positions are exactly a prefix; the first
    # token always stays (nothing precedes it and top_p > 0), even for a top_p below float32's range.
    mass_before = np.cumsum(desc[:-1], dtype=np.float64)
    keep = 1 + int(np.count_nonzero(mass_before < top_p))
    return desc[keep - 1], keep < desc.shape[0]


def _logprobs(
    raw: np.ndarray, tokens: list[int], rows: list[SamplingRow]
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """log_softmax of the raw logits at the chosen token and at the row's top-N tokens."""
    chosen_lp: list[float | None] = [None] * len(rows)
    top_lp: list[list[tuple[int, float]] | None] = [None] * len(rows)
    for i, r in enumerate(rows):
        n = r.params.logprobs
        if n is None:
            continue
        x = raw[i]
        # x - logsumexp(x) at the few positions wanted, instead of writing out a log_softmax.
        m = x.max()
        lse = m + np.log(np.exp(x - m).sum())
        chosen_lp[i] = float(x[tokens[i]] - lse)
        if n:
            ids = _top_ids(x, n)
            ids = ids[np.lexsort((ids, -x[ids]))[:n]]  # descending, ties by id
            top_lp[i] = list(zip(ids.tolist(), (x[ids] - lse).tolist()))
    return chosen_lp, top_lp


def apply_penalties(x: np.ndarray, rows: list[SamplingRow]) -> np.ndarray:
    """The penalties alone, over a [B, V] array (a copy)."""
    out = np.array(x, dtype=np.float32)
    for row, r in zip(out, rows):
        if _has_penalty(r):
            _penalise(row, r)
    return out


def apply_top_k(x: np.ndarray, rows: list[SamplingRow]) -> np.ndarray:
    """top_k alone, over a [B, V] array (a copy): -inf below each row's k-th largest logit."""
    out = np.array(x, dtype=np.float32)
    for row, r in zip(out, rows):
        if 0 < r.params.top_k < row.shape[0]:
            drop = np.ones(row.shape[0], dtype=np.bool_)
            drop[_top_ids(row, r.params.top_k)] = False
            row[drop] = _NEG_INF
    return out


def apply_top_p(x: np.ndarray, rows: list[SamplingRow]) -> np.ndarray:
    """top_p alone, over a [B, V] array (a copy): -inf outside each row's nucleus."""
    out = np.array(x, dtype=np.float32)
    for row, r in zip(out, rows):
        if r.params.top_p < 1.0:
            row[~_nucleus(np.exp(row - row.max()), r.params.top_p)] = _NEG_INF
    return out
