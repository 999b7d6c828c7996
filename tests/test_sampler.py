"""Sampler semantics on hand-built logits: one test per parameter, plus batch invariance."""
from __future__ import annotations

import math

import pytest
import torch

from ember.sampler import (
    _TOP_P_WINDOW,
    Sampler,
    SamplingRow,
    apply_penalties,
    apply_top_k,
    apply_top_p,
)
from ember.sampling_params import SamplingParams

# Probabilities with clear gaps, so nucleus / min_p boundaries are far from rounding.
PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = [math.log(p) for p in PROBS]


def make_row(
    *,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    seed: int | None = None,
    eos: set[int] | None = None,
    allowed: torch.Tensor | None = None,
    **params,
) -> SamplingRow:
    sp = SamplingParams(seed=seed, **params)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(sp, list(prompt or []), list(output or []), gen, set(eos or ()), allowed)


def empirical(logits: list[float], n: int = 20000, seed: int = 0, **params) -> torch.Tensor:
    """Frequencies of n draws, taken as one batch of n identical unseeded rows."""
    x = torch.tensor(logits).repeat(n, 1)
    rows = [make_row(**params) for _ in range(n)]
    out = Sampler(torch.Generator().manual_seed(seed))(x, rows)
    return torch.bincount(torch.tensor(out.token_ids), minlength=len(logits)).float() / n


def test_greedy_is_argmax():
    x = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    out = Sampler()(x, [make_row(temperature=0.0) for _ in range(6)])
    assert out.token_ids == x.argmax(-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6


def test_tiny_temperature_behaves_greedily():
    # 1e-3 is above the greedy cut-off, so this goes through the random path.
    logits = [1.0, 1.1, 0.9, 1.05]
    freq = empirical(logits, n=5000, temperature=1e-3)
    assert freq.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_temperature_one_matches_model_distribution():
    freq = empirical(LOGITS, temperature=1.0)
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.015)


def test_high_temperature_spreads_distribution():
    freq = empirical(LOGITS, temperature=3.0)
    expected = torch.softmax(torch.tensor(LOGITS) / 3.0, -1)
    assert torch.allclose(freq, expected, atol=0.015)
    # Flatter than the model's own distribution: the rare token gains, the top one loses.
    assert freq[3] > 0.12 and freq[0] < 0.4
    assert empirical(LOGITS, temperature=1000.0).sub(0.25).abs().max() < 0.015


def test_top_k_one_is_greedy_even_at_high_temperature():
    freq = empirical([0.0, 0.1, 0.05, -0.1], n=3000, temperature=5.0, top_k=1)
    assert freq.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_top_k_never_samples_outside_top_k():
    logits = torch.randn(20, generator=torch.Generator().manual_seed(3)).tolist()
    top3 = set(torch.tensor(logits).topk(3).indices.tolist())
    freq = empirical(logits, n=5000, temperature=10.0, top_k=3)
    assert {i for i, f in enumerate(freq.tolist()) if f > 0} == top3
    # Without top_k the same flat distribution reaches far outside the top 3.
    assert (empirical(logits, n=5000, temperature=10.0) > 0).sum() > 10


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.4, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_smallest_nucleus(top_p, kept):
    freq = empirical(LOGITS, top_p=top_p)
    expected = torch.zeros(4)
    expected[kept] = torch.tensor(PROBS)[kept] / sum(PROBS[i] for i in kept)
    assert torch.allclose(freq, expected, atol=0.015)
    assert all(freq[i] == 0 for i in range(4) if i not in kept)


def test_top_p_stops_once_mass_is_reached_exactly():
    # top_p equal (bit for bit) to the first token's probability: that token alone reaches it, so
    # the nucleus is not extended; a hair more and the second token joins.
    logits = [1.0, 0.0, -1.0]
    p0 = torch.softmax(torch.tensor([logits]), -1)[0, 0].item()
    assert empirical(logits, n=2000, top_p=p0).tolist() == [1.0, 0.0, 0.0]
    freq = empirical(logits, n=2000, top_p=min(1.0, p0 + 1e-6))
    assert freq[1] > 0 and freq[2] == 0


def test_top_k_keeps_ties_at_the_cut():
    # As vLLM: every token equal to the k-th largest logit stays, whatever order a sort gives them.
    freq = empirical([3.0, 2.0, 2.0, 1.0], n=4000, top_k=2)
    assert freq[3] == 0 and (freq[:3] > 0).all()
    cut = apply_top_k(torch.tensor([[3.0, 2.0, 2.0, 1.0]]), [make_row(top_k=2)])
    assert cut.isinf().tolist() == [[False, False, False, True]]


