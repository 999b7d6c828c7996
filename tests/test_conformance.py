"""The conformance kit (ember.testing) run against every backend in this repository: cpu_gguf on its
fast path and in exact mode, and the third-party example under tests/; and a deliberately broken
backend, which must fail it with a message that says what is wrong."""
import sys
from pathlib import Path

import pytest

from ember.backend import BackendOptions
from ember.testing import CHECKS, ConformanceFailure, ReferenceBackend, assert_conformant, run_check

sys.path.insert(0, str(Path(__file__).parent / "third_party_backend"))
from ember_example_backend import ExampleBackend  # noqa: E402  (the example, as its author would test it)

from ember_cpu_gguf.backend import CpuGgufBackend  # noqa: E402

BACKENDS = {
    "cpu_gguf": (CpuGgufBackend, BackendOptions(threads=2)),
    "cpu_gguf-exact": (CpuGgufBackend, BackendOptions(threads=2, exact=True)),
    "example": (ExampleBackend, None),
    "reference": (ReferenceBackend, None),
}
UNIT_CHECKS = [c for c in CHECKS if c != "end_to_end"]


@pytest.mark.parametrize("check", UNIT_CHECKS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backend_passes(backend, check):
    cls, options = BACKENDS[backend]
    run_check(check, cls, options)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu_gguf", "cpu_gguf-exact", "example"])
def test_backend_passes_end_to_end(backend, smollm2_gguf):
    cls, options = BACKENDS[backend]
    run_check("end_to_end", cls, options, model=str(smollm2_gguf))


class _OffByOneAttention:
    """Attends to one position too few: the classic off-by-one in a causal mask."""

    def __init__(self, inner):
        self.inner = inner

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        from dataclasses import replace

        import torch

        shorter = [max(1, n - 1) for n in meta.seq_lens_list]
        out = self.inner.forward(q, k, v, k_cache, v_cache, meta, scale)
        if meta.decode_only:  # recompute the decode rows without their last cached position
            meta = replace(meta, seq_lens=torch.tensor(shorter), seq_lens_list=shorter)
            out = self.inner.forward(q, k, v, k_cache, v_cache, meta, scale)
        return out


class BrokenBackend(ReferenceBackend):
    name = "broken"

    def attention(self):
        return _OffByOneAttention(super().attention())

    def allocate_kv_cache(self, spec):
        pool = super().allocate_kv_cache(spec)
        return pool[:-1] if len(pool) > 1 else pool  # one layer short, once there are several

    def available_kv_memory(self):
        return 1024**2  # claims a limit, then allocates past it anyway


def test_broken_backend_fails_with_a_readable_report():
    with pytest.raises(ConformanceFailure) as e:
        assert_conformant(BrokenBackend)
    report = str(e.value)
    assert "'broken' fails 2 of 4 conformance checks" in report
    assert "attention differs from the reference" in report and "query lengths [1, 1, 1, 1]" in report
    assert "kv_allocator: allocate_kv_cache returned 2 entries for 3 layers" in report
    assert "linear" not in report.split("checks:")[1]


def test_cpu_gguf_offers_the_host_memory_but_defaults_to_a_smaller_pool(monkeypatch):
    """What a backend can give (available_kv_memory, which the kit holds it to) is not the pool it
    takes by default (default_kv_memory): on a host with 64 GiB free, cpu_gguf's default stays
    4 GiB and an 8x request is still refused, not allocated."""
    import ember_cpu_gguf.backend as cpu

    monkeypatch.setattr(cpu, "host_memory_available", lambda: 64 * 2**30)
    backend = cpu.CpuGgufBackend()
    assert backend.available_kv_memory() == 64 * 2**30
    assert backend.default_kv_memory() == 4 * 2**30
    assert "refuse 8x" in run_check("kv_allocator", cpu.CpuGgufBackend)
    monkeypatch.setattr(cpu, "host_memory_available", lambda: 6 * 2**30)
    assert cpu.CpuGgufBackend().default_kv_memory() == 2 * 2**30  # a third of what is free
