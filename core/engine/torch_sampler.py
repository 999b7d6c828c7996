"""The core sampler's semantics (ember.sampler) on a torch tensor of logits, on the logits' device.

For runners whose logits live on an accelerator: copying [batch, vocab] floats to the host every
step costs more than the sampling itself, so the sampling is done in batched tensor operations
where the logits are. The host builds the step's small inputs (row indices, parameters, penalty
histories, grammar masks) and uploads them in one non-blocking copy per dtype; the chosen tokens
and any logprobs come back in one copy at the end, the step's only synchronisation.

Order and semantics as ember.sampler (vLLM V1): grammar mask -> min_tokens ban -> repetition /
frequency / presence penalties -> greedy rows take the argmax (the first maximum on ties); the
other rows go through temperature -> min_p -> top_k -> top_p -> an exponential race. Logprobs come
from the raw logits. Each stage runs only over the rows that ask for it, and is skipped when none
does.

Seeded rows: SamplingRow.generator holds a torch.Generator on the logits' device (DeviceSampling
keeps one per sequence), from which the row draws a full vocabulary of uniforms every step, so its
tokens never depend on the rest of the batch. Unseeded rows share the sampler's generator.

Nothing here uses float64, which some accelerators lack (Intel Arc): see the nucleus's fixed-point
prefix sums and the min_p cut.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ember.engine.model_runner import SampleResult, sample_results, sampling_rows
from ember.engine.sequence import Sequence
from ember.sampler import SamplerOutput, SamplingRow, _has_penalty, _min_tokens_ban

_NEG_INF = float("-inf")
# The nucleus sums sorted probabilities as integers in units of 2**-62: exact and order-free, where
# float32 prefix sums over a 50k vocabulary drift by ~1e-5 and move the cut. A total of about 1
# leaves int64 room to spare.
_FIXED_ONE = 2.0**62
_NO_TOP_P = 2**63 - 1  # a threshold no prefix sum reaches: the nucleus keeps every candidate
# The smallest normal float32: a uniform clamped to it keeps log(u) finite, so a candidate's score
# w / log(u) stays below the 0 of the non-candidates even when the draw is exactly 0.
_TINY = float(np.finfo(np.float32).tiny)


class TorchSampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Shared by all unseeded rows; one per device, created on first use when not given.
        self.generators: dict[torch.device, torch.Generator] = {}
        if generator is not None:
            self.generators[generator.device] = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.ndim != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if not rows:
            return SamplerOutput([], [], [])
        plan = _Plan(rows, logits.shape[1])
        dev = logits.device
        d = _upload(plan.arrays, dev)
        x = logits.float().contiguous()  # the raw logits, for the logprobs: never written
        adj = _adjusted(x, plan, d)

        tokens = torch.empty(len(rows), dtype=torch.int64, device=dev)
        if plan.greedy:
            g = d["greedy"]
            tokens.index_copy_(0, g, _rows(adj, g, plan.all_greedy).argmax(-1))
        if plan.random:
            r = d["random"]
            tokens.index_copy_(0, r, self._draw(_rows(adj, r, plan.identity_random), plan, d))
        return _results(_pack(x, tokens, plan, d), plan)

    def _draw(self, z: torch.Tensor, plan: _Plan, d: dict[str, torch.Tensor]) -> torch.Tensor:
        """The random rows' tokens, from their adjusted logits `z` (not written)."""
        w = _weights(z, plan, d)
        n, vocab = w.shape
        # Exponential race: argmax(w / E) with E ~ Exp(1) picks token i with probability
        # w_i / sum(w); with E = -log(U) that is argmin(w / log U), since log U < 0.
        u = torch.empty_like(w)
        for j, g in enumerate(plan.seeded):
            # a full vocabulary whatever the candidates, so the stream advances alike every step
            torch.rand(vocab, generator=g, device=w.device, out=u[j])
        if len(plan.seeded) < n:
            torch.rand((n - len(plan.seeded), vocab), generator=self._shared(w.device), device=w.device,
                       out=u[len(plan.seeded):])
        return w.div_(u.clamp_min_(_TINY).log_()).argmin(-1)

    def _shared(self, device: torch.device) -> torch.Generator:
        g = self.generators.get(device)
        if g is None:
            g = self.generators[device] = torch.Generator(device=device)
            g.seed()
        return g


