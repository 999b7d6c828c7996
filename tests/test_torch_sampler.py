"""The torch sampler against the numpy one (ember.sampler), whose semantics it must keep: greedy
tokens and logprobs equal, candidate sets equal, draws distributed as the candidates' softmax, and
seeded rows independent of their batch. On CPU tensors, and on CUDA too where there is one."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ember.engine.sequence import Sequence
from ember.engine.torch_sampler import DeviceSampling, TorchSampler, sampling_weights
from ember.sampler import Sampler, SamplingRow, _nucleus, _truncate, apply_top_k, apply_top_p
from ember.sampling_params import SamplingParams

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CPU run covers the semantics")
DEVICES = ["cpu", pytest.param("cuda", marks=_CUDA)]


def make_row(*, prompt=(), output=(), seed=None, eos=(), allowed=None, device="cpu", **params) -> SamplingRow:
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(seed=seed, **params), list(prompt), list(output), gen, set(eos), allowed)


def for_numpy(rows: list[SamplingRow]) -> list[SamplingRow]:
    """The same rows for the numpy sampler, whose seeded rows take numpy generators."""
    return [dataclasses.replace(r, generator=None if r.params.seed is None else np.random.default_rng(r.params.seed))
            for r in rows]


def assert_same_top(got, want, tol: float) -> None:
    """Top logprobs: the same ids in the same order, values within tol."""
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=tol)


def randn(*shape: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def on(device: str, x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).to(device)


def only(ids, vocab: int) -> np.ndarray:
    mask = np.zeros(vocab, dtype=np.bool_)
    mask[list(ids)] = True
    return mask


def _greedy_specs(x: np.ndarray) -> list[dict]:
    """Greedy rows with every adjustment before the argmax, each aimed at the raw favourite."""
    vocab = x.shape[1]
    top = x.argmax(-1).tolist()
    return [
        dict(temperature=0.0),
        dict(top_k=1),
        dict(temperature=0.0, repetition_penalty=1.7, prompt=[top[2], 5, 5], output=[7]),
        dict(temperature=0.0, frequency_penalty=0.3, presence_penalty=0.2, output=[top[3]] * 4 + [1]),
        dict(temperature=0.0, repetition_penalty=0.6, presence_penalty=-0.5, prompt=[9], output=[11, 11]),
        dict(temperature=0.0, min_tokens=3, eos={top[5]}, stop_token_ids=[1, vocab + 3], output=[2]),
        dict(temperature=0.0, min_tokens=3, eos={top[6]}, ignore_eos=True),
        dict(temperature=0.0, allowed=only(range(0, vocab, 3), vocab)),
        # a finished grammar allows only EOS: the grammar wins over min_tokens
        dict(temperature=0.0, min_tokens=5, eos={4}, allowed=only([4], vocab)),
        dict(temperature=0.0, min_tokens=5, eos={top[9]}, allowed=only([top[9], 8, 30], vocab),
             repetition_penalty=2.0, output=[8]),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_matches_numpy_with_ties_and_every_adjustment(device):
    # Logits on a coarse grid: many exact ties, so the first maximum has to win.
    x = np.round(randn(10, 500, seed=1, scale=2.0))
    x[1, [3, 70, 300]] = x[1].max() + 1  # a three-way tie at the top
    specs = _greedy_specs(x)
    rows = [make_row(device=device, **s) for s in specs]
    want = Sampler()(x, rows).token_ids
    assert TorchSampler()(on(device, x), rows).token_ids == want
    # each alone too, and the batch's adjustments did bite
    for i, s in enumerate(specs):
        assert TorchSampler()(on(device, x[i:i + 1]), [make_row(device=device, **s)]).token_ids == [want[i]]
    assert want[1] == 3
    assert all(want[i] != int(x[i].argmax()) for i in (2, 3, 5, 7, 9)) and want[8] == 4 and want[6] == x[6].argmax()


def test_greedy_matches_numpy_on_wide_random_batches():
    for seed in range(3):
        x = randn(32, 4096, seed=seed, scale=3.0)
        g = np.random.default_rng(seed)
        rows = [make_row(temperature=0.0, repetition_penalty=float(g.uniform(0.5, 2.0)),
                         frequency_penalty=float(g.uniform(-2, 2)), presence_penalty=float(g.uniform(-2, 2)),
                         prompt=g.integers(0, 4096, 50).tolist(), output=g.integers(0, 4096, 30).tolist())
                for _ in range(32)]
        assert TorchSampler()(torch.from_numpy(x), rows).token_ids == Sampler()(x, rows).token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_match_numpy_with_ties_by_id(device):
    x = np.round(randn(6, 300, seed=2, scale=3.0))  # ties everywhere, also across the top-n cut
    specs = [dict(temperature=0.0, logprobs=20), dict(temperature=0.0, logprobs=0),
             dict(top_k=1, logprobs=5, repetition_penalty=2.0, prompt=[int(x[2].argmax())]),
             dict(temperature=0.0), dict(temperature=0.0, logprobs=3, allowed=only([5, 6, 7], 300)),
             dict(seed=3, temperature=0.9, top_p=0.8, logprobs=7)]
    rows = [make_row(device=device, **s) for s in specs]
    want = Sampler()(x, for_numpy(rows))
    got = TorchSampler()(on(device, x), rows)
    lsm = torch.log_softmax(torch.from_numpy(x).double(), -1).numpy()
    for i in range(6):
        if want.logprobs[i] is None:
            assert got.logprobs[i] is None
            continue
        if i < 5:
            assert got.token_ids[i] == want.token_ids[i]
            assert got.logprobs[i] == pytest.approx(want.logprobs[i], abs=1e-5)
        assert got.logprobs[i] == pytest.approx(lsm[i, got.token_ids[i]], abs=1e-5)  # raw logits, whatever was drawn
        if want.top_logprobs[i] is None:
            assert got.top_logprobs[i] is None
        else:
            assert_same_top(got.top_logprobs[i], want.top_logprobs[i], 1e-5)
            assert all(type(t) is int and type(v) is float for t, v in got.top_logprobs[i])
    assert len(got.top_logprobs[0]) == 20 and got.top_logprobs[1] is None
    # ties do occur within the 20 returned
    vals = [v for _, v in want.top_logprobs[0]]
    assert len(set(vals)) < len(vals)


def _numpy_candidates(x: np.ndarray, p: SamplingParams) -> set[int]:
    """The numpy sampler's candidates for a drawn row: its _draw up to the race."""
    ids = _truncate(x, p, masked=False)
    ids = np.arange(x.shape[0]) if ids is None else ids
    z = x[ids] / np.float32(p.temperature) if p.temperature != 1.0 else x[ids]
    if p.top_p < 1.0:
        ids = ids[_nucleus(np.exp(z - z.max()), p.top_p)]
    return set(ids.tolist())


