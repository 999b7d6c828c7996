"""Batched token sampler with vLLM V1's semantics over a [B, V] logits tensor.

Order (as vLLM V1): structured-output mask -> min_tokens mask -> repetition / frequency / presence
penalties -> greedy rows take the argmax; the other rows go through temperature -> min_p -> top_k ->
top_p -> a draw.
Logprobs come from the raw logits, before any of that (vLLM's default "raw_logprobs").

Batch invariance: every transform is row-local (no statistic crosses rows), and a seeded row's noise
comes only from its own generator, so a request's token never depends on the rest of the batch.
Transforms that no row asks for are skipped, and transforms that only some rows ask for run on
those rows alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One sequence to sample a token for, with the history its penalties need."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Created once per request by the engine (manual_seed(params.seed)) and kept across steps, so
    # the request's draws are a function of its seed and step count only.
    generator: torch.Generator | None = None
    eos_token_ids: set[int] = field(default_factory=set)
    # Structured output: a CPU bool tensor as wide as the logits, True where the grammar allows the
    # token. None (every unstructured row) costs nothing.
    allowed: Tensor | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Shared by all unseeded rows; None means the device's default RNG.
        self.generator = generator

    @torch.no_grad()
    def __call__(self, logits: Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        raw = logits.float()
        x = apply_allowed(raw, rows)
        x = apply_min_tokens(x, rows)
        x = apply_penalties(x, rows)
        tokens = self._choose(x, rows)
        logprobs, top = _logprobs(raw, tokens, rows)
        # The engine needs the tokens as Python ints: the host sync every step has to pay.
        return SamplerOutput(tokens.tolist(), logprobs, top)

    def _choose(self, x: Tensor, rows: list[SamplingRow]) -> Tensor:
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if len(greedy) == len(rows):
            return _argmax(x)
        if not greedy:
            return self._sample(x, rows)
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        out = torch.empty(len(rows), dtype=torch.long, device=x.device)
        g_idx, r_idx = _index(greedy, x.device), _index(rand, x.device)
        out[g_idx] = _argmax(x[g_idx])
        out[r_idx] = self._sample(x[r_idx], [rows[i] for i in rand])
        return out

    def _sample(self, x: Tensor, rows: list[SamplingRow]) -> Tensor:
        x = apply_temperature(x, rows)
        x = apply_min_p(x, rows)
        x = apply_top_k(x, rows)
        x = apply_top_p(x, rows)
        probs = x.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i, and
        # unlike torch.multinomial lets each row draw from its own generator. With E = -log(U)
        # that is argmin(p / log U): log U < 0 for U in [0, 1), so no clamp or negation pass is
        # needed, and U = 0 (log U = -inf) merely excludes a token with chance 2**-24.
        return probs.div_(self._log_uniform(probs, rows)).min(dim=-1).indices

    def _log_uniform(self, like: Tensor, rows: list[SamplingRow]) -> Tensor:
        u = torch.empty_like(like)
        seeded = [i for i, r in enumerate(rows) if r.generator is not None]
        if not seeded:
            u.uniform_(generator=self.generator)
        elif len(seeded) < len(rows):
            unseeded = [i for i, r in enumerate(rows) if r.generator is None]
            draw = like.new_empty((len(unseeded), like.shape[-1]))
            u[_index(unseeded, like.device)] = draw.uniform_(generator=self.generator)
        # A seeded row always draws a full vocabulary's worth from its own generator, whatever
        # the batch, so its stream advances identically alone or batched.
        for i in seeded:
            u[i].uniform_(generator=rows[i].generator)
        return u.log_()


def apply_allowed(x: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Structured output: -inf wherever a row's grammar forbids the token. Out of place, since
    the raw logits still feed the logprobs."""
    chosen = [i for i, r in enumerate(rows) if r.allowed is not None]
    if not chosen:
        return x
    if len(chosen) == 1:
        allowed = rows[chosen[0]].allowed.unsqueeze(0)
    else:
        allowed = torch.stack([rows[i].allowed for i in chosen])
    if allowed.shape[-1] != x.shape[-1]:
        raise ValueError(f"allowed-token mask width {allowed.shape[-1]} != logits width {x.shape[-1]}")
    allowed = allowed.to(x.device, non_blocking=True)
    neg = torch.tensor(_NEG_INF, dtype=x.dtype, device=x.device)
    if len(chosen) == len(rows):
        return torch.where(allowed, x, neg)
    idx = _index(chosen, x.device)
    return x.index_put((idx,), torch.where(allowed, x[idx], neg))


