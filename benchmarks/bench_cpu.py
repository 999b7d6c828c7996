"""ember against llama.cpp on the CPU: same GGUF file, same thread count, one run.

    python benchmarks/bench_cpu.py [--model smollm2] [--threads 2] [--json out.json]

Measures, for both: single-stream decode, prefill of a 512-token prompt, and decode throughput
at 1, 8, 32 and 64 sequences (128-token prompts, 128 generated tokens each), and prints the
ratios. llama.cpp's tools are found as benchmarks/llamacpp.py says (build them with
benchmarks/build_llamacpp.sh); without them ember's figures are printed alone.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BATCHES = (1, 8, 32, 64)


def ember_figures(model: str, threads: int, int8_activations: bool = False) -> dict:
    from ember.bench import throughput
    from ember.llm import LLM
    from ember.store import ModelStore

    path = ModelStore().resolve(model) if not Path(model).exists() else Path(model)
    llm = LLM(str(path), threads=threads, max_model_len=1024, kv_cache_memory=1024**3,
              int8_activations=int8_activations)
    out = {"backend": llm.engine.backend_info.name}
    throughput(llm, 1, 128, 16)  # a warm-up pass, as llama-bench makes: page faults, kernel builds
    single = throughput(llm, 1, 128, 128)
    out["decode_1"] = single["decode_tok_s"]
    out["prefill_512"] = throughput(llm, 1, 512, 1)["prefill_tok_s"]
    for n in BATCHES:
        out[f"batch_{n}"] = single["decode_tok_s"] if n == 1 else throughput(llm, n, 128, 128)["decode_tok_s"]
    return out, path


def llamacpp_figures(path: Path, threads: int) -> dict | None:
    import llamacpp

    try:
        out = {"version": llamacpp.version()}
        out["decode_1"] = llamacpp.bench_decode(path, threads, n=128)
        out["prefill_512"] = llamacpp.bench_prefill(path, threads, n=512)
        batched = llamacpp.bench_batched(path, threads, npl=list(BATCHES), npp=128, ntg=128)
        out.update({f"batch_{n}": batched[n] for n in BATCHES})
        return out
    except llamacpp.LlamaCppNotFound as e:
        print(f"llama.cpp not found, ember only: {e}", file=sys.stderr)
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def table(embers: dict[str, dict], ref: dict | None) -> str:
    """One column per ember configuration, then llama.cpp and the ratios to it."""
    rows = [("single-stream decode (tok/s)", "decode_1"), ("prefill, 512-token prompt (tok/s)", "prefill_512")]
    rows += [(f"decode throughput, {n} sequence{'s' if n > 1 else ''} (tok/s)", f"batch_{n}") for n in BATCHES]
    names = list(embers)
    head = [f"ember{n}" for n in names] + ["llama.cpp"] + [f"ember{n} / llama.cpp" for n in names]
    lines = ["| | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for label, key in rows:
        r = ref[key] if ref else None
        cells = [f"{embers[n][key]:.1f}" for n in names] + [f"{r:.1f}" if r else "–"]
        cells += [f"{embers[n][key] / r:.2f}×" if r else "–" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--int8-activations", action="store_true",
                    help="also measure ember with --int8-activations (llama.cpp's activation numerics)")
    ap.add_argument("--also", action="append", default=[], metavar="MODEL",
                    help="also measure ember on this model (a Hugging Face directory of the same model, "
                         "say), as one more column; repeatable")
    args = ap.parse_args()
    t0 = time.time()
    ember, path = ember_figures(args.model, args.threads)
    embers = {"": ember}
    if args.int8_activations:
        embers[" --int8-activations"] = ember_figures(args.model, args.threads, int8_activations=True)[0]
    also = {}
    for other in args.also:
        also[other] = embers[f" {Path(other).name}"] = ember_figures(other, args.threads)[0]
    ref = llamacpp_figures(path, args.threads) if path.is_file() else None  # llama.cpp reads GGUF files
    from ember_cpu_gguf import native

    result = {"model": str(path), "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "cpu": cpu_model(), "cpu_features": native.feature_names(), "kernels": native.selected()[0],
              "date": time.strftime("%Y-%m-%d"), "ember": ember,
              "ember_int8_activations": embers.get(" --int8-activations"), "ember_also": also, "llama.cpp": ref,
              "seconds": round(time.time() - t0, 1)}
    print(table(embers, ref))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