def _reference_nucleus(logits: torch.Tensor, p: float) -> set[int]:
    probs = torch.softmax(logits.double(), -1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    return set(order[before < p].tolist())


def test_top_p_wider_than_search_window_matches_full_sort():
    # Row 0's nucleus is a handful of tokens; row 1 is nearly flat over 5000, so its 0.9 nucleus
    # (about 4500 tokens) outgrows the topk window and takes the full-sort path.
    g = torch.Generator().manual_seed(9)
    x = torch.stack([torch.randn(5000, generator=g) * 4, torch.randn(5000, generator=g) * 0.05])
    rows = [make_row(top_p=0.9), make_row(top_p=0.9)]
    kept = ~apply_top_p(x, rows).isinf()
    for i in range(2):
        assert set(kept[i].nonzero().squeeze(1).tolist()) == _reference_nucleus(x[i], 0.9)
    assert kept[1].sum() > 4 * _TOP_P_WINDOW and kept[0].sum() < 100
    # The same rows alone get the same cut as batched together.
    batched = apply_top_p(x, rows)
    for i in range(2):
        assert torch.equal(apply_top_p(x[i : i + 1], rows[i : i + 1]), batched[i : i + 1])


def test_top_k_then_top_p_renormalises_over_top_k():
    # Over the top 2 (0.625, 0.375) a 0.6 nucleus is the first token alone; over all four it
    # would need two (0.5 < 0.6).
    assert empirical(LOGITS, n=2000, top_k=2, top_p=0.6).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert empirical(LOGITS, n=2000, top_p=0.6)[1] > 0


@pytest.mark.parametrize("min_p, kept", [(0.25, [0, 1, 2]), (0.7, [0]), (0.0, [0, 1, 2, 3])])
def test_min_p_drops_tokens_below_fraction_of_max(min_p, kept):
    # Thresholds 0.125 and 0.35 against probabilities 0.5, 0.3, 0.15, 0.05.
    freq = empirical(LOGITS, min_p=min_p)
    expected = torch.zeros(4)
    expected[kept] = torch.tensor(PROBS)[kept] / sum(PROBS[i] for i in kept)
    assert torch.allclose(freq, expected, atol=0.015)


def test_repetition_penalty_values():
    x = torch.tensor([[2.0, -1.0, 1.5, 0.5, -0.5]])
    row = make_row(prompt=[0], output=[1, 1], repetition_penalty=2.0)
    got = apply_penalties(x, [row])
    # Seen positive logit halved, seen negative doubled, unseen untouched.
    assert got.tolist() == [[1.0, -2.0, 1.5, 0.5, -0.5]]


def test_repetition_penalty_changes_choice():
    x = torch.tensor([[2.0, -1.0, 1.5, 0.5]])
    assert Sampler()(x, [make_row(prompt=[0], temperature=0.0)]).token_ids == [0]
    row = make_row(prompt=[0], temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(x, [row]).token_ids == [2]
    # Below 1 it rewards repetition instead.
    row = make_row(output=[3], temperature=0.0, repetition_penalty=0.1)
    assert Sampler()(x, [row]).token_ids == [3]


def test_presence_and_frequency_penalty_values():
    x = torch.zeros(1, 5)
    # Token 4 is in the prompt only: these penalties look at output tokens alone.
    row = make_row(prompt=[4, 4], output=[0, 0, 0, 2], frequency_penalty=0.5)
    assert apply_penalties(x, [row]).tolist() == [[-1.5, 0.0, -0.5, 0.0, 0.0]]
    row = make_row(prompt=[4, 4], output=[0, 0, 0, 2], presence_penalty=0.5)
    assert apply_penalties(x, [row]).tolist() == [[-0.5, 0.0, -0.5, 0.0, 0.0]]
    row = make_row(output=[0, 0, 2], presence_penalty=-1.0, frequency_penalty=0.25)
    assert apply_penalties(x, [row]).tolist() == [[0.5, 0.0, 0.75, 0.0, 0.0]]


def test_penalties_batched_rows_of_different_lengths():
    # Short histories are padded inside the batch; a padded token must still count once, and rows
    # without penalties (or without history) stay untouched.
    x = torch.tensor([[1.0, -1.0, 2.0, 0.5, 0.0]]).repeat(4, 1)
    rows = [
        make_row(
            prompt=[0, 1], output=[2, 2, 2, 2, 3], frequency_penalty=0.5, repetition_penalty=2.0
        ),
        make_row(output=[3], frequency_penalty=0.5, presence_penalty=0.25),
        make_row(output=[0, 1, 2]),
        make_row(frequency_penalty=1.0, repetition_penalty=3.0),
    ]
    assert apply_penalties(x, rows).tolist() == [
        [0.5, -2.0, 1.0 - 2.0, 0.25 - 0.5, 0.0],
        [1.0, -1.0, 2.0, 0.5 - 0.5 - 0.25, 0.0],
        [1.0, -1.0, 2.0, 0.5, 0.0],
        [1.0, -1.0, 2.0, 0.5, 0.0],
    ]


def test_presence_and_frequency_penalties_change_choice():
    x = torch.tensor([[1.0, 0.8, 0.0]])
    base = dict(output=[0, 0], temperature=0.0)
    assert Sampler()(x, [make_row(**base)]).token_ids == [0]
    assert Sampler()(x, [make_row(**base, frequency_penalty=0.15)]).token_ids == [1]
    assert Sampler()(x, [make_row(**base, presence_penalty=0.3)]).token_ids == [1]
    # Prompt occurrences do not count for these two.
    row = make_row(prompt=[0, 0, 0], temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)
    assert Sampler()(x, [row]).token_ids == [0]


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    x = torch.tensor([[0.0, 1.0, 5.0, 4.0]])  # EOS = 2 is the argmax, stop id 3 is second
    kw = dict(eos={2}, temperature=0.0, min_tokens=2, stop_token_ids=[3])
    assert Sampler()(x, [make_row(output=[7], **kw)]).token_ids == [1]
    assert Sampler()(x, [make_row(output=[7, 7], **kw)]).token_ids == [2]
    # ignore_eos: EOS does not end the request, so it is not held back; stop ids still are.
    assert Sampler()(x, [make_row(output=[], ignore_eos=True, **kw)]).token_ids == [2]
    x2 = torch.tensor([[0.0, 1.0, 4.0, 5.0]])
    assert Sampler()(x2, [make_row(output=[], ignore_eos=True, **kw)]).token_ids == [2]
    # Sampled rows never draw a blocked token either.
    freq = empirical([0.0, 0.0, 0.0, 0.0], n=2000, eos={2}, min_tokens=1, stop_token_ids=[3])
    assert freq[2] == 0 and freq[3] == 0 and freq[0] > 0.4


def test_logprobs_are_raw_log_softmax_with_sorted_top():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    rows = [
        make_row(output=[1, 2], temperature=0.7, top_k=5, repetition_penalty=1.5,
                 frequency_penalty=1.0, logprobs=4, seed=11),
        make_row(temperature=0.0, logprobs=0),
        make_row(temperature=0.0),
    ]
    out = Sampler()(x, rows)
    ref = torch.log_softmax(x, -1)
    for i in range(2):
        assert out.logprobs[i] == pytest.approx(ref[i, out.token_ids[i]].item(), abs=1e-6)
    top = out.top_logprobs[0]
    assert [t for t, _ in top] == ref[0].topk(4).indices.tolist()
    assert [v for _, v in top] == pytest.approx(ref[0].topk(4).values.tolist(), abs=1e-6)
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert out.top_logprobs[1] is None and out.logprobs[2] is None and out.top_logprobs[2] is None


def _seeded_draws(seed: int, companions: list[SamplingRow], position: int, steps: int = 5):
    """Tokens of one seeded request over several steps, batched with companions."""
    x = torch.randn(steps, 1000, generator=torch.Generator().manual_seed(42))
    target = make_row(seed=seed, temperature=1.3, top_p=0.95)
    sampler = Sampler()  # unseeded companions use the default RNG and must not matter
    tokens = []
    for step in range(steps):
        others = [x[step].roll(j + 1) for j in range(len(companions))]
        batch = others[:position] + [x[step]] + others[position:]
        rows = companions[:position] + [target] + companions[position:]
        out = sampler(torch.stack(batch), rows)
        tokens.append(out.token_ids[position])
        target.output_token_ids.append(out.token_ids[position])
    return tokens


def _companions() -> list[SamplingRow]:
    return [
        make_row(temperature=0.0),
        make_row(temperature=0.8),
        make_row(seed=7, top_k=10),
        make_row(top_p=0.5, repetition_penalty=1.3, prompt=[1, 2, 3]),
        make_row(min_p=0.1, presence_penalty=1.0, output=[5, 6], logprobs=3),
    ]


def test_seeded_row_reproduces_and_ignores_batch_composition():
    alone = _seeded_draws(1234, [], 0)
    assert _seeded_draws(1234, [], 0) == alone
    assert _seeded_draws(1234, _companions(), 0) == alone
    assert _seeded_draws(1234, _companions(), 3) == alone
    assert _seeded_draws(1234, _companions()[:2], 2) == alone
    # Failability: a different seed draws something else from a near-flat distribution.
    assert _seeded_draws(99, [], 0) != alone


def test_unseeded_rows_follow_sampler_generator():
    x = torch.zeros(8, 1000)
    rows = [make_row() for _ in range(8)]
    a = Sampler(torch.Generator().manual_seed(3))(x, rows).token_ids
    b = Sampler(torch.Generator().manual_seed(3))(x, rows).token_ids
    c = Sampler(torch.Generator().manual_seed(4))(x, rows).token_ids
    assert a == b and a != c


def test_mixed_batch_matches_each_row_alone():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, 300, generator=g) * 3
    specs = [
        dict(temperature=0.0, logprobs=2),
        dict(temperature=0.0, repetition_penalty=1.8, prompt=[int(x[1].argmax())]),
        dict(top_k=1, frequency_penalty=2.0, output=[int(x[2].argmax())] * 3),
        dict(seed=1, temperature=0.5, top_k=20, logprobs=5),
        dict(seed=2, top_p=0.7, min_p=0.05, presence_penalty=0.5, output=[3]),
        dict(seed=3, min_tokens=3, eos={int(x[5].argmax())}, output=[1]),
        dict(seed=4, temperature=2.0, top_k=50, top_p=0.9, repetition_penalty=1.2, prompt=[0, 1]),
    ]
    batched = Sampler()(x, [make_row(**s) for s in specs])
    for i, s in enumerate(specs):
        alone = Sampler()(x[i : i + 1], [make_row(**s)])
        assert batched.token_ids[i] == alone.token_ids[0], (i, s)
        assert batched.logprobs[i] == alone.logprobs[0]
        assert batched.top_logprobs[i] == alone.top_logprobs[0]
    # The penalties did bite: rows 1, 2 and 5 did not take the raw argmax.
    for i in (1, 2, 5):
        assert batched.token_ids[i] != int(x[i].argmax())
    assert batched.token_ids[0] == int(x[0].argmax())


def test_rejects_mismatched_rows():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), [make_row()])