TRUNCATIONS = [dict(top_k=5), dict(top_k=200), dict(top_p=0.3), dict(top_p=0.95), dict(min_p=0.05),
               dict(min_p=0.5), dict(top_k=50, top_p=0.8), dict(min_p=0.02, top_k=30),
               dict(min_p=0.1, top_p=0.9), dict(min_p=0.01, top_k=100, top_p=0.7), dict()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.8])
def test_candidate_sets_match_numpy(device, temperature):
    # Every truncation in one batch (per-row parameters), twice over with different logits.
    specs = TRUNCATIONS * 2
    x = randn(len(specs), 3000, seed=int(temperature * 10), scale=2.5)
    rows = [make_row(temperature=temperature, device=device, **s) for s in specs]
    kept = (sampling_weights(on(device, x), rows) > 0).cpu().numpy()
    for i, r in enumerate(rows):
        assert set(np.flatnonzero(kept[i]).tolist()) == _numpy_candidates(x[i], r.params), specs[i]
    assert kept[0].sum() == 5 and kept[-1].all()


def test_candidate_sets_match_apply_top_k_and_apply_top_p():
    x = randn(8, 2000, seed=4, scale=2.0)
    x[4:] = randn(4, 2000, seed=5, scale=0.05)  # nearly flat: nuclei of thousands of tokens
    ks = [make_row(top_k=k) for k in (2, 17, 400, 1999, 3, 60, 1000, 1500)]
    ps = [make_row(top_p=p) for p in (0.1, 0.5, 0.9, 0.99, 0.2, 0.5, 0.9, 0.999)]
    for rows, ref in ((ks, apply_top_k), (ps, apply_top_p)):
        got = (sampling_weights(torch.from_numpy(x), rows) > 0).numpy()
        assert np.array_equal(got, np.isfinite(ref(x, rows)))
    assert got[6].sum() > 1000