class _Plan:
    """A step's host-side half: which rows take which stages, and the small arrays the device
    needs for them, built from the rows' Python lists."""

    def __init__(self, rows: list[SamplingRow], vocab: int) -> None:
        a: dict[str, np.ndarray] = {}
        b = len(rows)

        def ids(name: str, values: list[int]) -> None:
            if values:  # read only by the stages that have rows
                a[name] = np.asarray(values, dtype=np.int64)

        self.greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        self.all_greedy = len(self.greedy) == b
        # Seeded rows first, so the unseeded rows' uniforms are one contiguous draw.
        self.random = sorted((i for i, r in enumerate(rows) if not r.params.greedy),
                             key=lambda i: rows[i].generator is None)
        self.identity_random = self.random == list(range(b))
        self.seeded = [rows[i].generator for i in self.random if rows[i].generator is not None]
        ids("greedy", self.greedy)
        ids("random", self.random)

        self.masked = [i for i, r in enumerate(rows) if r.allowed is not None]
        for i in self.masked:
            if rows[i].allowed.shape[-1] != vocab:
                raise ValueError(f"allowed-token mask width {rows[i].allowed.shape[-1]} != logits width {vocab}")
        if self.masked:
            ids("masked_rows", self.masked)
            a["masks"] = np.stack([rows[i].allowed for i in self.masked]).astype(np.bool_, copy=False)
        self.banned = [i * vocab + t for i, r in enumerate(rows) for t in _min_tokens_ban(r, vocab)]
        ids("banned", self.banned)

        self.penalised = [i for i, r in enumerate(rows) if _has_penalty(r)]
        if self.penalised:
            pen = [rows[i] for i in self.penalised]
            # Prompts matter to the repetition penalty alone.
            prompts = [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else [] for r in pen]
            self.prompt_width = max(map(len, prompts))
            hist = np.full((len(pen), self.prompt_width + max(len(r.output_token_ids) for r in pen)),
                           vocab, dtype=np.int64)
            for k, (r, prompt) in enumerate(zip(pen, prompts)):
                hist[k, :len(prompt)] = prompt
                hist[k, self.prompt_width:self.prompt_width + len(r.output_token_ids)] = r.output_token_ids
            ids("pen_rows", self.penalised)
            a["pen_ids"] = hist
            a["penalties"] = np.array([[r.params.repetition_penalty for r in pen],
                                       [r.params.frequency_penalty for r in pen],
                                       [r.params.presence_penalty for r in pen]], dtype=np.float32)

        params = [rows[i].params for i in self.random]
        if params:
            a["temperature"] = np.array([p.temperature for p in params], dtype=np.float32)
        self.min_p = any(p.min_p > 0.0 for p in params)
        if self.min_p:
            a["min_p"] = np.array([p.temperature * math.log(p.min_p) if p.min_p > 0.0 else _NEG_INF
                                   for p in params], dtype=np.float32)
        has_k = [0 < p.top_k < vocab for p in params]
        self.sorted_rows = [j for j, p in enumerate(params) if has_k[j] or p.top_p < 1.0]
        self.all_sorted = len(self.sorted_rows) == len(params)
        self.top_p = any(params[j].top_p < 1.0 for j in self.sorted_rows)
        self.k_max = max((params[j].top_k for j in self.sorted_rows if has_k[j]), default=0)
        if self.sorted_rows:
            ids("sorted_rows", self.sorted_rows)
            ids("kth", [params[j].top_k - 1 if has_k[j] else vocab - 1 for j in self.sorted_rows])
            # mass_before < top_p in units of 2**-62 (exact: top_p * 2**62 is a float scaling)
            ids("top_p", [math.ceil(params[j].top_p * _FIXED_ONE) if params[j].top_p < 1.0 else _NO_TOP_P
                          for j in self.sorted_rows])

        self.logprob_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        self.num_top = [rows[i].params.logprobs for i in self.logprob_rows]
        self.top_width = min(max(self.num_top, default=0), vocab)
        ids("logprob_rows", self.logprob_rows)
        self.batch = b
        self.arrays = a


