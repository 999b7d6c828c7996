"""Block manager: allocation, sharing by prefix, eviction order, freeing."""
import pytest

from ember.engine.block_manager import BlockManager
from ember.engine.sequence import Sequence
from ember.sampling_params import SamplingParams


def seq(tokens):
    return Sequence("r", list(tokens), SamplingParams())


def test_allocate_grows_block_table_and_fails_cleanly():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(10))
    assert bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 1
    assert bm.allocate(s, 12)  # still fits the third block
    assert len(s.block_table) == 3
    assert not bm.allocate(s, 20)  # needs 2 more, 1 free: no change
    assert len(s.block_table) == 3 and bm.num_free_blocks == 1
    bm.free_seq(s)
    assert bm.num_free_blocks == 4 and s.block_table == []


def test_slots_follow_block_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(range(3)), seq(range(6))
    bm.allocate(a, 3)
    bm.allocate(b, 6)
    assert [bm.slot(b, p) for p in range(6)] == [b.block_table[p // 4] * 4 + p % 4 for p in range(6)]
    assert set(a.block_table).isdisjoint(b.block_table)


def _compute(bm, s):
    bm.allocate(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)


def test_prefix_sharing_by_reference_count():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(10)))
    _compute(bm, a)  # blocks [0-3] [4-7] full, [8-9] partial
    b = seq(list(range(8)) + [99, 98, 97])
    hit = bm.match_prefix(b)
    assert hit == 8 and b.block_table == a.block_table[:2]
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table[:2])
    assert bm.prefix_hits == 8 and bm.prefix_queries == 11
    bm.allocate(b, b.num_tokens)
    assert b.block_table[2] != a.block_table[2]
    bm.free_seq(a)
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_table[:2])
    bm.free_seq(b)
    assert bm.num_free_blocks == 16


def test_a_different_prefix_does_not_match_even_with_equal_later_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    _compute(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = seq([0, 2, 3, 4, 5, 6, 7, 8, 9])  # second block equal, first differs: the chain breaks
    assert bm.match_prefix(other) == 0


def test_match_leaves_at_least_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    _compute(bm, seq(range(8)))
    again = seq(range(8))
    assert bm.match_prefix(again) == 4  # not 8: the last token must be computed for its logits


def test_freed_cached_blocks_are_reused_and_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = seq([1, 2, 3]), seq([5, 6, 7])
    _compute(bm, a)
    _compute(bm, b)
    bm.free_seq(a)  # a's blocks freed first: evicted first
    bm.free_seq(b)
    assert len(bm.cached) == 2
    # a request for b's prefix still hits after a's cached block is evicted
    c = seq([9, 9, 9])
    bm.allocate(c, 2)  # takes one block: the least recently freed = a's tail (a freed in reverse)
    assert bm.match_prefix(seq([1, 2, 0])) == 2  # a's full block [1, 2] survives...
    d = seq([5, 6, 0])
    assert bm.match_prefix(d) == 2


def test_eviction_order_is_least_recently_freed():
    bm = BlockManager(num_blocks=3, block_size=2)
    seqs = [seq([i, i, 0]) for i in (1, 2, 3)]
    for s in seqs:
        bm.allocate(s, 2)
        s.num_computed_tokens = 2
        bm.cache_full_blocks(s)
    for s in seqs:
        bm.free_seq(s)  # freed in order 1, 2, 3
    taker = seq([7, 7, 7, 7])
    bm.allocate(taker, 4)  # evicts two blocks: 1's then 2's
    assert bm.match_prefix(seq([1, 1, 0])) == 0
    assert bm.match_prefix(seq([2, 2, 0])) == 0
    assert bm.match_prefix(seq([3, 3, 0])) == 2


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=2, block_size=2)
    s = seq([1, 2])
    bm.allocate(s, 2)
    table = list(s.block_table)
    bm.free_seq(s)
    s.block_table = table
    with pytest.raises(AssertionError):
        bm.free_seq(s)
