"""Seconds from starting `ember run` to the first byte of its answer on stdout, on a warm file cache.

    python benchmarks/first_token.py [--model smollm2] [--threads 2] [--runs 7]

Spawns the CLI afresh each run (`--no-server`, so the model loads in that process), reads until the
first byte arrives, and prints every run and the median. The first run warms the page cache and
the kernel cache and is left out of the median.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def one_run(model: str, threads: int) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "ember.cli", "run", model, "Name the capital of France.", "--no-server",
           "--max-tokens", "8", "--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    rest, err = proc.stdout.read(), proc.stderr.read()  # not communicate(): it drops what read(1) buffered
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"ember run failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return elapsed, (first + rest).decode(errors="replace").strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    times = []
    for i in range(args.runs + 1):
        elapsed, text = one_run(args.model, args.threads)
        print(f"{'warm-up' if i == 0 else f'run {i}':>8}: {elapsed:.3f} s  {text[:50]!r}")
        if i:
            times.append(elapsed)
    print(f"median of {len(times)}: {statistics.median(times):.3f} s to the first byte")


if __name__ == "__main__":
    main()