def _upload(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The step's host arrays on the device, in one copy per dtype: pinned and non-blocking off
    the CPU, so that building a step's inputs never waits for the model's kernels."""
    out: dict[str, torch.Tensor] = {}
    for dtype in {arr.dtype for arr in arrays.values()}:
        names = [k for k, arr in arrays.items() if arr.dtype == dtype]
        parts = [arrays[k].ravel() for k in names]
        flat = torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))
        if device.type != "cpu":
            flat = flat.pin_memory().to(device, non_blocking=True)
        for k, part in zip(names, flat.split([arrays[k].size for k in names])):
            out[k] = part.view(arrays[k].shape)
    return out


def _adjusted(x: torch.Tensor, plan: _Plan, d: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits after grammar masks, min_tokens bans and penalties: `x` itself when no row
    has any, else a copy."""
    if not (plan.masked or plan.banned or plan.penalised):
        return x
    adj = x.clone()
    vocab = x.shape[1]
    if plan.masked:
        m = d["masked_rows"]
        adj.index_copy_(0, m, adj.index_select(0, m).masked_fill_(~d["masks"], _NEG_INF))
    if plan.banned:
        adj.view(-1).index_fill_(0, d["banned"], _NEG_INF)  # flat row * vocab + token
    if plan.penalised:
        p = d["pen_rows"]
        rep, freq, pres = (v[:, None] for v in d["penalties"])
        # Histories padded with id `vocab`, which lands in a spare column dropped afterwards.
        ids = d["pen_ids"]
        width = (len(p), vocab + 1)
        outputs = ids[:, plan.prompt_width:]
        counts = torch.zeros(width, dtype=x.dtype, device=x.device).scatter_add_(
            1, outputs, torch.ones(outputs.shape, dtype=x.dtype, device=x.device))[:, :vocab]
        seen = torch.zeros(width, dtype=torch.bool, device=x.device).scatter_(1, ids, True)[:, :vocab]
        sub = adj.index_select(0, p)
        # Repetition over prompt and output (dividing a positive logit and multiplying a
        # negative one both push it down), then frequency and presence over the output only.
        # A row's unused penalties are exact identities (x / 1, x - 0), as in vLLM.
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0)
        adj.index_copy_(0, p, sub)
    return adj


def _weights(z: torch.Tensor, plan: _Plan, d: dict[str, torch.Tensor]) -> torch.Tensor:
    """temperature -> min_p -> top_k -> top_p on the random rows' adjusted logits `z` (not
    written): their unnormalised probabilities, 0 outside each row's candidates."""
    n, vocab = z.shape
    # min_p and top_k both cut at a logit, found on the unscaled logits (temperature scales all
    # alike): the kept tokens are those at or above the higher cut.
    cut = None
    if plan.min_p:
        # p_i >= min_p * p_max  <=>  z_i >= max(z) + temperature * ln(min_p)
        cut = z.amax(-1) + d["min_p"]
    if plan.sorted_rows:
        s = d["sorted_rows"]
        zs = _rows(z, s, plan.all_sorted)
        if plan.top_p:
            vals, order = zs.sort(-1, descending=True)
        else:  # top_k alone needs only the top k_max
            vals = zs.topk(plan.k_max, -1).values
        # The k-th largest, or the smallest for a row without top_k: every token at or above
        # it stays, ties with the k-th included, as in vLLM.
        kth = vals.gather(1, d["kth"][:, None]).squeeze(1)
        if not plan.all_sorted:  # the rows left out of the sort have no cut of their own
            kth = torch.full((n,), _NEG_INF, dtype=z.dtype, device=z.device).index_copy_(0, s, kth)
        cut = kth if cut is None else torch.maximum(cut, kth)

    w = z / d["temperature"][:, None]
    if cut is not None:
        w.masked_fill_(z < cut[:, None], _NEG_INF)
    # Unnormalised probabilities (the top token's is 1), 0 outside the candidates.
    w = w.sub_(w.amax(-1, keepdim=True)).exp_()

    if plan.top_p:
        ws = _rows(w, s, plan.all_sorted)
        probs = ws / ws.sum(-1, keepdim=True)
        # Sorting the logits sorted the probabilities too; the kept positions are a prefix:
        # those whose probability mass before them is below top_p (the top token always).
        desc = probs.gather(1, order)
        fixed = (desc * _FIXED_ONE).to(torch.int64)
        keep = ((fixed.cumsum(-1) - fixed) < d["top_p"][:, None]).sum(-1, keepdim=True)
        # Every token as likely as the last one kept stays, so ties never depend on the sort.
        probs.masked_fill_(probs < desc.gather(1, keep - 1), 0.0)
        w = probs if plan.all_sorted else w.index_copy_(0, s, probs)
    return w


