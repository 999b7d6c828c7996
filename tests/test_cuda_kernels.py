"""The cuda plugin's Triton kernels against the core reference: K/V write by slot mapping, paged
attention (varlen prefill and split decode) and GGUF dequantization.

Without a GPU they run in Triton's interpreter on CPU tensors, with small shapes; with one (CUDA
or ROCm) they run on it."""
import dataclasses
import itertools
import os

import pytest
import torch

# triton.jit picks the interpreter when a kernel is defined, that is when ember_cuda.kernels'
# modules are imported: the variable must be set before that, hence here, at the top.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as Q, quants as gguf_quants  # noqa: E402

from ember.backend import AttentionMetadata  # noqa: E402
from ember.gguf import quants  # noqa: E402
from ember.ops import reference  # noqa: E402
from ember.testing.conformance import random_weight  # noqa: E402
from ember_cuda.kernels import dequant, paged_attention as pa  # noqa: E402
from ember_cuda.kernels.kv_write import launch_config as kv_write_config, write_kv  # noqa: E402
from ember_cuda.kernels.launch import describe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KV_HEADS = 2
# max |error| over max |reference|, the reference in float64 from the same rounded inputs
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_batch(lens, block_size, kv_heads, head_dim, dtype, seed, padding=0):
    """A step of sequences given as (new tokens, context after the step), their blocks scattered
    at random in a cache full of random (already cached) keys and values, all on the CPU. The new
    k, v have `padding` extra rows, of slot -1."""
    g = torch.Generator().manual_seed(seed)
    tables = [-(-ctx // block_size) for _, ctx in lens]
    num_blocks = sum(tables) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    table_rows, slots, at = [], [], 0
    for (qlen, ctx), n in zip(lens, tables):
        row = order[at:at + n]
        at += n
        table_rows.append(row)
        slots += [row[p // block_size] * block_size + p % block_size for p in range(ctx - qlen, ctx)]
    width = max(tables)
    block_tables = torch.tensor([r + [0] * (width - len(r)) for r in table_rows], dtype=torch.long)
    qlens = [q for q, _ in lens]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots + [-1] * padding, dtype=torch.long),
        block_tables=block_tables,
        seq_lens=torch.tensor([c for _, c in lens], dtype=torch.long),
        query_start_loc=torch.tensor([0] + np.cumsum(qlens).tolist(), dtype=torch.long),
        query_lens_list=qlens, seq_lens_list=[c for _, c in lens], block_size=block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    tokens = len(slots) + padding
    k = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    return meta, k, v, k_cache, v_cache


def on_device(meta):
    fields = ("slot_mapping", "block_tables", "seq_lens", "query_start_loc")
    return dataclasses.replace(meta, **{f: getattr(meta, f).to(DEVICE) for f in fields})


def run_attention(kernel, lens, group, head_dim, block_size, dtype, seed, config=None, padding=0):
    """Our write_kv and `kernel`, and the float64 reference on the same inputs."""
    meta, k, v, k_cache, v_cache = make_batch(lens, block_size, KV_HEADS, head_dim, dtype, seed, padding)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(k.shape[0], KV_HEADS * group, head_dim, generator=g).to(dtype)
    scale = head_dim ** -0.5
    rows = meta.slot_mapping >= 0
    real = dataclasses.replace(meta, slot_mapping=meta.slot_mapping[rows])
    want = reference.paged_attention(q[rows].double(), k[rows].double(), v[rows].double(),
                                     k_cache.double(), v_cache.double(), real, scale)
    dmeta = on_device(meta)
    kc, vc = k_cache.to(DEVICE), v_cache.to(DEVICE)
    write_kv(k.to(DEVICE), v.to(DEVICE), kc, vc, dmeta.slot_mapping)
    got = kernel(q.to(DEVICE), kc, vc, dmeta, scale, config=config)
    return got[:len(want)].cpu(), want


def assert_close(got, want, dtype):
    assert got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * want.abs().max().item(), err


# ----------------------------------------------------------------------------------- kv write

@pytest.mark.parametrize("tokens_per_program", [None, 1, 16])  # None: the device's default
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32,) * 2, (torch.bfloat16,) * 2,
                                               (torch.float32, torch.float16)], ids=str)