def apply_min_tokens(x: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Forbid the tokens that would end the request before it has min_tokens outputs."""
    vocab = x.shape[-1]
    row_idx: list[int] = []
    col_idx: list[int] = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) >= r.params.min_tokens:
            continue
        banned = set(r.params.stop_token_ids or ())
        # As in vLLM: with ignore_eos, EOS does not stop the request, so it need not be held back.
        if not r.params.ignore_eos:
            banned |= r.eos_token_ids
        # The model's vocabulary may be padded past the tokenizer's; ids beyond it cannot occur.
        cols = [t for t in banned if 0 <= t < vocab]
        if r.allowed is not None and cols and not _allows_other(r.allowed, cols):
            # A complete grammar output may only be followed by a stop token: the grammar wins
            # over min_tokens rather than leaving the row with nothing to sample.
            continue
        row_idx += [i] * len(cols)
        col_idx += cols
    if not row_idx:
        return x
    where = (_index(row_idx, x.device), _index(col_idx, x.device))
    return x.index_put(where, torch.tensor(_NEG_INF, dtype=x.dtype, device=x.device))


def _allows_other(allowed: Tensor, cols: list[int]) -> bool:
    return int(allowed.sum()) > int(allowed[cols].sum())


def _has_penalty(r: SamplingRow) -> bool:
    p = r.params
    active = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    # Penalties only ever touch tokens already seen.
    return active and bool(r.prompt_token_ids or r.output_token_ids)


def apply_penalties(x: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Repetition penalty over prompt and output tokens, then frequency and presence penalties over
    output tokens only (vLLM's order and scope).

    Only seen tokens change, so their logits are gathered, penalised and scattered back rather than
    sweeping the whole [B, V] tensor several times.
    """
    chosen = [i for i, r in enumerate(rows) if _has_penalty(r)]
    if not chosen:
        return x
    sub = [rows[i] for i in chosen]
    dev = x.device
    row_idx = _index(chosen, dev)[:, None]
    # Padded with each row's own first seen id: duplicate positions get identical values written,
    # so the padding is harmless and the scatter deterministic.
    seen = _padded([r.prompt_token_ids + r.output_token_ids for r in sub], dev)
    vals = x[row_idx, seen]
    vals = _repetition(vals, _param(sub, "repetition_penalty", x))
    if any(r.params.presence_penalty or r.params.frequency_penalty for r in sub):
        counts = _token_counts([r.output_token_ids for r in sub], x).gather(1, seen)
        vals = _presence_frequency(
            vals, counts, _param(sub, "presence_penalty", x), _param(sub, "frequency_penalty", x)
        )
    return x.index_put((row_idx.expand_as(seen), seen), vals)


def _repetition(vals: Tensor, penalty: Tensor) -> Tensor:
    # Dividing a positive logit and multiplying a negative one both push it down (CTRL / vLLM);
    # penalty 1 leaves values bit-identical.
    return torch.where(vals > 0, vals / penalty, vals * penalty)


def _presence_frequency(
    vals: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor
) -> Tensor:
    # OpenAI's definition: a flat presence charge once a token has appeared, plus a charge per use.
    return vals - frequency * counts - presence * (counts > 0).to(vals.dtype)


def _param(rows: list[SamplingRow], name: str, like: Tensor) -> Tensor:
    values = [getattr(r.params, name) for r in rows]
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _padded(token_lists: list[list[int]], device: torch.device) -> Tensor:
    width = max(len(t) for t in token_lists)
    return torch.tensor([t + t[:1] * (width - len(t)) for t in token_lists], device=device)


def _token_counts(token_lists: list[list[int]], like: Tensor) -> Tensor:
    """[B, V] occurrence counts: pad the lists with an extra id V, scatter-add, drop column V."""
    vocab = like.shape[-1]
    width = max((len(t) for t in token_lists), default=0)
    counts = like.new_zeros((len(token_lists), vocab + 1))
    if width == 0:
        return counts[:, :vocab]
    padded = [t + [vocab] * (width - len(t)) for t in token_lists]
    ids = torch.tensor(padded, dtype=torch.long, device=like.device)
    # Float counts are exact integers (below 2**24), so scatter order cannot change them.
    counts.scatter_add_(1, ids, like.new_ones(ids.shape))
    return counts[:, :vocab]


def apply_temperature(x: Tensor, rows: list[SamplingRow]) -> Tensor:
    temps = [r.params.temperature for r in rows]
    if all(t == 1.0 for t in temps):
        return x
    return x / torch.tensor(temps, dtype=x.dtype, device=x.device)[:, None]


def apply_min_p(x: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Drop tokens whose probability is below min_p times the row's most likely token's."""
    min_p = [r.params.min_p for r in rows]
    if not any(min_p):
        return x
    probs = x.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * torch.tensor(
        min_p, dtype=x.dtype, device=x.device
    )[:, None]
    return x.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k(x: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Keep the tokens whose logit reaches the row's k-th largest (ties at the cut all stay, as in
    vLLM, so the result never depends on how a sort orders equal values)."""
    vocab = x.shape[-1]
    ks = [min(r.params.top_k, vocab) if r.params.top_k > 0 else 0 for r in rows]
    if not any(ks):
        return x
    k = torch.tensor(ks, device=x.device)[:, None]
    # topk of the largest k asked is far cheaper than a full sort; the k-th value of a row does
    # not depend on how far past it the batch's topk looked.
    top = x.topk(max(ks), dim=-1).values
    kth = top.gather(-1, (k - 1).clamp_min(0))
    cut = torch.where(k > 0, kth, torch.full_like(kth, _NEG_INF))
    return x.masked_fill(x < cut, _NEG_INF)


# Nucleus search window: most nuclei are a few hundred tokens at most, so a topk this wide decides
# them without sorting the whole vocabulary. Fixed (not batch-derived) so a row always takes the
# same path; a row whose nucleus outgrows it is sorted in full.
_TOP_P_WINDOW = 1024


def apply_top_p(x: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (after top_k)."""
    ps = [r.params.top_p for r in rows]
    if all(p >= 1.0 for p in ps):
        return x
    p = torch.tensor(ps, dtype=x.dtype, device=x.device)[:, None]
    probs = x.softmax(dim=-1)
    window = probs.topk(min(_TOP_P_WINDOW, x.shape[-1]), dim=-1).values
    cut, decided = _nucleus_cut(window, p, x.shape[-1])
    if not bool(decided.all()):  # one sync per batch, and only for rows with top_p
        rest = (~decided).nonzero().squeeze(1)
        full = probs[rest].sort(dim=-1, descending=True).values
        cut[rest] = _nucleus_cut(full, p[rest], x.shape[-1])[0]
    cut = torch.where(p < 1.0, cut, torch.zeros_like(cut))
    return x.masked_fill(probs < cut, _NEG_INF)


def _nucleus_cut(sorted_probs: Tensor, p: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """The probability of the last nucleus token, and whether these top probs sufficed to say."""
    # Exclusive prefix sums are monotone, so the kept positions are exactly a prefix; the first
    # token always stays (nothing precedes it and p > 0).
    mass_before = F.pad(sorted_probs.cumsum(dim=-1)[:, :-1], (1, 0))
    # a p that rounds to 0 in float32 still keeps the most likely token
    keep = (mass_before < p).sum(dim=-1, keepdim=True).clamp_min(1)
    width = sorted_probs.shape[-1]
    decided = (keep.squeeze(1) < width) | (width == vocab)
    return sorted_probs.gather(-1, keep - 1), decided


def _logprobs(
    raw: Tensor, tokens: Tensor, rows: list[SamplingRow]
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """log_softmax of the raw logits at the chosen token and at the row's top-N tokens."""
    chosen_lp: list[float | None] = [None] * len(rows)
    top_lp: list[list[tuple[int, float]] | None] = [None] * len(rows)
    asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not asked:
        return chosen_lp, top_lp
    if len(asked) < len(rows):
        idx = _index(asked, raw.device)
        raw, tokens = raw[idx], tokens[idx]
    # x - logsumexp(x) at the few positions wanted, instead of writing out a [B, V] log_softmax.
    lse = raw.logsumexp(dim=-1, keepdim=True)
    chosen = (raw.gather(-1, tokens[:, None]) - lse).squeeze(-1).tolist()
    n_max = min(max(rows[i].params.logprobs for i in asked), raw.shape[-1])
    if n_max > 0:
        top = raw.topk(n_max, dim=-1)
        top_vals, top_ids = (top.values - lse).tolist(), top.indices.tolist()
    for j, i in enumerate(asked):
        chosen_lp[i] = chosen[j]
        n = rows[i].params.logprobs
        if n:
            top_lp[i] = list(zip(top_ids[j][:n], top_vals[j][:n]))
    return chosen_lp, top_lp


def _argmax(x: Tensor) -> Tensor:
    # Same answer as argmax (first maximum on ties) but several times faster on CPU.
    return x.max(dim=-1).indices


def _index(ids: list[int], device: torch.device) -> Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)
