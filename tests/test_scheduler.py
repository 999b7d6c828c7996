"""Scheduler: token budget, chunked prefill, admission, preemption, finishing and aborting."""
from ember.config import SchedulerConfig
from ember.engine.block_manager import BlockManager
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Sequence, Status
from ember.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, chunked=True, prefix=True):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     enable_chunked_prefill=chunked), bm), bm


def seq(n, start=0):
    return Sequence("r", list(range(start, start + n)), SamplingParams())


def run_step(sched, sample_token=1):
    """What the engine does around the runner: advance, then append a token where sampled."""
    out = sched.schedule()
    sched.update(out)
    for s in out.scheduled:
        if s.samples:
            s.seq.output_token_ids.append(sample_token)
    return out


def test_long_prompt_is_chunked_and_decodes_keep_running():
    sched, bm = make(budget=16)
    short = seq(4)
    sched.add(short)
    run_step(sched)  # short prefilled and sampled
    long = seq(40, start=100)
    sched.add(long)
    out = run_step(sched)
    by = {s.seq.seq_id: s.num_new_tokens for s in out.scheduled}
    assert by[short.seq_id] == 1  # the decode goes first
    assert by[long.seq_id] == 15  # the rest of the budget
    assert out.num_tokens <= 16
    steps = 1
    while long.num_computed_tokens < 40:
        out = run_step(sched)
        steps += 1
        assert any(s.seq is short for s in out.scheduled)  # never stalled
        assert out.num_tokens <= 16
    assert steps == 3 and len(long.output_token_ids) == 1


def test_without_chunking_a_prompt_waits_for_a_budget_that_fits():
    sched, _ = make(budget=16, chunked=False)
    big = seq(20)
    sched.add(big)
    out = sched.schedule()
    assert not out.scheduled and sched.waiting


def test_admission_stops_when_blocks_run_out():
    sched, bm = make(num_blocks=5, block_size=4, budget=100)
    a, b, c = seq(8), seq(8, 50), seq(8, 90)
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [a, b, c][:2]
    assert c in sched.waiting and bm.num_free_blocks == 1


def test_max_num_seqs_caps_the_batch():
    sched, _ = make(max_seqs=2, budget=100)
    for i in range(3):
        sched.add(seq(4, i * 10))
    assert len(sched.schedule().scheduled) == 2


def test_preemption_takes_the_newest_and_recomputes_it():
    sched, bm = make(num_blocks=4, block_size=4, budget=100, prefix=False)
    old, new = seq(8), seq(7, 50)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # old and new hold 2 blocks each: the pool of 4 is full
    assert bm.num_free_blocks == 0
    out = run_step(sched)  # old needs a 3rd block: new is preempted
    assert out.preempted == [new]
    assert new.status is Status.WAITING and new.num_computed_tokens == 0 and not new.block_table
    assert [s.seq for s in out.scheduled] == [old]
    # when old finishes, new is recomputed over prompt + its output so far
    sched.finish(old)
    out = run_step(sched)
    assert out.scheduled[0].seq is new and out.scheduled[0].num_new_tokens == 8
    assert sched.num_preemptions == 1


def test_finish_and_abort_return_every_block():
    sched, bm = make(num_blocks=32, block_size=4, budget=12)
    seqs = [seq(10, i * 100) for i in range(4)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    run_step(sched)
    sched.finish(seqs[0])  # finished while running
    sched.finish(seqs[3])  # aborted while (partly) waiting
    for _ in range(10):
        run_step(sched)
    for s in seqs[1:3]:
        sched.finish(s)
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == 32
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_hit_skips_cached_tokens():
    sched, bm = make(block_size=4, budget=100)
    a = seq(12)
    sched.add(a)
    run_step(sched)
    b = Sequence("r2", list(range(12)) + [500, 501], SamplingParams())
    sched.add(b)
    out = run_step(sched)
    sb = next(s for s in out.scheduled if s.seq is b)
    assert b.num_cached_tokens == 12 and sb.num_new_tokens == 2