def test_kv_write_matches_reference_and_skips_padding(block_size, dtype, cache_dtype, tokens_per_program):
    meta, _, _, k_cache, v_cache = make_batch([(5, 40), (1, 17), (33, 33)], block_size, 3, 64, cache_dtype,
                                              seed=0, padding=4)
    k, v = torch.randn(2, len(meta.slot_mapping), 3, 64, dtype=dtype)
    rows = meta.slot_mapping >= 0
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(k[rows], v[rows], want_k, want_v, meta.slot_mapping[rows])
    # q/k/v are usually strided views of a fused projection
    kv = torch.cat([k, v], dim=2).to(DEVICE)
    kc, vc = k_cache.to(DEVICE), v_cache.to(DEVICE)
    config = None
    if tokens_per_program:  # 43 tokens: a last program only partly full
        config = {**kv_write_config(describe(DEVICE), 3, 64), "BLOCK_T": tokens_per_program}
    write_kv(kv[..., :64], kv[..., 64:], kc, vc, meta.slot_mapping.to(DEVICE), config)
    assert torch.equal(kc.cpu(), want_k) and torch.equal(vc.cpu(), want_v)


# ------------------------------------------------------------------------------------ prefill

# a fresh prompt, chunks after cached context (one crossing block boundaries mid-block), a
# decode row in the mixed step, a one-block prompt
RAGGED = [(37, 37), (5, 70), (1, 50), (16, 16), (20, 45)]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_float32(group, head_dim, block_size):
    got, want = run_attention(pa.prefill_attention, RAGGED, group, head_dim, block_size, torch.float32,
                              seed=group + head_dim + block_size)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_16_bit(group, dtype):
    got, want = run_attention(pa.prefill_attention, RAGGED, group, 64, 16, dtype, seed=group, padding=3)
    assert_close(got, want, dtype)


def test_prefill_group_of_three_and_odd_head_dim():
    # SmolLM2's grouping (9 heads over 3 kv heads) does not divide a power-of-2 row tile
    got, want = run_attention(pa.prefill_attention, [(9, 30), (17, 17)], 3, 48, 16, torch.float32, seed=3)
    assert_close(got, want, torch.float32)


# ------------------------------------------------------------------------------------- decode

# contexts of one token, under a block, several blocks and several splits
DECODE = [(1, 1), (1, 13), (1, 150), (1, 300), (1, 64)]
SMALL_SPLITS = {"BLOCK_N": 16, "SPLIT_LEN": 32}


def decode_config(group, head_dim, dtype, **override):
    return {**pa.decode_config(describe(DEVICE), head_dim, group, dtype), **override}


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_float32(group, head_dim, block_size):
    config = decode_config(group, head_dim, torch.float32, **SMALL_SPLITS)
    assert max(c for _, c in DECODE) > 4 * config["SPLIT_LEN"]
    got, want = run_attention(pa.decode_attention, DECODE, group, head_dim, block_size, torch.float32,
                              seed=group * head_dim + block_size, config=config)
    assert_close(got, want, torch.float32)


def test_decode_reduce_one_head_a_program(monkeypatch):
    # a GPU's reduce settings (the interpreter's own take every head in one program)
    gpu_reduce = pa.decode_reduce_config
    monkeypatch.setattr(pa, "decode_reduce_config", lambda *a: {**gpu_reduce(*a), "HEADS_PER_PROGRAM": 1})
    config = decode_config(4, 64, torch.float32, **SMALL_SPLITS)
    got, want = run_attention(pa.decode_attention, DECODE, 4, 64, 16, torch.float32, seed=3, config=config)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("group", [1, 4])
