"""Continuous batching: each step, share one token budget between running sequences and new ones.

Running sequences go first (one token each when decoding, the next chunk of their prompt when
prefilling), so a long prompt is fed in chunks and never stalls the others. New sequences are
admitted while the budget, the sequence limit and the block pool allow. When a running sequence
cannot get a block, the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed later (its output is unchanged by that).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ember.config import SchedulerConfig
from ember.engine.block_manager import BlockManager
from ember.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step
    num_new_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's known tokens, so it samples."""
        return self.end == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        need = -(-seq.num_tokens // self.bm.block_size)
        if need > self.bm.num_blocks:
            raise ValueError(f"a sequence of {seq.num_tokens} tokens needs {need} KV blocks, "
                             f"but the cache holds only {self.bm.num_blocks}")
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill

        # 1. running sequences, oldest first
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted; everything after it is too

        # 2. new (or preempted) sequences, in arrival order; none while anything was preempted
        while self.waiting and budget > 0 and not out.preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            if not seq.block_table:
                if not seq.want_prompt_logits:  # those need every prompt position computed
                    self.bm.match_prefix(seq)
                seq.num_computed_tokens = seq.num_cached_tokens
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            if n < remaining and not chunked:
                self.bm.free_seq(seq)
                break
            if not self.bm.allocate(seq, seq.num_computed_tokens + n):
                self.bm.free_seq(seq)  # give back the prefix hits until there is room
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)  # never one already scheduled: victims come from the tail

    def update(self, out: SchedulerOutput) -> None:
        """After the step ran: advance progress and register newly full blocks for reuse."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.bm.cache_full_blocks(s.seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = Status.FINISHED
