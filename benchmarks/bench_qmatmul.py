"""cpu_gguf's quantized matmul alone: how fast a model's worth of layers streams.

    python benchmarks/bench_qmatmul.py [--type Q4_1] [--threads 2] [--rows 1] [--int8-activations]

Builds SmolLM2-135M's four per-layer matrices (qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536) with random weights of one GGUF type, then times, best of 5:
  * 30 distinct layers back to back (66 MB for Q4_1: more than the last-level cache, so the weights
    come from memory, as in a decode step), and
  * one layer over and over (2.2 MB: from the caches, so the integer work alone),
each as GB/s of weights read and GMAC/s, at `--rows` activation rows (1: one decode stream).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def main() -> int:
    from gguf import GGMLQuantizationType
    from quant_inputs import weight

    from ember_cpu_gguf import native
    from ember_cpu_gguf.packed import PackedLinear

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="Q4_1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--int8-activations", action="store_true")
    args = ap.parse_args()
    qtype = GGMLQuantizationType[args.type]
    print(f"kernels: {native.selected()[0]}, {args.type}, {args.threads} threads, {args.rows} rows"
          f"{', one activation term' if args.int8_activations else ''}")
    xs = {c: np.random.default_rng(0).standard_normal((args.rows, c)).astype(np.float32) for c in (576, 1536)}
    ys = {r: np.empty((args.rows, r), np.float32) for r, _ in SHAPES}
    for label, n_layers, passes in (("30 layers, from memory", 30, 10), ("1 layer, from cache", 1, 300)):
        layers = [[PackedLinear([weight(qtype, r, c, 100 * i + j)], threads=args.threads,
                                one_term=args.int8_activations) for j, (r, c) in enumerate(SHAPES)]
                  for i in range(n_layers)]
        nbytes = sum(p.nbytes for layer in layers for p in layer)
        macs = n_layers * args.rows * sum(r * c for r, c in SHAPES)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(max(1, passes // args.rows)):
                for layer in layers:
                    for p, (r, c) in zip(layer, SHAPES):
                        p.run(xs[c].ctypes.data, c, args.rows, ys[r].ctypes.data)
            best = min(best, (time.perf_counter() - t0) / max(1, passes // args.rows))
        print(f"{label}: {best * 1e3:.3f} ms a pass over {nbytes / 1e6:.1f} MB: {nbytes / best / 1e9:.1f} GB/s, "
              f"{macs / best / 1e9:.1f} GMAC/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
