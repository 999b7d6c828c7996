"""Paged KV-cache bookkeeping: block ids and token counts only, never tensors.

Full blocks are keyed by a hash chain over (parent hash, token ids), so two sequences that share a
prefix share its blocks by reference count. A freed block keeps its hash and stays findable until
it is reused; reuse takes the least recently freed block first (LRU eviction).
"""
from __future__ import annotations

from collections import OrderedDict

from ember.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the front is the least recently freed.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        # prefix-cache statistics, in tokens
        self.prefix_queries = 0
        self.prefix_hits = 0

    # --- queries ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # --- prefix cache -------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks that hold the start of a new sequence's tokens; returns the
        number of tokens they cover. At least one token is always left to compute, because the
        step that computes it produces the logits to sample from."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        tokens = seq.token_ids
        bs = self.block_size
        max_blocks = (len(tokens) - 1) // bs
        parent = None
        hits: list[int] = []
        for i in range(max_blocks):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(parent, chunk)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            hits.append(bid)
            seq.block_hashes.append(h)
            parent = h
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
        seq.block_table.extend(hits)
        n = len(hits) * bs
        self.prefix_queries += len(tokens)
        self.prefix_hits += n
        seq.num_cached_tokens = n
        return n

    # --- allocation ---------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; False (and no change) if the pool
        cannot."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        for _ in range(need):
            bid, _ = self.free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None:  # evict: the least recently freed cached block
                if self.cached.get(block.hash) == bid:
                    del self.cached[block.hash]
                block.hash = block.token_ids = None
            block.ref_count = 1
            seq.block_table.append(bid)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register every block of seq that its computed tokens have filled."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        if num_full <= len(seq.block_hashes):
            return
        tokens = seq.token_ids
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_full):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(parent, chunk)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, chunk
                self.cached.setdefault(h, block.block_id)
            parent = h

    def free_seq(self, seq: Sequence) -> None:
        """Drop seq's references. Blocks are freed in reverse so that a sequence's tail, the
        least likely to be shared, is evicted before its prefix."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} freed twice"
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the blocks in use stay allocated)."""
        for block in self.blocks:
            block.hash = block.token_ids = None
        self.cached.clear()

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
