"""pytest-benchmark suite: ember against llama.cpp on the same GGUF file and thread count.

    pip install -e ".[cpu,bench]"
    LLAMA_CPP_BIN=DIR/bin python -m pytest benchmarks -p no:randomly --benchmark-columns=mean,rounds

Options: --model (a store name or a .gguf path; default smollm2), --threads (default 2). llama.cpp's
tools come from benchmarks/build_llamacpp.sh (or `pip install llama-cpp-python` for single-stream
and prefill figures); without them the llama.cpp cases skip and ember's figures print alone. Each
case records tok/s in the benchmark's extra_info; the end of the run prints ember / llama.cpp
ratios for every case both sides measured.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

FIGURES: dict[tuple[str, str], float] = {}  # (case, "ember" | "llama.cpp") -> tok/s


def pytest_addoption(parser):
    parser.addoption("--model", default="smollm2", help="model store name or GGUF path")
    parser.addoption("--threads", type=int, default=2)


@pytest.fixture(scope="session")
def model_path(request) -> Path:
    from ember.store import ModelStore

    m = request.config.getoption("--model")
    return Path(m) if Path(m).exists() else ModelStore().resolve(m)


@pytest.fixture(scope="session")
def threads(request) -> int:
    return request.config.getoption("--threads")


def record(benchmark, case: str, side: str, tok_s: float) -> None:
    benchmark.extra_info["tok_s"] = tok_s
    FIGURES[(case, side)] = tok_s


def pytest_terminal_summary(terminalreporter):
    cases = sorted({c for c, _ in FIGURES}, key=lambda c: list(dict.fromkeys(c for c, _ in FIGURES)).index(c))
    if not cases:
        return
    tr = terminalreporter
    tr.section("ember / llama.cpp (tok/s)")
    tr.write_line(f"{'case':32} {'ember':>10} {'llama.cpp':>10} {'ratio':>8}")
    for c in cases:
        e, r = FIGURES.get((c, "ember")), FIGURES.get((c, "llama.cpp"))
        ratio = f"{e / r:.2f}x" if e and r else "-"
        tr.write_line(f"{c:32} {e or float('nan'):10.1f} {r or float('nan'):10.1f} {ratio:>8}")