def _only(ids: list[int], vocab: int) -> torch.Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[ids] = True
    return mask


def test_allowed_mask_confines_each_row_to_its_own_tokens():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 200, generator=g) * 3
    top = x.argmax(-1).tolist()
    # the raw favourite is forbidden in rows 0 and 2; rows 1 and 3 have no mask
    keep0 = [t for t in (7, 11, 150) if t != top[0]]
    keep2 = [t for t in range(0, 200, 3) if t != top[2]]
    specs = [dict(temperature=0.0, logprobs=1, allowed=_only(keep0, 200)), dict(temperature=0.0),
             dict(seed=9, temperature=1.5, allowed=_only(keep2, 200)), dict(seed=10, temperature=1.5)]
    batched = Sampler()(x, [make_row(**s) for s in specs])
    assert batched.token_ids[0] == max(keep0, key=lambda t: x[0, t])
    assert batched.token_ids[2] in keep2
    for i, s in enumerate(specs):  # a mask changes its own row only
        alone = Sampler()(x[i : i + 1], [make_row(**s)])
        assert batched.token_ids[i] == alone.token_ids[0]
    plain = Sampler()(x[1:2], [make_row(temperature=0.0)])
    assert batched.token_ids[1] == plain.token_ids[0] == top[1]
    # logprobs stay those of the raw logits, as vLLM reports them
    lp = torch.log_softmax(x[0], -1)[batched.token_ids[0]].item()
    assert batched.logprobs[0] == pytest.approx(lp, abs=1e-5)


