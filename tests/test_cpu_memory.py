"""cpu_gguf's memory: the KV pool commits pages as the cache fills (4 KiB at a time, never numpy's
huge pages), and a loaded model's file pages leave the resident set as the weights are repacked."""
import mmap

import numpy as np
import pytest

from ember.backend import KVCacheSpec
from ember.gguf.reader import GGUFFile
from ember_cpu_gguf.backend import CpuGgufBackend


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="needs Linux's /proc and madvise")


def test_a_short_sequence_commits_a_few_pages_of_a_large_pool():
    spec = KVCacheSpec(num_layers=4, num_kv_heads=8, head_dim=64, block_size=16, num_blocks=4096, dtype="float16")
    before = rss_kib()
    pool = CpuGgufBackend().allocate_kv_arrays(spec)  # 4 layers x 2 x 64 MiB
    for k, v in pool:  # one sequence's first block, in every head
        k[:, 0] = 1.0
        v[:, 0] = 1.0
    grown = rss_kib() - before
    # 4 layers x 2 arrays x 8 heads x one 2 KiB block: 64 pages of 4 KiB, where 2 MiB pages would
    # commit 128 MiB
    assert grown < 8 * 1024, f"{grown} KiB committed for 64 small writes"
    assert all(not k.any() or k[:, 1:].max() == 0 for k, _ in pool)  # the rest reads as zeros


def test_release_view_drops_only_whole_pages_of_that_view(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    data = np.arange(4 * 1024 * 1024, dtype=np.float32).reshape(1024, 4096)  # 16 MiB
    w.add_tensor("a", data)
    w.add_tensor("b", np.ones((16,), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    gf = GGUFFile(path)
    a, b = gf.raw("a"), gf.raw("b")
    before = rss_kib()
    assert int(a.sum()) >= 0  # fault every page of a in
    faulted = rss_kib() - before
    assert faulted > 12 * 1024
    gf.release_view(a)
    assert rss_kib() - before < faulted / 4
    assert np.array_equal(a.view(np.float32).reshape(1024, 4096)[7], data[7])  # still readable
    assert np.array_equal(b.view(np.float32), np.ones(16, np.float32))
    gf.release_view(np.zeros(8, np.uint8))  # not a view of the file: nothing happens