def test_top_k_keeps_ties_at_the_cut_and_skips_masked_tokens():
    x = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.5], [1.0, 2.0, 0.0, 0.0, 0.0]])
    rows = [make_row(top_k=2), make_row(top_k=4, allowed=only([0, 1], 5))]
    assert (sampling_weights(x, rows) > 0).tolist() == [[True, True, True, False, False],
                                                         [True, True, False, False, False]]


def test_tiny_top_p_keeps_the_top_token():
    # 5e-324 is a valid top_p below float32's range: the nucleus is the top token, as greedy
    x = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert TorchSampler()(x.repeat(50, 1), [make_row(top_p=5e-324) for _ in range(50)]).token_ids == [1] * 50


def _frequencies(logits: list[float], n: int, device: str = "cpu", **params) -> np.ndarray:
    x = torch.tensor([logits]).repeat(n, 1).to(device)
    sampler = TorchSampler(torch.Generator(device=device).manual_seed(0))
    sp = SamplingParams(**params)  # shared: building 40000 would take longer than the sampling
    out = sampler(x, [SamplingRow(sp, [], [], None) for _ in range(n)]).token_ids
    return np.bincount(out, minlength=len(logits)) / n


def _softmax(x) -> np.ndarray:
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


LOGITS = [1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.4, -3.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params, kept", [
    (dict(temperature=1.0), range(8)), (dict(temperature=0.5), range(8)), (dict(temperature=2.5), range(8)),
    (dict(temperature=1.3, top_k=3), [0, 3, 6]), (dict(top_p=0.85), [0, 1, 3, 6]),
    (dict(temperature=0.7, min_p=0.2), [0, 3, 6]),
])
def test_draws_follow_the_candidates_softmax(device, params, kept):
    # Seeded generator: deterministic. 40000 draws put 5 standard deviations under 0.0125.
    freq = _frequencies(LOGITS, 40000, device, **params)
    want = np.zeros(8)
    want[list(kept)] = _softmax(np.array(LOGITS)[list(kept)] / params.get("temperature", 1.0))
    assert np.abs(freq - want).max() < 0.0125
    assert set(np.flatnonzero(freq).tolist()) <= set(kept)  # never outside
    assert (freq[want * 40000 > 20] > 0).all()


def test_seeded_rows_follow_the_softmax_too():
    # one row per seed: the per-row generators' draws, not the shared one's
    x = torch.tensor([LOGITS]).repeat(3000, 1)
    out = TorchSampler()(x, [make_row(seed=s, temperature=1.5) for s in range(3000)]).token_ids
    freq = np.bincount(out, minlength=8) / 3000
    assert np.abs(freq - _softmax(np.array(LOGITS) / 1.5)).max() < 0.04


def _companions(device: str) -> list[SamplingRow]:
    return [make_row(temperature=0.0, device=device), make_row(temperature=0.8, device=device),
            make_row(seed=7, top_k=10, device=device),
            make_row(top_p=0.5, repetition_penalty=1.3, prompt=[1, 2, 3], device=device),
            make_row(min_p=0.1, presence_penalty=1.0, output=[5, 6], logprobs=3, device=device),
            make_row(seed=8, temperature=1.1, allowed=only(range(0, 1000, 2), 1000), device=device)]


