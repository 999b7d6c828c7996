"""Serving benchmark: N concurrent streaming clients against an OpenAI-compatible server.

    python benchmarks/bench_serve.py --clients 32 --requests 64 --max-tokens 128 \\
        [--model smollm2] [--threads 2] [--target ember|llama-server|both] [--json OUT]

Each of ``--clients`` clients (closed loop: it sends its next request when the previous one
ends) takes requests from one shared list of ``--requests`` chat prompts, drawn from a fixed,
seeded set of varied prompts (different lengths, some with a system message, some multi-turn),
and POSTs them to ``/v1/chat/completions`` with ``stream: true``, ``max_tokens`` and
``ignore_eos: true`` (both ember and llama-server honour it), greedy by default, so every
request generates exactly ``--max-tokens`` tokens on either server.

Measured over the load (after one warm-up request per server):

* request throughput (completed requests / wall time of the load),
* output and total (prompt + output) token throughput; tokens are the server's ``usage`` from
  the final chunk (``stream_options.include_usage``), else one per content chunk,
* TTFT (request sent -> first content chunk) and ITL (gaps between content chunks, every gap
  of every request pooled), p50/p90/p99, and TPOT per request ((latency - TTFT) / (tokens - 1)),
* errors (HTTP errors, broken streams) and short requests (fewer tokens than asked).

``--target both`` starts ``ember serve MODEL`` itself (a subprocess, ready when ``GET /health``
answers 200), runs the load, stops it, then does the same with llama.cpp's ``llama-server``
(``benchmarks/llamacpp.py``: ``-np CLIENTS`` slots, a context of CLIENTS x (prompt + output))
on the same GGUF file and thread count, and prints both with ember / llama-server ratios.
``--url`` measures a server that is already running instead (one target).
``--wait-idle`` waits for an idle machine before each load (use it for figures you publish).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

TARGETS = ("ember", "llama-server")

# --------------------------------------------------------------------------- prompts

_SUBJECTS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest", "the water cycle",
    "how vaccines work", "the history of the printing press", "plate tectonics", "sourdough bread",
    "the rules of chess", "public-key cryptography", "the Roman aqueducts", "honeybee colonies",
    "jazz improvisation", "the immune system", "supply and demand", "the Apollo 11 mission",
    "coral reefs", "how a compiler works", "the Great Wall of China", "volcanoes", "tides",
    "the human heart", "recycling plastics", "solar panels", "migratory birds", "the Silk Road",
    "electric cars", "the Pythagorean theorem", "climate change", "octopuses", "the Renaissance",
]
_TASKS = [
    "Explain {s} to a ten-year-old.",
    "Write a short poem about {s}.",
    "Give me three surprising facts about {s}.",
    "What are the main arguments for and against {s} as a school topic?",
    "Summarize {s} in one paragraph.",
    "Write a short story that involves {s}.",
    "List five questions a student might ask about {s}, with brief answers.",
    "Describe {s} as if you were a tour guide.",
    "Compare {s} with {t} and explain what they have in common.",
    "I am preparing a lecture on {s}. Outline the key points I should cover, the common "
    "misconceptions students have, and a simple demonstration or example I could use in class.",
    "Write an email to a friend recommending a documentary about {s}.",
    "What would change in everyday life if nobody had ever heard of {s}?",
]
_SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer clearly.",
    "You are a friendly teacher who explains things step by step with examples.",
]


def make_prompts(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` chat message lists, the same for a given seed: varied tasks, subjects and lengths;
    about a third have a system message and about a sixth are a short multi-turn conversation."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s, t = rng.sample(_SUBJECTS, 2)
        msgs: list[dict] = []
        if rng.random() < 0.35:
            msgs.append({"role": "system", "content": rng.choice(_SYSTEMS)})
        if rng.random() < 0.17:
            msgs.append({"role": "user", "content": f"Tell me about {t}."})
            msgs.append({"role": "assistant", "content": f"{t[0].upper() + t[1:]} is a broad topic; "
                                                         "what would you like to know?"})
        msgs.append({"role": "user", "content": rng.choice(_TASKS).format(s=s, t=t)})
        out.append(msgs)
    return out


# --------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    start: float = 0.0            # perf_counter when sent
    ttft: float | None = None     # s to the first content chunk
    latency: float | None = None  # s to the end of the stream
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of each content chunk
    content_chunks: int = 0
    text_len: int = 0
    prompt_tokens: int | None = None       # from usage
    completion_tokens: int | None = None   # from usage

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.content_chunks


async def one_request(client, url: str, model: str, messages: list[dict], max_tokens: int,
                      temperature: float, seed: int, extra: dict) -> RequestResult:
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True,
            "temperature": temperature, "seed": seed, **extra}
    r = RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                r.error = f"HTTP {resp.status_code}: {text[:300]}"
                return r
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    r.error = f"bad SSE data: {data[:200]}"
                    return r
                if "error" in chunk:
                    r.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return r
                for ch in chunk.get("choices") or []:
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        if r.ttft is None:
                            r.ttft = now - r.start
                        r.chunk_times.append(now)
                        r.content_chunks += 1
                        r.text_len += len(content)
                usage = chunk.get("usage")
                if usage:
                    r.prompt_tokens = usage.get("prompt_tokens")
                    r.completion_tokens = usage.get("completion_tokens")
            r.latency = time.perf_counter() - r.start
            if not done:
                r.error = "stream ended without [DONE]"
                return r
            if r.ttft is None:
                r.error = "no content in the stream"
                return r
            r.ok = True
    except (httpx.HTTPError, OSError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run_load(base_url: str, model: str, prompts: list[list[dict]], clients: int, max_tokens: int,
                   temperature: float = 0.0, timeout: float = 1800, extra: dict | None = None,
                   warmup: bool = True, server_pid: int | None = None) -> tuple[list[RequestResult], dict]:
    """Send ``prompts`` with ``clients`` concurrent closed-loop clients.

    Returns (results in prompt order, CPU accounting of the load: ``wall_s``, ``client_cpu_s``
    (this process), ``server_cpu_s`` (``server_pid``, when given), ``machine_cpu_s`` (all CPUs,
    busy time) and ``other_busy_frac``: the share of the machine's CPU time used by anything
    else, i.e. how contended the measurement was)."""
    import httpx

    url = base_url.rstrip("/") + "/v1/chat/completions"
    extra = extra or {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    tmo = httpx.Timeout(timeout, connect=30)
    async with httpx.AsyncClient(limits=limits, timeout=tmo) as client:
        if warmup:
            w = await one_request(client, url, model, [{"role": "user", "content": "Say hello."}],
                                  min(max_tokens, 16), temperature, 0, extra)
            if not w.ok:
                raise RuntimeError(f"warm-up request to {url} failed: {w.error}")
        queue: asyncio.Queue = asyncio.Queue()
        for i, p in enumerate(prompts):
            queue.put_nowait((i, p))
        results: list[RequestResult | None] = [None] * len(prompts)

        async def worker():
            while True:
                try:
                    i, p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results[i] = await one_request(client, url, model, p, max_tokens, temperature, i, extra)

        m0, s0 = machine_busy_s(), process_cpu_s(server_pid)
        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(min(clients, len(prompts)))))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        m1, s1 = machine_busy_s(), process_cpu_s(server_pid)
    acc = {"wall_s": wall, "client_cpu_s": round(cpu, 2)}
    if s0 is not None and s1 is not None:
        acc["server_cpu_s"] = round(s1 - s0, 2)
    if m0 is not None and m1 is not None:
        acc["machine_cpu_s"] = round(m1 - m0, 2)
        if "server_cpu_s" in acc:
            other = (m1 - m0) - (s1 - s0) - cpu
            acc["other_busy_frac"] = round(max(0.0, other) / (wall * (os.cpu_count() or 1)), 3)
    return [r for r in results if r is not None], acc


def machine_busy_s() -> float | None:
    """CPU seconds all CPUs have been busy since boot (psutil; None without it)."""
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads) and its children."""
    if pid is None:
        return None
    try:
        import psutil

        p = psutil.Process(pid)
        total = sum(p.cpu_times()[:4])  # user, system, children_user, children_system
        for c in p.children(recursive=True):
            try:
                total += sum(c.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return total
    except (ImportError, Exception):
        return None


# --------------------------------------------------------------------------- statistics


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (as numpy's default), q in [0, 100]."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[RequestResult], wall: float, max_tokens: int) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tok = sum(r.output_tokens for r in ok)
    usage = all(r.completion_tokens is not None for r in ok) and bool(ok)
    prompt_tok = sum(r.prompt_tokens or 0 for r in ok)
    errors = [r.error for r in results if not r.ok]
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    res = {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "wall_s": round(wall, 3),
        "request_throughput_req_s": round(len(ok) / wall, 4),
        "output_tok_s": round(out_tok / wall, 2),
        "total_tok_s": round((prompt_tok + out_tok) / wall, 2) if usage else None,
        "output_tokens": out_tok,
        "prompt_tokens": prompt_tok if usage else None,
        "token_count_source": "usage" if usage else "chunks",
        "short_requests": sum(r.output_tokens < max_tokens for r in ok),
        # requests whose content-chunk count differs from usage.completion_tokens (a server that
        # merges tokens into one chunk, or sends empty chunks for special tokens)
        "chunk_usage_mismatch": sum(r.completion_tokens is not None and r.completion_tokens != r.content_chunks
                                    for r in ok),
        "mean_content_chunks": round(statistics.fmean(r.content_chunks for r in ok), 2) if ok else None,
        "mean_tpot_ms": ms(statistics.fmean(tpot)) if tpot else None,
        "mean_e2e_latency_ms": ms(statistics.fmean(r.latency for r in ok)) if ok else None,
    }
    for name, xs in (("ttft", ttft), ("itl", itl)):
        for q in (50, 90, 99):
            res[f"{name}_p{q}_ms"] = ms(percentile(xs, q))
        res[f"{name}_mean_ms"] = ms(statistics.fmean(xs)) if xs else None
    for q in (50, 90, 99):
        res[f"tpot_p{q}_ms"] = ms(percentile(tpot, q))
    return res


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ember_bin() -> str:
    here = Path(sys.executable).with_name("ember")
    return str(here) if here.exists() else (shutil.which("ember") or "ember")


def start_ember(model: str, threads: int, port: int, log: Path, extra_args: list[str]) -> subprocess.Popen:
    import llamacpp

    cmd = [ember_bin(), "serve", model, "--port", str(port), "--threads", str(threads), *extra_args]
    print(f"$ {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        llamacpp.wait_healthy(proc, f"http://127.0.0.1:{port}/health", timeout=600, log=log)
    except (RuntimeError, TimeoutError):
        stop(proc)
        raise
    return proc


def start_llama_server(path: Path, threads: int, parallel: int, port: int, ctx_per_slot: int,
                       log: Path, extra_args: list[str]) -> subprocess.Popen:
    import llamacpp

    print(f"$ llama-server -m {path} -t {threads} -np {parallel} -c {parallel * ctx_per_slot} "
          f"--port {port} {' '.join(extra_args)}", file=sys.stderr)
    return llamacpp.start_server(path, threads, parallel=parallel, port=port, ctx_per_slot=ctx_per_slot,
                                 extra_args=extra_args, log_file=log, timeout=300)


def model_path(model: str) -> Path:
    if Path(model).is_file():
        return Path(model)
    from ember.store import ModelStore

    return Path(ModelStore().resolve(model))


def ctx_per_slot_for(prompts: list[list[dict]], max_tokens: int) -> int:
    """A per-slot context that surely holds the longest prompt (with chat template) + output:
    about 4 characters a token for English with a GPT-2-style BPE; we allow 2, plus 16 tokens of
    template per message, rounded up to 256."""
    longest = max(sum(len(m["content"]) // 2 + 16 for m in p) for p in prompts)
    need = longest + max_tokens + 64
    return int(math.ceil(need / 256) * 256)


def wait_idle(enabled: bool) -> None:
    if not enabled:
        return
    import llamacpp

    t0 = time.monotonic()
    if not llamacpp.wait_for_idle(max_busy=0.10, window=3.0, timeout=1800):
        print("warning: the machine did not become idle; measuring anyway", file=sys.stderr)
    else:
        print(f"machine idle after {time.monotonic() - t0:.0f}s", file=sys.stderr)


def bench_target(target: str, args, prompts: list[list[dict]], path: Path | None) -> dict:
    """Start the server for ``target`` (unless --url), run the load, stop it."""
    logdir = Path(args.log_dir)
    logdir.mkdir(parents=True, exist_ok=True)
    proc = None
    if args.url:
        base = args.url
    else:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = logdir / f"bench_serve-{target}.log"
        log.write_bytes(b"")
        t0 = time.time()
        if target == "ember":
            proc = start_ember(args.model, args.threads, port, log, args.ember_args.split())
        else:
            proc = start_llama_server(path, args.threads, args.clients, port,
                                      ctx_per_slot_for(prompts, args.max_tokens), log,
                                      args.llama_args.split())
        print(f"{target} up on {base} after {time.time() - t0:.1f}s (log {log})", file=sys.stderr)
    contended = []
    try:
        for attempt in range(args.retries + 1):
            wait_idle(args.wait_idle)
            results, acc = asyncio.run(run_load(base, args.served_model_name or args.model, prompts,
                                                args.clients, args.max_tokens, args.temperature,
                                                warmup=attempt == 0,
                                                server_pid=proc.pid if proc is not None else None))
            other = acc.get("other_busy_frac")
            if not args.wait_idle or other is None or other <= args.max_other or attempt == args.retries:
                break
            contended.append(other)
            print(f"{target}: other processes used {other:.0%} of the CPUs during the load; "
                  f"waiting for an idle machine and measuring again", file=sys.stderr)
    finally:
        if proc is not None:
            stop(proc)
    s = summarize(results, acc["wall_s"], args.max_tokens)
    s.update({k: v for k, v in acc.items() if k != "wall_s"})
    s["discarded_contended_runs"] = contended
    s["target"] = target
    s["url"] = base
    return s


# --------------------------------------------------------------------------- report

ROWS = [
    ("completed / errors", None),
    ("request throughput (req/s)", "request_throughput_req_s"),
    ("output token throughput (tok/s)", "output_tok_s"),
    ("total token throughput (tok/s)", "total_tok_s"),
    ("TTFT p50 (ms)", "ttft_p50_ms"),
    ("TTFT p90 (ms)", "ttft_p90_ms"),
    ("TTFT p99 (ms)", "ttft_p99_ms"),
    ("ITL p50 (ms)", "itl_p50_ms"),
    ("ITL p90 (ms)", "itl_p90_ms"),
    ("ITL p99 (ms)", "itl_p99_ms"),
    ("TPOT mean (ms)", "mean_tpot_ms"),
    ("end-to-end latency mean (ms)", "mean_e2e_latency_ms"),
    ("wall time of the load (s)", "wall_s"),
    ("server CPU (s)", "server_cpu_s"),
    ("benchmark client CPU (s)", "client_cpu_s"),
    ("CPU share used by other processes", "other_busy_frac"),
]


def table(res: dict[str, dict]) -> str:
    names = [t for t in TARGETS if t in res]
    both = len(names) == 2
    head = "| | " + " | ".join(names) + (" | ember / llama-server |" if both else " |")
    lines = [head, "|---|" + "---:|" * (len(names) + both)]
    for label, key in ROWS:
        if key is None:
            cells = [f"{res[n]['completed']} / {res[n]['errors']}" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + (" | |" if both else " |"))
            continue
        vals = [res[n].get(key) for n in names]
        cells = ["–" if v is None else (f"{v:.3f}" if key.startswith("request") or key == "other_busy_frac" else f"{v:.1f}") for v in vals]
        ratio = ""
        if both:
            a, b = vals
            ratio = f" {a / b:.2f}× |" if a and b and key != "other_busy_frac" else " – |"
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + ratio)
    if both:
        lines.append("\nRatios are ember / llama-server: above 1 is better for throughput, below 1 for "
                     "latency (TTFT, ITL, TPOT).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    ap.add_argument("--requests", type=int, default=64, help="requests in all")
    ap.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (EOS ignored)")
    ap.add_argument("--model", default="smollm2", help="ember model name (or a .gguf path)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", choices=[*TARGETS, "both"], default="both")
    ap.add_argument("--url", default=None, help="measure this running server instead of starting one")
    ap.add_argument("--served-model-name", default=None, help="model field of the requests (default --model)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt set")
    ap.add_argument("--wait-idle", action="store_true", help="wait for an idle machine before each load")
    ap.add_argument("--max-other", type=float, default=0.10,
                    help="with --wait-idle: measure again when other processes used more than this "
                         "share of the CPUs during the load (default 0.10)")
    ap.add_argument("--retries", type=int, default=3, help="with --wait-idle: at most this many re-measurements")
    ap.add_argument("--ember-args", default="", help="extra arguments for `ember serve`")
    ap.add_argument("--llama-args", default="", help="extra arguments for llama-server")
    ap.add_argument("--log-dir", default="/tmp", help="where the servers' logs go")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.url and args.target == "both":
        ap.error("--url measures one server: give --target ember or --target llama-server")

    prompts = make_prompts(args.requests, args.seed)
    targets = list(TARGETS) if args.target == "both" else [args.target]
    path = None if args.url else model_path(args.model)
    t0 = time.time()
    res: dict[str, dict] = {}
    for t in targets:
        res[t] = bench_target(t, args, prompts, path)
        print(json.dumps(res[t]), file=sys.stderr)
    print(table(res))
    odd = []
    for t, s in res.items():
        if s["errors"]:
            odd.append(f"{t}: {s['errors']} errors, e.g. {s['error_samples'][:2]}")
        if s["short_requests"]:
            odd.append(f"{t}: {s['short_requests']} requests produced fewer than {args.max_tokens} tokens")
        if (s.get("other_busy_frac") or 0) > args.max_other:
            odd.append(f"{t}: other processes used {s['other_busy_frac']:.0%} of the CPUs during the load: "
                       "its figures are not reliable")
        if s["token_count_source"] != "usage":
            odd.append(f"{t}: no usage in the stream; tokens counted by content chunks")
        if s["chunk_usage_mismatch"]:
            # a server that holds back an incomplete UTF-8 character sends it with the next token,
            # so fewer chunks than tokens is normal; ITL gaps then span two tokens
            odd.append(f"{t}: {s['chunk_usage_mismatch']} requests streamed fewer (or more) content chunks than "
                       f"usage tokens (mean {s['mean_content_chunks']} chunks; held-back partial characters "
                       f"merge two tokens into one chunk)")
    if len(res) == 2 and res["ember"]["prompt_tokens"] and res["llama-server"]["prompt_tokens"] \
            and res["ember"]["prompt_tokens"] != res["llama-server"]["prompt_tokens"]:
        odd.append(f"prompt tokens differ: ember {res['ember']['prompt_tokens']}, "
                   f"llama-server {res['llama-server']['prompt_tokens']}")
    for line in odd:
        print(f"note: {line}")
    if args.json:
        import llamacpp

        try:
            ver = llamacpp.version() if "llama-server" in res else None
        except llamacpp.LlamaCppNotFound:
            ver = None
        result = {"model": str(path) if path else args.model, "threads": args.threads,
                  "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
                  "temperature": args.temperature, "prompt_seed": args.seed,
                  "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                  "date": time.strftime("%Y-%m-%d"), "wait_idle": args.wait_idle,
                  "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
                  "llama_cpp": {k: v for k, v in (ver or {}).items() if k != "raw"} or None,
                  "results": res, "notes": odd, "seconds": round(time.time() - t0, 1)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(s["completed"] for s in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
