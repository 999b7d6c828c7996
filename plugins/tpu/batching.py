"""A step's ragged batch padded to bucketed shapes, on the host (numpy only).

XLA compiles one program per input shape. Every step of a generation has a different number of
tokens and sequences and a longer context, so the raw shapes would recompile nearly every step;
padding each dimension up to a power of two bounds a long generation to a handful of programs.
Padding is inert: padded tokens have cache slot -1 (written nowhere) and padded sequences have
length 0 and block table rows of zeros; their outputs are computed and dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class Buckets:
    """Smallest padded sizes: below these every step shares one shape."""

    tokens: int = 8
    seqs: int = 2
    blocks: int = 4


@dataclass
class PaddedBatch:
    """The arrays a step's attention needs (and the model's tokens), padded to bucketed sizes.

    tokens: T rows (the first num_tokens real), sequences: S rows (the first num_seqs real),
    tables: S x W block ids.
    """

    token_ids: np.ndarray  # [T] int32, 0 for padding
    positions: np.ndarray  # [T] int32: each token's position in its sequence, 0 for padding
    slots: np.ndarray  # [T] int32: cache slot, -1 for padding
    token_seq: np.ndarray  # [T] int32: which sequence (row of tables) each token belongs to
    tables: np.ndarray  # [S, W] int32 block tables, padded with block 0
    seq_lens: np.ndarray  # [S] int32 context after the step, 0 for padding
    num_tokens: int
    num_seqs: int
    decode: bool  # every sequence adds exactly one token (then T == S, token i is sequence i)

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.token_ids), len(self.seq_lens), self.tables.shape[1]


def pad_batch(query_start_loc: list[int], seq_lens: list[int], slots: list[int], tables: np.ndarray,
              token_ids: list[int] | None = None, buckets: Buckets = Buckets()) -> PaddedBatch:
    """Pad one step (laid out as ember's StepInputs / AttentionMetadata describe it)."""
    n_seqs = len(seq_lens)
    n_tokens = query_start_loc[-1]
    qlens = np.diff(np.asarray(query_start_loc, dtype=np.int64))
    decode = bool(n_seqs and (qlens == 1).all())
    # Never one row: XLA rewrites a one-row scatter (the KV write) into a dynamic-update-slice,
    # and with the padding slot out of range that becomes a select over the whole pool, copied
    # several times per layer (3 s instead of 0.2 s a step on SmolLM2 with a 64 MiB pool).
    S = bucket(n_seqs, max(2, buckets.seqs))
    # a decode step keeps token i == sequence i, so the Pallas kernel can take q as it is
    T = S if decode else bucket(n_tokens, max(2, buckets.tokens))
    W = bucket(tables.shape[1], buckets.blocks)

    token_seq = np.zeros(T, np.int32)
    token_seq[:n_tokens] = np.repeat(np.arange(n_seqs, dtype=np.int32), qlens)
    lens = np.zeros(S, np.int32)
    lens[:n_seqs] = seq_lens
    positions = np.zeros(T, np.int32)
    # a chunk's tokens are the last qlen positions of its sequence's context
    starts = np.asarray(query_start_loc[:-1], dtype=np.int64)
    within = np.arange(n_tokens) - np.repeat(starts, qlens)
    positions[:n_tokens] = np.repeat(lens[:n_seqs] - qlens, qlens) + within
    slot_arr = np.full(T, -1, np.int32)
    slot_arr[:n_tokens] = slots
    table_arr = np.zeros((S, W), np.int32)
    table_arr[:n_seqs, : tables.shape[1]] = tables
    ids = np.zeros(T, np.int32)
    if token_ids is not None:
        ids[:n_tokens] = token_ids
    return PaddedBatch(ids, positions, slot_arr, token_seq, table_arr, lens, n_tokens, n_seqs, decode)