def _seeded_draws(seed: int, companions: list[SamplingRow], position: int, device: str, steps: int = 6):
    """One seeded request's tokens over several steps, batched with companions at `position`."""
    x = randn(steps, 1000, seed=42)
    target = make_row(seed=seed, temperature=1.3, top_p=0.95, device=device)
    sampler = TorchSampler()  # a fresh shared generator for the unseeded companions
    tokens = []
    for step in range(steps):
        others = [np.roll(x[step], j + 1) for j in range(len(companions))]
        batch = np.stack(others[:position] + [x[step]] + others[position:])
        out = sampler(on(device, batch), companions[:position] + [target] + companions[position:])
        tokens.append(out.token_ids[position])
        target.output_token_ids.append(out.token_ids[position])
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_ignores_its_batch(device):
    alone = _seeded_draws(1234, [], 0, device)
    assert _seeded_draws(1234, [], 0, device) == alone
    assert _seeded_draws(1234, _companions(device), 0, device) == alone
    assert _seeded_draws(1234, _companions(device), 4, device) == alone
    assert _seeded_draws(1234, _companions(device)[:2], 2, device) == alone
    assert _seeded_draws(99, [], 0, device) != alone


def test_seeded_row_draws_a_vocabulary_of_uniforms_each_step():
    x = torch.from_numpy(randn(1, 1000, seed=6))
    for params in (dict(), dict(top_k=3), dict(top_p=0.5, min_p=0.2), dict(allowed=only([1, 2], 1000))):
        row = make_row(seed=5, **params)
        ref = torch.Generator().manual_seed(5)
        for _ in range(3):
            TorchSampler()(x, [row])
            torch.rand(1000, generator=ref)
        assert torch.equal(row.generator.get_state(), ref.get_state())


def test_unseeded_rows_follow_the_samplers_generator():
    x = torch.zeros(8, 1000)
    rows = [make_row() for _ in range(8)]
    a, b, c = (TorchSampler(torch.Generator().manual_seed(s))(x, rows).token_ids for s in (3, 3, 4))
    assert a == b and a != c


def _seqs(seed, indices, **params) -> list[Sequence]:
    return [Sequence("r", [1, 2, 3], SamplingParams(seed=seed, temperature=1.0, **params), index=i) for i in indices]


def _stream(sampling: DeviceSampling, seqs: list[Sequence], x: torch.Tensor, steps: int = 8) -> list[list[int]]:
    out = []
    for _ in range(steps):
        res = sampling(x.repeat(len(seqs), 1), seqs, {0})
        out.append([res[s.seq_id].token_id for s in seqs])
    return out


def test_device_sampling_seeds_per_sample_and_releases():
    x = torch.zeros(1, 500)
    for seed in (5, -1, -(2**63), 2**63 - 1):  # negative and top-of-range seeds fold into [0, 2**64)
        a, b = _seqs(seed, [0, 1])
        pair = _stream(DeviceSampling(), [a, b], x)
        assert [t[0] for t in pair] == [t[0] for t in _stream(DeviceSampling(), _seqs(seed, [0]), x)]
        assert [t[1] for t in pair] == [t[0] for t in _stream(DeviceSampling(), _seqs(seed, [1]), x)]
        assert [t[0] for t in pair] != [t[1] for t in pair]  # index 0 and 1: different streams
    # seed 2**64 - 1 + index 1 wraps to 0
    wrapped = _seqs(2**63 - 1, [2**63 + 1])[0]
    assert _stream(DeviceSampling(), [wrapped], x) == _stream(DeviceSampling(), _seqs(0, [0]), x)
    sampling = DeviceSampling()
    seq = _seqs(3, [0])[0]
    sampling(x, [seq], set())
    assert seq.seq_id in sampling.generators
    sampling.release(seq)
    assert sampling.generators == {}


class _Matcher:
    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed

    def fill_mask(self, mask: np.ndarray) -> None:
        mask[self.allowed] = True