def sampling_weights(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """[B, V]: what each (non-greedy) row's draw races over: its unnormalised probabilities after
    mask, bans, penalties, temperature, min_p, top_k and top_p, 0 outside its candidates. The
    sampler minus the draw, for tests and tools (as ember.sampler's apply_top_k / apply_top_p)."""
    plan = _Plan(rows, logits.shape[1])
    if plan.greedy:
        raise ValueError("greedy rows have no sampling weights")
    d = _upload(plan.arrays, logits.device)
    x = logits.float().contiguous()
    r = d["random"]
    return torch.empty_like(x).index_copy_(0, r, _weights(_adjusted(x, plan, d).index_select(0, r), plan, d))


def _rows(x: torch.Tensor, index: torch.Tensor, everything: bool) -> torch.Tensor:
    """x's rows at `index`, without a copy when that is every row in order."""
    return x if everything else x.index_select(0, index)


def _pack(x: torch.Tensor, tokens: torch.Tensor, plan: _Plan, d: dict[str, torch.Tensor]) -> np.ndarray:
    """The tokens, then the chosen and top logprobs when asked, as one int32 host array (floats
    by their bits): one device-to-host copy for the step."""
    parts = [tokens.to(torch.int32)]
    if plan.logprob_rows:
        rows = d["logprob_rows"]
        raw = _rows(x, rows, len(plan.logprob_rows) == plan.batch)
        lse = torch.logsumexp(raw, -1, keepdim=True)
        parts.append((raw.gather(1, tokens.index_select(0, rows)[:, None]) - lse).view(torch.int32).ravel())
        if plan.top_width:
            top = _top_ids(raw, plan.top_width)
            parts += [top.to(torch.int32).ravel(), (raw.gather(1, top) - lse).view(torch.int32).ravel()]
    return torch.cat(parts).cpu().numpy()


def _top_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k largest entries, largest first, ties by lower id (as the numpy sampler)."""
    # topk breaks ties however the device likes, so rank a unique int64 key instead: the float's
    # order-preserving bits (negative floats have their magnitude bits flipped; + 0.0 turns -0.0
    # into 0.0, its equal), then the id reversed.
    bits = (x + 0.0).view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    vocab = x.shape[1]
    rev = torch.arange(vocab - 1, -1, -1, device=x.device)
    return (bits * vocab + rev).topk(k, -1).indices


def _results(packed: np.ndarray, plan: _Plan) -> SamplerOutput:
    b, n = plan.batch, len(plan.logprob_rows)
    tokens = packed[:b].tolist()
    logprobs: list[float | None] = [None] * b
    top: list[list[tuple[int, float]] | None] = [None] * b
    if n:
        for i, lp in zip(plan.logprob_rows, packed[b:b + n].view(np.float32).tolist()):
            logprobs[i] = lp
        w = plan.top_width
        if w:
            top_ids = packed[b + n:b + n + n * w].reshape(n, w).tolist()
            top_lps = packed[b + n + n * w:].view(np.float32).reshape(n, w).tolist()
            for k, (i, num) in enumerate(zip(plan.logprob_rows, plan.num_top)):
                if num:
                    top[i] = list(zip(top_ids[k][:num], top_lps[k][:num]))
    return SamplerOutput(tokens, logprobs, top)


def torch_seed(seq: Sequence) -> int | None:
    """A seeded request's sample's seed, as model_runner.seeded_generator takes it: signed 64-bit
    (OpenAI's API allows negative ones) plus the sample's index, folded into [0, 2**64), which is
    what torch.Generator.manual_seed accepts."""
    return None if seq.params.seed is None else (seq.params.seed + seq.index) % 2**64


class DeviceSampling:
    """The sampling half of a step for runners whose logits stay on their device: HostSampling's
    counterpart, with each seeded sequence's torch.Generator (on the logits' device) kept for the
    sequence's life, and TorchSampler instead of the numpy sampler."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.sampler = TorchSampler(generator)
        self.generators: dict[int, torch.Generator] = {}

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator | None:
        seed = torch_seed(seq)
        if seed is None:
            return None
        g = self.generators.get(seq.seq_id)
        if g is None:
            g = self.generators[seq.seq_id] = torch.Generator(device=device)
            g.manual_seed(seed)
        return g

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 eos_token_ids: set[int]) -> dict[int, SampleResult]:
        """One token for each of seqs, whose logits are the rows of a [len(seqs), vocab] tensor."""
        rows = sampling_rows(seqs, eos_token_ids, logits.shape[-1], lambda seq: self._generator(seq, logits.device))
        return sample_results(seqs, self.sampler(logits, rows))
