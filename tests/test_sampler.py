"""Sampler semantics on hand-built logits: one test per parameter, plus batch invariance."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ember.sampler import (
    _GROUPS,
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
    allowed: np.ndarray | None = None,
    **params,
) -> SamplingRow:
    sp = SamplingParams(seed=seed, **params)
    gen = np.random.default_rng(seed) if seed is not None else None
    return SamplingRow(sp, list(prompt or []), list(output or []), gen, set(eos or ()), allowed)


def randn(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x) -> np.ndarray:
    return np.log(softmax(x))


def empirical(logits: list[float], n: int = 20000, seed: int = 0, **params) -> np.ndarray:
    """Frequencies of n draws, taken as one batch of n identical unseeded rows."""
    x = np.tile(np.array(logits, dtype=np.float32), (n, 1))
    rows = [make_row(**params) for _ in range(n)]
    out = Sampler(np.random.default_rng(seed))(x, rows)
    return np.bincount(out.token_ids, minlength=len(logits)) / n


def test_greedy_is_argmax():
    x = randn(6, 100, seed=1)
    out = Sampler()(x, [make_row(temperature=0.0) for _ in range(6)])
    assert out.token_ids == x.argmax(-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6


def test_greedy_takes_the_first_maximum_on_ties():
    x = np.array([[1.0, 3.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]], dtype=np.float32)
    assert Sampler()(x, [make_row(temperature=0.0), make_row(top_k=1)]).token_ids == [1, 0]


def test_accepts_other_float_dtypes():
    x = randn(3, 40, seed=2)
    rows = [make_row(temperature=0.0, logprobs=2) for _ in range(3)]
    ref = Sampler()(x, rows)
    assert Sampler()(x.astype(np.float64), rows) == ref
    assert Sampler()(np.asfortranarray(x), rows) == ref
    assert Sampler()(x.astype(np.float16), rows).token_ids == x.astype(np.float16).argmax(-1).tolist()


def test_tiny_temperature_behaves_greedily():
    # 1e-3 is above the greedy cut-off, so this goes through the random path.
    logits = [1.0, 1.1, 0.9, 1.05]
    freq = empirical(logits, n=5000, temperature=1e-3)
    assert freq.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_temperature_one_matches_model_distribution():
    freq = empirical(LOGITS, temperature=1.0)
    assert np.allclose(freq, PROBS, atol=0.015)


def test_high_temperature_spreads_distribution():
    freq = empirical(LOGITS, temperature=3.0)
    expected = softmax(np.array(LOGITS) / 3.0)
    assert np.allclose(freq, expected, atol=0.015)
    # Flatter than the model's own distribution: the rare token gains, the top one loses.
    assert freq[3] > 0.12 and freq[0] < 0.4
    assert np.abs(empirical(LOGITS, temperature=1000.0) - 0.25).max() < 0.015


def test_top_k_one_is_greedy_even_at_high_temperature():
    freq = empirical([0.0, 0.1, 0.05, -0.1], n=3000, temperature=5.0, top_k=1)
    assert freq.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_top_k_never_samples_outside_top_k():
    logits = randn(20, seed=3).tolist()
    top3 = set(np.argsort(logits)[-3:].tolist())
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
    expected = np.zeros(4)
    expected[kept] = np.array(PROBS)[kept] / sum(PROBS[i] for i in kept)
    assert np.allclose(freq, expected, atol=0.015)
    assert all(freq[i] == 0 for i in range(4) if i not in kept)


def test_top_p_stops_once_mass_is_reached_exactly():
    # top_p equal (bit for bit) to the first token's probability, computed as the sampler does in
    # float32: that token alone reaches it, so the nucleus is not extended; a hair more and the
    # second token joins.
    logits = [1.0, 0.0, -1.0]
    x = np.array(logits, dtype=np.float32)
    w = np.exp(x - x.max())
    p0 = float((w / w.sum())[0])
    assert empirical(logits, n=2000, top_p=p0).tolist() == [1.0, 0.0, 0.0]
    freq = empirical(logits, n=2000, top_p=min(1.0, p0 + 1e-6))
    assert freq[1] > 0 and freq[2] == 0


def test_top_k_keeps_ties_at_the_cut():
    # As vLLM: every token equal to the k-th largest logit stays, whatever order a sort gives them.
    freq = empirical([3.0, 2.0, 2.0, 1.0], n=4000, top_k=2)
    assert freq[3] == 0 and (freq[:3] > 0).all()
    cut = apply_top_k(np.array([[3.0, 2.0, 2.0, 1.0]], dtype=np.float32), [make_row(top_k=2)])
    assert np.isinf(cut).tolist() == [[False, False, False, True]]


@pytest.mark.parametrize("k", [1, 7, 40, _GROUPS, _GROUPS + 1, 4999])
def test_top_k_on_a_wide_row_matches_a_full_sort(k):
    # Wide enough for the group-maximum search (and, past _GROUPS, the exact partition), with
    # masked tokens and many ties: logits on a coarse grid.
    x = np.round(randn(2, 5000, seed=k) * 4) / 2
    x[1, ::3] = -np.inf
    rows = [make_row(top_k=k), make_row(top_k=k)]
    kept = ~np.isinf(apply_top_k(x, rows))
    for i in range(2):
        kth = np.sort(x[i])[::-1][k - 1]
        assert np.array_equal(kept[i], (x[i] >= kth) & (x[i] > -np.inf))
        assert kept[i].sum() >= min(k, np.isfinite(x[i]).sum())


def _reference_nucleus(logits: np.ndarray, p: float) -> set[int]:
    probs = softmax(logits)
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    return set(order[before < p].tolist())


def test_top_p_wider_than_search_window_matches_full_sort():
    # Row 0's nucleus is a handful of tokens; row 1 is nearly flat over 5000, so its 0.9 nucleus
    # (about 4500 tokens) outgrows the window and takes the full-sort path.
    g = np.random.default_rng(9)
    x = np.stack([g.standard_normal(5000) * 4, g.standard_normal(5000) * 0.05]).astype(np.float32)
    rows = [make_row(top_p=0.9), make_row(top_p=0.9)]
    kept = ~np.isinf(apply_top_p(x, rows))
    for i in range(2):
        assert set(np.flatnonzero(kept[i]).tolist()) == _reference_nucleus(x[i], 0.9)
    assert kept[1].sum() > 4 * _TOP_P_WINDOW and kept[0].sum() < 100
    # The same rows alone get the same cut as batched together.
    batched = apply_top_p(x, rows)
    for i in range(2):
        assert np.array_equal(apply_top_p(x[i : i + 1], rows[i : i + 1]), batched[i : i + 1])


def test_top_k_then_top_p_renormalises_over_top_k():
    # Over the top 2 (0.625, 0.375) a 0.6 nucleus is the first token alone; over all four it
    # would need two (0.5 < 0.6).
    assert empirical(LOGITS, n=2000, top_k=2, top_p=0.6).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert empirical(LOGITS, n=2000, top_p=0.6)[1] > 0


@pytest.mark.parametrize("min_p, kept", [(0.25, [0, 1, 2]), (0.7, [0]), (0.0, [0, 1, 2, 3])])
def test_min_p_drops_tokens_below_fraction_of_max(min_p, kept):
    # Thresholds 0.125 and 0.35 against probabilities 0.5, 0.3, 0.15, 0.05.
    freq = empirical(LOGITS, min_p=min_p)
    expected = np.zeros(4)
    expected[kept] = np.array(PROBS)[kept] / sum(PROBS[i] for i in kept)
    assert np.allclose(freq, expected, atol=0.015)


def test_min_p_applies_after_temperature():
    # At temperature 2 the probabilities go as sqrt(PROBS): relative to the top one 1, 0.77, 0.55,
    # 0.32. A 0.5 min_p keeps three tokens there, two at temperature 1 (1, 0.6, 0.3, 0.1).
    freq = empirical(LOGITS, temperature=2.0, min_p=0.5)
    expected = np.sqrt(PROBS) * [1, 1, 1, 0]
    assert np.allclose(freq, expected / expected.sum(), atol=0.015)
    assert freq[3] == 0 and freq[2] > 0.2
    assert empirical(LOGITS, n=4000, min_p=0.5)[2] == 0
    # min_p and top_k together: top_k's cut applies to what min_p left.
    assert empirical(LOGITS, n=4000, temperature=2.0, min_p=0.5, top_k=2)[2] == 0
    assert empirical(LOGITS, n=4000, temperature=2.0, min_p=0.7, top_k=3)[2] == 0


def test_repetition_penalty_values():
    x = np.array([[2.0, -1.0, 1.5, 0.5, -0.5]], dtype=np.float32)
    row = make_row(prompt=[0], output=[1, 1], repetition_penalty=2.0)
    got = apply_penalties(x, [row])
    # Seen positive logit halved, seen negative doubled, unseen untouched.
    assert got.tolist() == [[1.0, -2.0, 1.5, 0.5, -0.5]]


def test_repetition_penalty_changes_choice():
    x = np.array([[2.0, -1.0, 1.5, 0.5]], dtype=np.float32)
    assert Sampler()(x, [make_row(prompt=[0], temperature=0.0)]).token_ids == [0]
    row = make_row(prompt=[0], temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(x, [row]).token_ids == [2]
    # Below 1 it rewards repetition instead.
    row = make_row(output=[3], temperature=0.0, repetition_penalty=0.1)
    assert Sampler()(x, [row]).token_ids == [3]


def test_presence_and_frequency_penalty_values():
    x = np.zeros((1, 5), dtype=np.float32)
    # Token 4 is in the prompt only: these penalties look at output tokens alone.
    row = make_row(prompt=[4, 4], output=[0, 0, 0, 2], frequency_penalty=0.5)
    assert apply_penalties(x, [row]).tolist() == [[-1.5, 0.0, -0.5, 0.0, 0.0]]
    row = make_row(prompt=[4, 4], output=[0, 0, 0, 2], presence_penalty=0.5)
    assert apply_penalties(x, [row]).tolist() == [[-0.5, 0.0, -0.5, 0.0, 0.0]]
    row = make_row(output=[0, 0, 2], presence_penalty=-1.0, frequency_penalty=0.25)
    assert apply_penalties(x, [row]).tolist() == [[0.5, 0.0, 0.75, 0.0, 0.0]]


def test_penalties_batched_rows_of_different_lengths():
    # Histories of different lengths in one batch: a repeated token counts once per use, and rows
    # without penalties (or without history) stay untouched.
    x = np.tile(np.array([1.0, -1.0, 2.0, 0.5, 0.0], dtype=np.float32), (4, 1))
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
    x = np.array([[1.0, 0.8, 0.0]], dtype=np.float32)
    base = dict(output=[0, 0], temperature=0.0)
    assert Sampler()(x, [make_row(**base)]).token_ids == [0]
    assert Sampler()(x, [make_row(**base, frequency_penalty=0.15)]).token_ids == [1]
    assert Sampler()(x, [make_row(**base, presence_penalty=0.3)]).token_ids == [1]
    # Prompt occurrences do not count for these two.
    row = make_row(prompt=[0, 0, 0], temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)
    assert Sampler()(x, [row]).token_ids == [0]


def test_transforms_leave_the_callers_logits_alone():
    x = randn(3, 64, seed=4)
    before = x.copy()
    rows = [make_row(output=[1, 2], repetition_penalty=1.5, frequency_penalty=1.0, temperature=0.0),
            make_row(min_tokens=2, eos={int(x[1].argmax())}, top_p=0.8, allowed=np.arange(64) % 2 == 0),
            make_row(temperature=0.5, top_k=3, min_p=0.1, logprobs=2)]
    Sampler()(x, rows)
    apply_penalties(x, rows), apply_top_k(x, rows), apply_top_p(x, rows)
    assert np.array_equal(x, before)


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    x = np.array([[0.0, 1.0, 5.0, 4.0]], dtype=np.float32)  # EOS = 2 is the argmax, stop id 3 is second
    kw = dict(eos={2}, temperature=0.0, min_tokens=2, stop_token_ids=[3])
    assert Sampler()(x, [make_row(output=[7], **kw)]).token_ids == [1]
    assert Sampler()(x, [make_row(output=[7, 7], **kw)]).token_ids == [2]
    # ignore_eos: EOS does not end the request, so it is not held back; stop ids still are.
    assert Sampler()(x, [make_row(output=[], ignore_eos=True, **kw)]).token_ids == [2]
    x2 = np.array([[0.0, 1.0, 4.0, 5.0]], dtype=np.float32)
    assert Sampler()(x2, [make_row(output=[], ignore_eos=True, **kw)]).token_ids == [2]
    # Sampled rows never draw a blocked token either.
    freq = empirical([0.0, 0.0, 0.0, 0.0], n=2000, eos={2}, min_tokens=1, stop_token_ids=[3])
    assert freq[2] == 0 and freq[3] == 0 and freq[0] > 0.4


def test_logprobs_are_raw_log_softmax_with_sorted_top():
    x = randn(3, 50, seed=5)
    rows = [
        make_row(output=[1, 2], temperature=0.7, top_k=5, repetition_penalty=1.5,
                 frequency_penalty=1.0, logprobs=4, seed=11),
        make_row(temperature=0.0, logprobs=0),
        make_row(temperature=0.0),
    ]
    out = Sampler()(x, rows)
    ref = log_softmax(x)
    for i in range(2):
        assert out.logprobs[i] == pytest.approx(ref[i, out.token_ids[i]], abs=1e-6)
    top = out.top_logprobs[0]
    order = np.argsort(-ref[0])[:4]
    assert [t for t, _ in top] == order.tolist()
    assert [v for _, v in top] == pytest.approx(ref[0, order].tolist(), abs=1e-6)
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert all(type(t) is int and type(v) is float for t, v in top)
    assert out.top_logprobs[1] is None and out.logprobs[2] is None and out.top_logprobs[2] is None


def _seeded_draws(seed: int, companions: list[SamplingRow], position: int, steps: int = 5):
    """Tokens of one seeded request over several steps, batched with companions."""
    x = randn(steps, 1000, seed=42)
    target = make_row(seed=seed, temperature=1.3, top_p=0.95)
    sampler = Sampler()  # unseeded companions use a fresh generator and must not matter
    tokens = []
    for step in range(steps):
        others = [np.roll(x[step], j + 1) for j in range(len(companions))]
        batch = others[:position] + [x[step]] + others[position:]
        rows = companions[:position] + [target] + companions[position:]
        out = sampler(np.stack(batch), rows)
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


def test_seeded_row_draws_a_vocabulary_of_uniforms_each_step():
    # Whatever its candidates (all 1000 tokens, or a few), a seeded row advances its stream by one
    # vocabulary's worth of draws per step, so its later steps never depend on earlier truncation.
    x = randn(1, 1000, seed=6)
    for params in (dict(), dict(top_k=3), dict(top_p=0.5, min_p=0.2)):
        row = make_row(seed=5, **params)
        ref = np.random.default_rng(5)
        for _ in range(3):
            Sampler()(x, [row])
            ref.random(1000, dtype=np.float32)
        assert row.generator.random() == ref.random()


def test_unseeded_rows_follow_sampler_generator():
    x = np.zeros((8, 1000), dtype=np.float32)
    rows = [make_row() for _ in range(8)]
    a = Sampler(np.random.default_rng(3))(x, rows).token_ids
    b = Sampler(np.random.default_rng(3))(x, rows).token_ids
    c = Sampler(np.random.default_rng(4))(x, rows).token_ids
    assert a == b and a != c


def test_mixed_batch_matches_each_row_alone():
    x = randn(7, 300, seed=8) * 3
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
        Sampler()(np.zeros((2, 5), dtype=np.float32), [make_row()])


def _only(ids: list[int], vocab: int) -> np.ndarray:
    mask = np.zeros(vocab, dtype=np.bool_)
    mask[ids] = True
    return mask


def test_allowed_mask_confines_each_row_to_its_own_tokens():
    x = randn(4, 200, seed=5) * 3
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
    lp = log_softmax(x[0])[batched.token_ids[0]]
    assert batched.logprobs[0] == pytest.approx(lp, abs=1e-5)


def test_sampled_rows_never_leave_the_mask():
    keep = [1, 4, 9]
    freq = empirical([0.0] * 12, n=3000, allowed=_only(keep, 12), temperature=1.0, top_p=0.9)
    assert set(np.flatnonzero(freq).tolist()) == set(keep)


def test_grammar_that_only_allows_eos_overrides_min_tokens():
    x = np.array([[5.0, 1.0, 0.0, 2.0]], dtype=np.float32)
    # a complete grammar output: only EOS (2) may follow, so min_tokens cannot hold it back
    done = Sampler()(x, [make_row(temperature=0.0, eos={2}, min_tokens=3, allowed=_only([2], 4))])
    assert done.token_ids == [2]
    # while the grammar allows more, min_tokens still bans EOS
    more = Sampler()(x, [make_row(temperature=0.0, eos={2}, min_tokens=3, allowed=_only([1, 2], 4))])
    assert more.token_ids == [1]


def test_mask_width_must_match_logits():
    with pytest.raises(ValueError, match="width"):
        Sampler()(np.zeros((1, 5), dtype=np.float32), [make_row(allowed=np.ones(4, dtype=np.bool_))])


def test_tiny_top_p_keeps_the_top_token():
    # 5e-324 is a valid top_p that rounds to 0 in float32: it must act like greedy, not crash
    logits = np.array([[0.0, 3.0, 1.0, 2.0]], dtype=np.float32)
    row = SamplingRow(params=SamplingParams(temperature=1.0, top_p=5e-324), prompt_token_ids=[],
                      output_token_ids=[])
    for _ in range(5):
        assert Sampler()(logits, [row]).token_ids == [1]