def test_device_sampling_applies_grammar_masks_and_reports_logprobs():
    x = torch.from_numpy(randn(3, 200, seed=7, scale=3.0))
    seqs = _seqs(None, [0, 0, 0], logprobs=2)
    for s in seqs:
        s.params.temperature = 0.0
    seqs[1].matcher = _Matcher([10, 20, 30])
    res = DeviceSampling()(x, seqs, set())
    assert res[seqs[0].seq_id].token_id == int(x[0].argmax())
    assert res[seqs[1].seq_id].token_id == max((10, 20, 30), key=lambda t: x[1, t])
    top = res[seqs[2].seq_id].top_logprobs
    assert [t for t, _ in top] == x[2].topk(2).indices.tolist()
    assert res[seqs[2].seq_id].logprob == pytest.approx(top[0][1])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_gives_each_row_what_it_gets_alone(device):
    x = randn(9, 300, seed=8, scale=3.0)
    specs = [
        dict(temperature=0.0, logprobs=2),
        dict(temperature=0.0, repetition_penalty=1.8, prompt=[int(x[1].argmax())]),
        dict(top_k=1, frequency_penalty=2.0, output=[int(x[2].argmax())] * 3),
        dict(seed=1, temperature=0.5, top_k=20, logprobs=5),
        dict(seed=2, top_p=0.7, min_p=0.05, presence_penalty=0.5, output=[3]),
        dict(seed=3, min_tokens=3, eos={int(x[5].argmax())}, output=[1]),
        dict(seed=4, temperature=2.0, top_k=50, top_p=0.9, repetition_penalty=1.2, prompt=[0, 1]),
        dict(seed=5, temperature=1.5, allowed=only(range(0, 300, 7), 300), logprobs=1),
        dict(temperature=0.9, top_p=0.9),  # unseeded: no per-row reproducibility to check
    ]
    batched = TorchSampler()(on(device, x), [make_row(device=device, **s) for s in specs])
    for i, s in enumerate(specs[:-1]):
        alone = TorchSampler()(on(device, x[i:i + 1]), [make_row(device=device, **s)])
        assert batched.token_ids[i] == alone.token_ids[0], (i, s)
        if s.get("logprobs") is None:
            assert batched.logprobs[i] is None and batched.top_logprobs[i] is None
            continue
        assert batched.logprobs[i] == pytest.approx(alone.logprobs[0], abs=1e-6)
        assert_same_top(batched.top_logprobs[i], alone.top_logprobs[0], 1e-6)
    assert batched.token_ids[7] % 7 == 0 and batched.token_ids[5] != int(x[5].argmax())
    # the greedy rows are the numpy sampler's too
    greedy = [0, 1, 2]
    numpy_greedy = Sampler()(x[greedy], [make_row(**specs[i]) for i in greedy]).token_ids
    assert [batched.token_ids[i] for i in greedy] == numpy_greedy


def test_leaves_the_callers_logits_alone_and_takes_half_precision():
    x = torch.from_numpy(randn(4, 64, seed=9))
    before = x.clone()
    rows = [make_row(output=[1, 2], repetition_penalty=1.5, frequency_penalty=1.0, temperature=0.0, logprobs=2),
            make_row(min_tokens=2, eos={int(x[1].argmax())}, top_p=0.8, allowed=np.arange(64) % 2 == 0),
            make_row(temperature=0.5, top_k=3, min_p=0.1, logprobs=2), make_row(temperature=0.0)]
    TorchSampler()(x, rows)
    sampling_weights(x, rows[1:3])
    assert torch.equal(x, before)
    half = x.to(torch.bfloat16)
    assert TorchSampler()(half, [make_row(temperature=0.0)] * 4).token_ids == half.float().argmax(-1).tolist()


def test_rejects_mismatched_rows_and_masks():
    with pytest.raises(ValueError):
        TorchSampler()(torch.zeros(2, 5), [make_row()])
    with pytest.raises(ValueError, match="width"):
        TorchSampler()(torch.zeros(1, 5), [make_row(allowed=np.ones(4, dtype=np.bool_))])
    assert TorchSampler()(torch.zeros(0, 5), []).token_ids == []