def test_sampled_rows_never_leave_the_mask():
    keep = [1, 4, 9]
    freq = empirical([0.0] * 12, n=3000, allowed=_only(keep, 12), temperature=1.0, top_p=0.9)
    assert set(freq.nonzero().flatten().tolist()) == set(keep)


def test_grammar_that_only_allows_eos_overrides_min_tokens():
    x = torch.tensor([[5.0, 1.0, 0.0, 2.0]])
    # a complete grammar output: only EOS (2) may follow, so min_tokens cannot hold it back
    done = Sampler()(x, [make_row(temperature=0.0, eos={2}, min_tokens=3, allowed=_only([2], 4))])
    assert done.token_ids == [2]
    # while the grammar allows more, min_tokens still bans EOS
    more = Sampler()(x, [make_row(temperature=0.0, eos={2}, min_tokens=3, allowed=_only([1, 2], 4))])
    assert more.token_ids == [1]


def test_mask_width_must_match_logits():
    with pytest.raises(ValueError, match="width"):
        Sampler()(torch.zeros(1, 5), [make_row(allowed=torch.ones(4, dtype=torch.bool))])


def test_tiny_top_p_keeps_the_top_token():
    # 5e-324 is a valid top_p that rounds to 0 in float32: it must act like greedy, not crash
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    row = SamplingRow(params=SamplingParams(temperature=1.0, top_p=5e-324), prompt_token_ids=[],
                      output_token_ids=[])
    for _ in range(5):
        assert Sampler()(logits, [row]).token_ids == [1]