def test_decode_16_bit(group, dtype):
    config = decode_config(group, 64, dtype, **SMALL_SPLITS)
    got, want = run_attention(pa.decode_attention, DECODE, group, 64, 16, dtype, seed=group, config=config)
    assert_close(got, want, dtype)


def test_decode_with_default_settings_and_padding():
    got, want = run_attention(pa.decode_attention, DECODE, 4, 64, 16, torch.float32, seed=7, padding=2)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("kernel", ["prefill", "decode"])
def test_a_sequences_result_does_not_depend_on_its_batch(kernel):
    lens = DECODE if kernel == "decode" else RAGGED
    attend = pa.decode_attention if kernel == "decode" else pa.prefill_attention
    config = decode_config(4, 64, torch.float32, **SMALL_SPLITS) if kernel == "decode" else None
    meta, k, v, k_cache, v_cache = make_batch(lens, 16, KV_HEADS, 64, torch.float32, 11)
    q = torch.randn(k.shape[0], KV_HEADS * 4, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    kc, vc = k_cache.to(DEVICE), v_cache.to(DEVICE)
    write_kv(k.to(DEVICE), v.to(DEVICE), kc, vc, meta.slot_mapping.to(DEVICE))
    full = attend(q, kc, vc, on_device(meta), 0.125, config=config)
    for i in (1, 3):
        a, b = meta.query_start_loc[i].item(), meta.query_start_loc[i + 1].item()
        one = AttentionMetadata(
            slot_mapping=meta.slot_mapping[a:b], block_tables=meta.block_tables[i:i + 1],
            seq_lens=meta.seq_lens[i:i + 1], query_start_loc=torch.tensor([0, b - a]),
            query_lens_list=[b - a], seq_lens_list=[meta.seq_lens_list[i]], block_size=16)
        alone = attend(q[a:b].clone(), kc, vc, on_device(one), 0.125, config=config)
        assert torch.equal(alone, full[a:b])


def test_dispatch_by_step_kind():
    for lens, kernel in [(DECODE, pa.decode_attention), (RAGGED, pa.prefill_attention)]:
        meta, k, v, k_cache, v_cache = make_batch(lens, 16, KV_HEADS, 64, torch.float32, 5)
        q = torch.randn(k.shape[0], KV_HEADS, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        kc, vc, dmeta = k_cache.to(DEVICE), v_cache.to(DEVICE), on_device(meta)
        assert torch.equal(pa.paged_attention(q, kc, vc, dmeta, 0.1), kernel(q, kc, vc, dmeta, 0.1))


# ------------------------------------------------------------------------------------ dequant

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_dequantize_equals_reference(qtype, dtype):
    # more blocks than one program takes (with a GPU's settings; the interpreter's own take 64k
    # values a program), and a last program only partly full
    gpu = dequant.launch_config(dataclasses.replace(describe(DEVICE), vendor="nvidia"), qtype)
    shapes = [(9, 256), (70, 512)] + ([(7, 96)] if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0) else [])
    for (rows, cols), config in itertools.product(shapes, [None, gpu]):
        w = random_weight(qtype.name, rows, cols, np.random.default_rng(rows))
        want = quants.dequantize(w.data, qtype, w.shape)
        got = dequant.dequantize(torch.from_numpy(w.data).to(DEVICE), qtype, w.shape, dtype=dtype, config=config)
        assert torch.equal(got.cpu(), want.to(dtype)), (rows, cols, config)
        if dtype == torch.float32:  # and gguf's own dequantization, the second reference
            assert np.array_equal(got.cpu().numpy(), gguf_quants.dequantize(w.data, qtype))


def test_dequantize_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="Q5_K"):
        dequant.dequantize(torch.zeros(176, dtype=torch.uint8), Q.Q5_K, (1, 256))
    with pytest.raises(ValueError, match="does not fit"):
        dequant.dequantize(torch.zeros(36, dtype=torch.uint8), Q.Q8_0, (1, 64 + 32))
