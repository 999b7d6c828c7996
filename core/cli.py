"""The ``ember`` command: run, chat, pull/list/rm/show, plugins, bench."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="backend name or device type (default: auto)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--max-model-len", type=_positive_int, default=None, help="context length to serve")
    p.add_argument("--kv-cache-memory", type=_size, default=None, help="KV-cache size, e.g. 512M or 2G")
    p.add_argument("--exact", action="store_true", help="reference numerics only, no approximate fast paths")
    p.add_argument("--int8-activations", action="store_true",
                   help="multiply quantized weights by one int8 per activation, as llama.cpp: faster on "
                        "CPUs, slightly less faithful (default: about 16-bit activations)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="compute dtype (default: the backend's)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9,
                   help="share of the accelerator's memory to use for weights, activations and KV cache")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (accelerator backends)")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _length(s: str) -> int | tuple[int, int]:
    from ember.bench import parse_length

    try:
        return parse_length(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _size(s: str) -> int:
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    t = s.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        v = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 512M, 2G)") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {s!r}")
    return int(v)


def _make_llm(args, model_path):
    from ember.llm import LLM

    kw = dict(device=args.device, threads=args.threads, max_model_len=args.max_model_len, exact=args.exact,
              int8_activations=args.int8_activations,
              dtype=None if args.dtype == "auto" else args.dtype,
              gpu_memory_utilization=args.gpu_memory_utilization, eager=args.eager)
    if args.kv_cache_memory:
        kw["kv_cache_memory"] = args.kv_cache_memory
    return LLM(str(model_path), **kw)


def _ensure_model(name: str):
    """A stored model, a file path, or a catalogue name pulled on first use (like ``ollama run``)."""
    from ember.dummy import is_dummy
    from ember.store import ModelNotFound, ModelStore

    if is_dummy(name):  # random weights at a named shape: nothing to fetch
        return name
    store = ModelStore()
    try:
        return store.resolve(name)
    except ModelNotFound:
        return store.pull(name, progress=True)


DEFAULT_HOST = "127.0.0.1:8000"


def _server_url(host: str | None = None) -> str:
    host = host or os.environ.get("EMBER_HOST") or DEFAULT_HOST
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def _running_server(model: str):
    """The URL of a running ember server that serves `model`, or None (like `ollama run`)."""
    try:
        import httpx
    except ImportError:
        return None
    url = _server_url()
    headers = _auth_headers()
    try:
        r = httpx.get(f"{url}/v1/models", timeout=0.5, headers=headers)
        served = {m["id"] for m in r.json().get("data", [])} if r.status_code == 200 else set()
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    return url if model in served else None


def _auth_headers() -> dict:
    key = os.environ.get("EMBER_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _stream_from_server(url: str, model: str, messages: list[dict], args) -> str:
    import httpx

    options = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if args.seed is not None:
        options["seed"] = args.seed
    if args.max_tokens:
        options["num_predict"] = args.max_tokens
    body = {"model": model, "messages": messages, "stream": True, "options": options}
    text = []
    with httpx.stream("POST", f"{url}/api/chat", json=body, timeout=None, headers=_auth_headers()) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"server error {r.status_code}: {r.text}")
        for line in r.iter_lines():
            if not line:
                continue
            chunk = json.loads(line)
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            piece = chunk.get("message", {}).get("content", "")
            sys.stdout.write(piece)
            sys.stdout.flush()
            text.append(piece)
    sys.stdout.write("\n")
    return "".join(text)


def cmd_run(args) -> int:
    from ember.sampling_params import SamplingParams

    url = None if args.no_server else _running_server(args.model)
    if url is not None:
        if args.prompt:
            _stream_from_server(url, args.model, [{"role": "user", "content": " ".join(args.prompt)}], args)
            return 0
        return _chat_loop(lambda msgs: _stream_from_server(url, args.model, msgs, args))

    path = _ensure_model(args.model)
    llm = _make_llm(args, path)
    params = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                  max_tokens=args.max_tokens)
    if args.prompt:
        text = " ".join(args.prompt)
        _stream(llm, [{"role": "user", "content": text}], SamplingParams(**params), args.verbose)
        return 0
    return _chat_loop(lambda msgs: _stream(llm, msgs, SamplingParams(**params), args.verbose))


def _stream(llm, messages, params, verbose: bool) -> str:
    import time

    engine = llm.engine
    ids = llm.tokenizer.encode_chat(messages)
    t0 = time.perf_counter()
    rid = engine.add_request(ids, params)
    text, n = [], 0
    try:
        while True:
            outs = engine.step()
            for out in outs:
                o = out.outputs[0]
                if o.delta_text:
                    sys.stdout.write(o.delta_text)
                    sys.stdout.flush()
                    text.append(o.delta_text)
                n = len(o.token_ids)
                if out.finished:
                    sys.stdout.write("\n")
                    if verbose:
                        m = out.metrics
                        ttft = m.first_token_time - m.arrival_time
                        gen = (m.finished_time - m.first_token_time) or 1e-9
                        print(f"\nprompt: {len(ids)} tokens, first token {ttft * 1000:.0f} ms; "
                              f"{n} tokens in {time.perf_counter() - t0:.2f} s, "
                              f"{max(n - 1, 0) / gen:.1f} tokens/s decode", file=sys.stderr)
                    return "".join(text)
    except KeyboardInterrupt:
        engine.abort_request(rid)
        sys.stdout.write("\n")
        return "".join(text)


def _chat_loop(reply_to) -> int:
    messages: list[dict] = []
    print(">>> Send a message (/bye or Ctrl-D to leave)", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/bye", "/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = reply_to(messages)
        except (ValueError, RuntimeError) as e:  # e.g. the conversation outgrew the context
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args) -> int:
    try:
        from ember.server.serve import api_key_from_env, build_app, load_in_passing_thread, serve
    except ImportError as e:
        print(f"error: the server needs the serve extra (pip install 'ember[serve]'): {e}", file=sys.stderr)
        return 1
    from ember.store import ModelStore

    path = _ensure_model(args.model)
    llm = load_in_passing_thread(lambda: _make_llm(args, path))
    name = args.served_model_name or (args.model if not os.path.exists(args.model) else path.stem)
    app = build_app(llm, name, api_key=api_key_from_env(args.api_key), max_waiting=args.max_waiting,
                    max_body_bytes=args.max_body_bytes, store=ModelStore())
    print(f"ember serving {name} ({llm.engine.backend_info.name}) on http://{args.host}:{args.port} "
          f"(OpenAI API under /v1, Ollama API under /api)", file=sys.stderr)
    serve(app, host=args.host, port=args.port)
    return 0


def cmd_ps(args) -> int:
    import httpx

    url = _server_url(args.host)
    try:
        r = httpx.get(f"{url}/api/ps", timeout=2, headers=_auth_headers())
        r.raise_for_status()
    except httpx.HTTPError as e:
        print(f"no ember server answering at {url} ({e})", file=sys.stderr)
        return 1
    models = r.json().get("models", [])
    print(f"{'NAME':<24}{'SIZE':>10}  {'CONTEXT':>8}  PROCESSOR")
    for m in models:
        size = m.get("size", 0)
        print(f"{m.get('name', '?'):<24}{size / 1e6:>8.0f} MB  {m.get('context_length', '-'):>8}  "
              f"{m.get('processor', 'cpu')}")
    return 0


def cmd_plugins(args) -> int:
    from ember.plugins import get_registry

    infos = get_registry().all()

    def details(b) -> str:
        if b.cls is None:
            return ""
        try:
            return b.cls.details() or ""
        except Exception as e:  # a plugin's bug is reported, not fatal
            return f"details() raised {e!r}"

    extra = {b.name: details(b) for b in infos} if args.verbose or args.json else {}

    if args.json:
        print(json.dumps([{"name": b.name, "distribution": b.distribution, "version": b.version,
                           "device_type": b.device_type, "priority": b.priority,
                           "available": b.usable, "reason": b.availability.reason, "error": b.error,
                           "details": extra[b.name]}
                          for b in infos], indent=2))
        return 0
    if not infos:
        print("no backend plugins installed (pip install 'ember[cpu]')")
        return 0
    rows = [("BACKEND", "VERSION", "DEVICE", "PRIORITY", "AVAILABLE", "REASON")]
    for b in infos:
        rows.append((b.name, f"{b.distribution} {b.version}", b.device_type or "-", str(b.priority),
                     "yes" if b.usable else "no", b.availability.reason or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    for name, text in extra.items():
        if text:
            print(f"\n{name}: {text}")
    reg = get_registry()
    methods = [(m.name, "ember" if type(m).__module__.startswith("ember.") else type(m).__module__.split(".")[0],
                m.description or "-") for m in reg.quant_methods.values()]
    methods += [(f.name, f.plugin, f"refused: {f.error}") for f in reg.failed_quant_methods]
    if methods:
        print()
        rows = [("QUANT METHOD", "FROM", "READS")] + methods
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[2])
    return 0


def cmd_bench_throughput(args) -> int:
    from ember.bench import throughput

    path = _ensure_model(args.model)
    result = throughput(_make_llm(args, path), args.num_seqs, args.input_len, args.output_len, seed=args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ember import __version__, store_cli

    parser = argparse.ArgumentParser(prog="ember", description="Run LLMs locally, fast, on any hardware.")
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    parser.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a model: answer a prompt, or chat when none is given")
    p.add_argument("model", help="a model name (e.g. smollm2), a stored model or a .gguf path")
    p.add_argument("prompt", nargs="*", help="the prompt; omit it to chat")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=_positive_int, default=None)
    p.add_argument("--verbose", action="store_true", help="print timings")
    p.add_argument("--no-server", action="store_true", help="run in this process even if a server is up")
    _engine_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="serve a model over the OpenAI and Ollama HTTP APIs")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_positive_int, default=8000,
                   help="one port for both APIs (default 8000; use 11434 for Ollama clients' default)")
    p.add_argument("--api-key", default=None, help="require this Bearer token (or set EMBER_API_KEY)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-waiting", type=_positive_int, default=512,
                   help="requests allowed to wait; past it, 503 with Retry-After")
    p.add_argument("--max-body-bytes", type=_positive_int, default=4 * 1024 * 1024)
    _engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ps", help="models loaded by a running server")
    p.add_argument("--host", default=None, help=f"server address (default $EMBER_HOST or {DEFAULT_HOST})")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("plugins", help="list backend plugins and whether they can run here")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="also what each backend will run here and why")
    p.set_defaults(func=cmd_plugins)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    p = bsub.add_parser("throughput", help="offline throughput: N sequences of random prompts")
    p.add_argument("--model", required=True)
    p.add_argument("--num-seqs", type=_positive_int, default=64)
    p.add_argument("--input-len", type=_length, default=128, help="N, or MIN:MAX drawn per request")
    p.add_argument("--output-len", type=_length, default=128, help="N, or MIN:MAX drawn per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    _engine_args(p)
    p.set_defaults(func=cmd_bench_throughput)
    bench.set_defaults(func=lambda a: (bench.print_help(), 2)[1])

    store_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, LookupError, RuntimeError, OSError) as e:
        # user-facing errors (bad model file, unknown model, no backend): a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        if args.log_level.upper() == "DEBUG":
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
