"""Ollama's REST API under /api, over the same AsyncEngine as the OpenAI routes.

Field names, defaults, streaming shape (NDJSON, a final chunk with nanosecond timings) and error
bodies (``{"error": "..."}``) follow Ollama's docs/api.md, so that the official clients and the
tools built on them work unchanged. Where ember cannot do what Ollama does, the request fails
with a 4xx saying so, rather than being quietly answered differently; the few exceptions (a
fixed context window, never unloading) are noted where they are handled.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ember import __version__
from ember.engine.async_engine import EngineDead
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams, StructuredOutput
from ember.server.ollama_protocol import (
    _ERRORS,
    DEFAULT_MIN_P,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    NDJSON,
    OllamaChatRequest,
    OllamaChatResponse,
    OllamaErrorResponse,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaListResponse,
    OllamaModelDetails,
    OllamaOptions,
    OllamaProcessResponse,
    OllamaProgressResponse,
    OllamaPullRequest,
    OllamaShowRequest,
    OllamaShowResponse,
    OllamaVersionResponse,
    _streamed,
)

log = logging.getLogger(__name__)


# Ollama's keep_alive of "forever" is the largest Go duration from now; ember never unloads.
_FOREVER = _dt.timedelta(microseconds=(2**63 - 1) // 1000)
# Long metadata arrays (the vocabulary, merges) are left out of /api/show unless verbose, as
# Ollama does: they are megabytes of JSON nobody reads.
_SHOW_ARRAY_LIMIT = 64
# How often a pull reports download progress; a chunk arrives every MiB.
_PULL_PROGRESS_INTERVAL_S = 0.1
# A pull that fails this quickly (unknown name, bad path) gets a real HTTP status instead of
# an error line inside a 200 stream.
_PULL_FAST_FAIL_S = 0.5

router = APIRouter(prefix="/api", tags=["ollama"])


# --------------------------------------------------------------------------------------------
# helpers


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _norm(name: str) -> str:
    name = name.strip().lower()
    return name[: -len(":latest")] if name.endswith(":latest") else name


def _not_served(request: Request, name: str) -> JSONResponse | None:
    """None when `name` is the served model; else Ollama's 404 (clients match on the text)."""
    served = request.app.state.model_name
    if _norm(name) == _norm(served):
        return None
    store = request.app.state.store
    if store is not None and _in_store(store, name):
        # ember serves one model per process and cannot swap it in the way Ollama would.
        return _error(404, f"model '{name}' not found: this server serves only '{served}' "
                           f"(start another with `ember serve {name}`)")
    return _error(404, f"model '{name}' not found")


def _in_store(store, name: str) -> bool:
    # By manifest, not store.resolve: that also takes file paths, and a client must not be able
    # to probe (or have parsed) arbitrary files on the server through a model name.
    try:
        store.manifest(name)
        return True
    except Exception:
        return False


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _stats(t0: float, out: RequestOutput) -> dict:
    m = out.metrics
    end = time.time()
    if m is None:
        return {"total_duration": _ns(end - t0), "prompt_eval_count": len(out.prompt_token_ids),
                "eval_count": len(out.outputs[0].token_ids)}
    scheduled = m.first_scheduled_time or m.arrival_time
    first = m.first_token_time or scheduled
    finished = m.finished_time or end
    return {
        "total_duration": _ns(end - t0),
        "load_duration": _ns(scheduled - t0),
        "prompt_eval_count": len(out.prompt_token_ids),
        "prompt_eval_duration": _ns(first - scheduled),
        "eval_count": len(out.outputs[0].token_ids),
        "eval_duration": _ns(finished - first),
    }


# The engine's stop_reason for a grammar that failed mid-output (ember.engine.llm_engine).
_GRAMMAR_FAILED = "structured_output_error"
_GRAMMAR_FAILED_MESSAGE = "structured output failed: the output could not be completed under the format"


def _grammar_failed(out: RequestOutput) -> bool:
    return out.outputs[0].stop_reason == _GRAMMAR_FAILED


def _done_reason(out: RequestOutput) -> str:
    reason = out.outputs[0].finish_reason
    return "length" if reason == "length" else "stop"


def _structured(fmt) -> StructuredOutput | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return StructuredOutput(json_object=True)
    _check_schema(fmt)
    return StructuredOutput(json_schema=fmt)


def _check_schema(schema: dict) -> None:
    try:
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for
    except ImportError:  # not a server dependency: the grammar compiler still rejects nonsense
        return
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        raise ValueError(f"format is not a valid JSON schema: {e.message}") from None


def _sampling_params(opts: OllamaOptions | None, fmt, prompt_len: int, engine) -> SamplingParams:
    o = opts or OllamaOptions()
    ctx = engine.max_model_len
    # ember's context is fixed when the server starts. A smaller num_ctx is honoured as a limit;
    # a larger one gets the server's, as Ollama clamps num_ctx to what the model was trained on.
    if o.num_ctx is not None and 0 < o.num_ctx < ctx:
        ctx = o.num_ctx
    kv = getattr(getattr(engine, "engine", None), "kv_capacity_tokens", None)
    limit = min(ctx, kv) if isinstance(kv, int) and kv > 0 else ctx
    room = limit - prompt_len
    if room < 1:
        raise ValueError(f"the prompt is {prompt_len} tokens and the context window is {limit}: "
                         "no room to generate (shorten the prompt or raise num_ctx)")
    if o.seed is not None and o.seed >= 2**63:
        raise ValueError(f"seed must fit in a signed 64-bit integer; got {o.seed}")
    n = o.num_predict
    if n is None or n in (-1, -2, 0):
        # -1 (and Ollama's runners, 0) mean "no limit"; without context shifting that is the
        # end of the context, which is also what -2 ("fill the context") asks for.
        max_tokens = room
    elif n > 0:
        max_tokens = min(n, room)
    else:
        raise ValueError(f"num_predict must be positive, -1 (no limit) or -2 (fill the context); got {n}")

    top_k = DEFAULT_TOP_K if o.top_k is None else max(0, o.top_k)
    top_p = DEFAULT_TOP_P if o.top_p is None else o.top_p
    if top_p <= 0.0:
        top_p, top_k = 1.0, 1  # llama.cpp keeps at least one token: top_p 0 is greedy
    top_p = min(top_p, 1.0)
    repeat = DEFAULT_REPEAT_PENALTY if o.repeat_penalty is None else o.repeat_penalty
    presence = o.presence_penalty or 0.0
    frequency = o.frequency_penalty or 0.0
    if o.repeat_last_n == 0:  # llama.cpp: a zero window turns every penalty off
        repeat, presence, frequency = 1.0, 0.0, 0.0
    stop = [o.stop] if isinstance(o.stop, str) else list(o.stop or [])
    return SamplingParams(
        temperature=DEFAULT_TEMPERATURE if o.temperature is None else o.temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=DEFAULT_MIN_P if o.min_p is None else o.min_p,
        repetition_penalty=repeat,
        presence_penalty=presence,
        frequency_penalty=frequency,
        seed=o.seed if o.seed is not None and o.seed >= 0 else None,
        max_tokens=max_tokens,
        stop=[s for s in stop if s],
        structured=_structured(fmt),
    )


async def _start(engine, ids: list[int], params: SamplingParams):
    """Submit a request and wait for its first output, so that a request the engine refuses
    (bad parameters, full queue) fails with a status code before any response has begun."""
    rid = f"ollama-{uuid.uuid4().hex[:16]}"
    agen = engine.generate(ids, params, rid)
    try:
        first = await agen.__anext__()
    except BaseException:
        await agen.aclose()
        raise
    return rid, agen, first


async def _close(engine, rid: str, agen, finished: bool) -> None:
    if not finished:
        # Synchronous, so it happens even when the task is being cancelled (client gone) and
        # the aclose below never gets to run its cleanup.
        engine.abort(rid)
    try:
        await agen.aclose()
    except RuntimeError:  # still running in a task being cancelled, whose own exit aborts it
        pass


async def _until_disconnected(request: Request) -> None:
    # Request.is_disconnected() only sees a disconnect that is already queued, and behind the
    # app's http middleware none ever is; a receive that is left to wait does see it.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work):
    """Await `work` (a coroutine), or cancel it once the client has gone. Returns (result,
    True) or (None, False). For answers that are not streamed, whose handler the server does
    not cancel by itself when the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled (shutdown): take the work along
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result(), True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # let its cleanup (the abort) run
    return None, False


async def _respond(request: Request, ids: list[int], params: SamplingParams, stream: bool,
                   piece: Callable[[str], dict], final: Callable[[RequestOutput, str], dict]):
    """Run one request and answer it as Ollama does: NDJSON chunks then a final one, or a
    single object. `piece(text)` builds a chunk, `final(out, text)` the last object."""
    engine = request.app.state.engine
    rid, agen, first = await _start(engine, ids, params)

    if not stream:
        async def drain() -> RequestOutput:
            out = first
            while not out.finished:
                out = await agen.__anext__()
            return out

        out = None
        try:
            out, listening = await _unless_disconnected(request, drain())
            if not listening:
                return JSONResponse({}, status_code=499)  # nobody is there to read it
        finally:
            await _close(engine, rid, agen, out is not None)
        if _grammar_failed(out):
            return _error(500, _GRAMMAR_FAILED_MESSAGE)
        return JSONResponse(final(out, out.outputs[0].text))

    async def body() -> AsyncIterator[bytes]:
        finished = first.finished
        try:
            out = first
            while True:
                delta = out.outputs[0].delta_text
                if delta:
                    yield _line(piece(delta))
                if out.finished:
                    finished = True
                    yield _line({"error": _GRAMMAR_FAILED_MESSAGE} if _grammar_failed(out) else final(out, ""))
                    return
                out = await agen.__anext__()
        except EngineDead as e:
            # Ollama reports an error after the stream began as one more line.
            finished = True
            yield _line({"error": str(e)})
        finally:
            await _close(engine, rid, agen, finished)

    return StreamingResponse(body(), media_type=NDJSON)


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _unsupported_think(model: str, think) -> JSONResponse | None:
    if think is True or (isinstance(think, str) and think not in ("", "false")):
        return _error(400, f"'{model}' does not support thinking")
    return None


def _load_reason(keep_alive) -> str:
    # An empty request is Ollama's way to preload a model, or with keep_alive 0 to unload it.
    # ember keeps its one model loaded for the life of the server, so either way it is ready.
    return "unload" if keep_alive in (0, "0", "0s", "0m") else "load"


async def _encode(fn, *args, **kwargs) -> list[int]:
    # Chat templates and BPE are CPU work; keep them off the event loop that streams to others.
    return await asyncio.to_thread(fn, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# generate and chat


@router.post("/generate", response_model=None, responses=_streamed(OllamaGenerateResponse, "the completion"))
async def generate(req: OllamaGenerateRequest, request: Request):
    """Complete a prompt (wrapped in the model's chat template unless `raw`)."""
    t0 = time.time()
    if (missing := _not_served(request, req.model)) is not None:
        return missing
    if req.images:
        return _error(400, f"'{req.model}' does not support images")
    if req.suffix:
        return _error(400, f"'{req.model}' does not support insert (suffix)")
    if (bad := _unsupported_think(req.model, req.think)) is not None:
        return bad
    if not req.prompt:
        return JSONResponse({"model": req.model, "created_at": _now(), "response": "",
                             "done": True, "done_reason": _load_reason(req.keep_alive)})

    engine = request.app.state.engine
    tok = engine.tokenizer
    if req.raw:
        ids = await _encode(tok.encode, req.prompt)
    else:
        messages = [{"role": "system", "content": req.system}] if req.system else []
        messages.append({"role": "user", "content": req.prompt})
        ids = await _encode(tok.encode_chat, messages)
    if req.template:
        log.info("ignoring a custom Ollama template: ember renders the model's own chat template")
    ids = list(req.context or []) + ids
    params = _sampling_params(req.options, req.format, len(ids), engine)
    model = req.model

    def piece(text: str) -> dict:
        return {"model": model, "created_at": _now(), "response": text, "done": False}

    def final(out: RequestOutput, text: str) -> dict:
        body = {"model": model, "created_at": _now(), "response": text, "done": True,
                "done_reason": _done_reason(out)}
        if not req.raw:  # as Ollama: raw mode returns no context
            body["context"] = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
        body.update(_stats(t0, out))
        return body

    return await _respond(request, ids, params, req.stream, piece, final)


@router.post("/chat", response_model=None, responses=_streamed(OllamaChatResponse, "the assistant's reply"))
async def chat(req: OllamaChatRequest, request: Request):
    """The next assistant message of a conversation, through the model's chat template."""
    t0 = time.time()
    if (missing := _not_served(request, req.model)) is not None:
        return missing
    if req.tools:
        return _error(400, f"'{req.model}' does not support tools")
    if (bad := _unsupported_think(req.model, req.think)) is not None:
        return bad
    if any(m.images for m in req.messages or ()):
        return _error(400, f"'{req.model}' does not support images")
    if not req.messages:
        return JSONResponse({"model": req.model, "created_at": _now(),
                             "message": {"role": "assistant", "content": ""},
                             "done": True, "done_reason": _load_reason(req.keep_alive)})

    messages = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_name:
            msg["tool_name"] = msg["name"] = m.tool_name  # HF templates read `name`
        messages.append(msg)
    engine = request.app.state.engine
    ids = await _encode(engine.tokenizer.encode_chat, messages)
    params = _sampling_params(req.options, req.format, len(ids), engine)
    model = req.model

    def piece(text: str) -> dict:
        return {"model": model, "created_at": _now(),
                "message": {"role": "assistant", "content": text}, "done": False}

    def final(out: RequestOutput, text: str) -> dict:
        body = {"model": model, "created_at": _now(),
                "message": {"role": "assistant", "content": text},
                "done": True, "done_reason": _done_reason(out)}
        body.update(_stats(t0, out))
        return body

    return await _respond(request, ids, params, req.stream, piece, final)


# --------------------------------------------------------------------------------------------
# model information


def _clean(value: Any) -> Any:
    """Metadata as JSON can carry it: token texts may hold invalid UTF-8 (kept by the reader
    as surrogate escapes), which no JSON encoder accepts."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    return value


def _human(n: int) -> str:
    # Ollama's format.HumanNumber, as `parameter_size` shows it ("8.0B", "134.52M").
    for unit, scale, digits in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 2)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return str(n)


def _quant_level(gf) -> str:
    file_type = gf.metadata.get("general.file_type")
    if file_type is not None:
        try:
            from gguf import LlamaFileType

            name = LlamaFileType(int(file_type)).name
        except (ImportError, ValueError, TypeError):
            return "unknown"
        for prefix in ("MOSTLY_", "ALL_"):
            name = name.removeprefix(prefix)
        return name
    # Writers may leave general.file_type out; name the type that holds most of the weights.
    by_type: dict[str, int] = {}
    for t in gf.tensors.values():
        by_type[t.qtype.name] = by_type.get(t.qtype.name, 0) + t.n_elements
    return max(by_type, key=by_type.get) if by_type else "unknown"


def _describe_gguf(gf) -> dict:
    """What Ollama's details/model_info say, from an open GGUFFile."""
    md = gf.metadata
    arch = str(md.get("general.architecture", ""))
    n_params = md.get("general.parameter_count")
    if not isinstance(n_params, int):
        n_params = sum(t.n_elements for t in gf.tensors.values())
    info = {k: _clean(v) for k, v in md.items()}
    info.setdefault("general.parameter_count", n_params)
    return {
        "details": {"parent_model": "", "format": "gguf", "family": arch,
                    "families": [arch] if arch else None,
                    "parameter_size": _human(n_params),
                    "quantization_level": _quant_level(gf)},
        "model_info": info,
        "template": md.get("tokenizer.chat_template") or "",
        "license": md.get("general.license"),
        "eos": _eos_text(md),
    }


def _eos_text(md: dict) -> str | None:
    tokens, eos = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.eos_token_id")
    if isinstance(tokens, list) and isinstance(eos, int) and 0 <= eos < len(tokens):
        return _clean(tokens[eos])
    return None


@functools.lru_cache(maxsize=32)
def _describe_file(path: str, _mtime_ns: int, _size: int) -> dict:
    from ember.gguf.reader import GGUFFile

    with GGUFFile(path) as gf:
        return _describe_gguf(gf)


def _describe_directory(path: Path) -> dict:
    """What Ollama's details/model_info say, for a Hugging Face model directory."""
    from ember.hf.config import CONFIG_FILE, read_json
    from ember.store_cli import directory_summary
    from ember.tokenizer import _chat_template_of, _read_tokenizer_config

    summary = directory_summary(path)
    hf = read_json(path / CONFIG_FILE, "model config")
    arch = str(summary["architecture"] or "")
    info = {"general.architecture": arch, **{f"{arch}.{k}": _clean(v) for k, v in hf.items()
                                              if isinstance(v, (int, float, str, bool))}}
    tok = _read_tokenizer_config(path)
    eos = tok.get("eos_token")
    return {
        "details": {"parent_model": "", "format": "safetensors", "family": arch,
                    "families": [arch] if arch else None, "parameter_size": summary["parameters"],
                    "quantization_level": summary["quantization"]},
        "model_info": info,
        "template": _chat_template_of(path, tok) or "",
        "license": None,
        "eos": eos.get("content") if isinstance(eos, dict) else eos,
    }


def _describe_path(path: Path) -> dict:
    if path.is_dir():
        return _describe_directory(path)
    st = path.stat()
    return _describe_file(str(path), st.st_mtime_ns, st.st_size)


def _served_path(engine) -> Path | None:
    p = getattr(engine.engine, "model_path", None)
    return Path(p) if p is not None else None


_served_cache: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _served_description(engine) -> dict:
    path = _served_path(engine)
    if path is None:
        return {"details": OllamaModelDetails().model_dump(), "model_info": {}, "template": "",
                "license": None, "eos": None}
    cached = _served_cache.get(engine)
    if cached is None:
        cached = _served_cache[engine] = _describe_path(path)  # the served model never changes
    return cached


def _manifest_for(path: Path) -> dict | None:
    try:
        m = json.loads((path.parent / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict):
        return None
    if path.is_dir():  # a stored directory model: the manifest lists its files
        return m if isinstance(m.get("files"), dict) else None
    return m if m.get("size") == path.stat().st_size else None


def _identity(path: Path | None) -> tuple[str, str, int]:
    """(digest, modified_at, size) of a model file. The store's manifest has the sha256; for
    any other file, hashing gigabytes per listing is too slow, so the digest names the file's
    path, size and mtime instead (it changes whenever the file does, which is its use)."""
    if path is None or not path.exists():
        return "", _now(), 0
    st = path.stat()
    size = st.st_size
    if path.is_dir():  # a model directory: its files' sizes and newest change
        files = [p.stat() for p in path.iterdir() if p.is_file()]
        size = sum(f.st_size for f in files)
        st = max(files, key=lambda f: f.st_mtime_ns, default=st)
    manifest = _manifest_for(path)
    if manifest and isinstance(manifest.get("sha256"), str):
        digest = manifest["sha256"]
    else:
        digest = hashlib.sha256(f"{path.resolve()}:{size}:{st.st_mtime_ns}".encode()).hexdigest()
    return digest, _iso(st.st_mtime), size


def _tag(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _list_models(app) -> list[dict]:
    engine, store = app.state.engine, app.state.store
    served = app.state.model_name
    path = _served_path(engine)
    digest, modified, size = _identity(path)
    models = [{"name": _tag(served), "model": _tag(served), "modified_at": modified, "size": size,
               "digest": digest, "details": _served_description(engine)["details"]}]
    if store is None:
        return models
    seen = {_norm(served)}
    for entry in store.list():
        if _norm(entry.name) in seen:
            continue
        seen.add(_norm(entry.name))
        try:
            details = _describe_path(entry.path)["details"]
        except Exception as e:  # one unreadable file must not hide the others
            log.warning("cannot read %s: %s", entry.path, e)
            details = OllamaModelDetails(quantization_level="unknown").model_dump()
        modified = _iso(entry.pulled_at.timestamp()) if entry.pulled_at else _identity(entry.path)[1]
        models.append({"name": _tag(entry.name), "model": _tag(entry.name), "modified_at": modified,
                       "size": entry.size, "digest": entry.sha256, "details": details})
    return models


@router.get("/tags", response_model=OllamaListResponse)
async def tags(request: Request):
    """The served model, then the other models in the server's store."""
    return JSONResponse({"models": await asyncio.to_thread(_list_models, request.app)})


def _show(app, name: str, verbose: bool) -> dict | None:
    engine, store = app.state.engine, app.state.store
    if _norm(name) == _norm(app.state.model_name):
        desc, path = _served_description(engine), _served_path(engine)
        tok = engine.tokenizer
        stops = [tok.id_to_token(i) for i in sorted(tok.stop_token_ids)]
        num_ctx = engine.max_model_len
    elif store is not None and _in_store(store, name):
        path = store.resolve(name)
        desc = _describe_path(path)
        stops = [desc["eos"]] if desc["eos"] else []
        num_ctx = None
    else:
        return None
    info = dict(desc["model_info"])
    if not verbose:
        info = {k: ([] if isinstance(v, list) and len(v) > _SHOW_ARRAY_LIMIT else v)
                for k, v in info.items()}
    params = ([f"num_ctx {num_ctx}"] if num_ctx else []) + [f"stop {json.dumps(s)}" for s in stops]
    modelfile = [f"# Modelfile generated by ember {__version__} for {name}",
                 "# TEMPLATE below is the model's Jinja chat template, which ember renders; "
                 "it is not an Ollama Go template",
                 f"FROM {path}"]
    if desc["template"]:
        modelfile.append(f'TEMPLATE """{desc["template"]}"""')
    modelfile += [f"PARAMETER {p}" for p in params]
    if desc["license"]:
        modelfile.append(f'LICENSE """{desc["license"]}"""')
    out = {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": "\n".join(params),
        "template": desc["template"],
        "details": desc["details"],
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": _identity(path)[1],
    }
    if desc["license"]:
        out["license"] = str(desc["license"])
    return out


@router.post("/show", response_model=OllamaShowResponse, responses=_ERRORS)
async def show(req: OllamaShowRequest, request: Request):
    """A model's details, parameters, template and GGUF metadata (`model_info`)."""
    name = req.model or req.name or ""
    if not name:
        return _error(400, "model is required")
    out = await asyncio.to_thread(_show, request.app, name, req.verbose)
    if out is None:
        return _error(404, f"model '{name}' not found")
    return JSONResponse(out)


@router.get("/ps", response_model=OllamaProcessResponse)
async def ps(request: Request):
    """The loaded model: ember serves one, loaded for the life of the server."""
    app = request.app
    engine = app.state.engine
    served = app.state.model_name
    digest, modified, size = await asyncio.to_thread(_identity, _served_path(engine))
    backend = getattr(engine.engine, "backend", None)
    try:
        kv = int((backend.memory_stats() if backend is not None else {}).get("kv_cache_bytes", 0))
    except Exception:
        kv = 0
    total = size + kv
    info = getattr(engine.engine, "backend_info", None)
    device = getattr(getattr(info, "cls", None), "device_type", "cpu")
    expires = (_dt.datetime.now(_dt.timezone.utc) + _FOREVER).isoformat().replace("+00:00", "Z")
    return JSONResponse({"models": [{
        "name": _tag(served), "model": _tag(served), "size": total, "digest": digest,
        "details": _served_description(engine)["details"], "expires_at": expires,
        "size_vram": 0 if device == "cpu" else total, "context_length": engine.max_model_len,
        "modified_at": modified,
    }]})


@router.get("/version", response_model=OllamaVersionResponse)
async def version():
    """ember's version (not an Ollama version number)."""
    return {"version": __version__}


# --------------------------------------------------------------------------------------------
# pull


class _PullCancelled(Exception):
    """Raised inside the store's progress callback once the client has gone."""


def _pull_status(exc: BaseException) -> int:
    from ember.store import InvalidModelName, ModelNotFound

    if isinstance(exc, InvalidModelName):
        return 400
    if isinstance(exc, ModelNotFound):
        return 404
    return 500  # a failed download or a file that is not what it claims, as Ollama reports it


def _pull_label(store, spec: str) -> tuple[str, str | None]:
    """(what the status line names, the digest if known before downloading)."""
    try:
        from ember.store import normalize_name

        entry = store.catalogue.get(normalize_name(spec))
    except Exception:
        entry = None
    sha = getattr(getattr(entry, "source", None), "sha256", None)
    if sha:
        return sha[:12], f"sha256:{sha}"
    return (Path(spec).name if ("/" in spec or os.sep in spec) else spec), None


def _start_pull(store, spec: str, loop: asyncio.AbstractEventLoop, events: asyncio.Queue,
                cancelled: threading.Event) -> None:
    def emit(item) -> None:
        loop.call_soon_threadsafe(events.put_nowait, item)

    last = {"t": 0.0, "phase": None}

    def on_progress(phase: str, completed: int, total: int | None) -> None:
        if cancelled.is_set():
            raise _PullCancelled("the client disconnected")
        now = time.monotonic()
        if (phase == last["phase"] and now - last["t"] < _PULL_PROGRESS_INTERVAL_S
                and completed != total):
            return
        last.update(t=now, phase=phase)
        emit(("progress", phase, completed, total))

    def run() -> None:
        try:
            path = store.pull(spec, progress=False, on_progress=on_progress)
        except BaseException as e:  # the thread has no one else to tell
            emit(("error", e))
        else:
            emit(("done", path))

    threading.Thread(target=run, name="ember-pull", daemon=True).start()


def _progress_line(item, label: str, digest: str | None) -> dict:
    _, phase, completed, total = item
    if phase == "downloading":
        line = {"status": f"downloading {label}", "digest": digest or label, "completed": completed}
        if total is not None:
            line["total"] = total
        return line
    if phase == "verifying":
        return {"status": "verifying sha256 digest"}
    return {"status": phase}


@router.post("/pull", response_model=OllamaProgressResponse, responses={
    200: {"model": OllamaProgressResponse,
          "description": 'with stream true (the default), NDJSON progress: "pulling manifest", '
                         '"downloading ..." with total/completed bytes, "verifying sha256 '
                         'digest", "writing manifest", then "success"; else {"status": "success"}',
          "content": {NDJSON: {"schema": {"$ref": "#/components/schemas/OllamaProgressResponse"}}}},
    **_ERRORS,
    500: {"model": OllamaErrorResponse, "description": "the pull failed"},
    501: {"model": OllamaErrorResponse, "description": "the server has no model store"}})
async def pull(req: OllamaPullRequest, request: Request):
    """Fetch a model into the server's store: a catalogue name, a .gguf file on the server's
    disk, or hf:OWNER/REPO/FILE.gguf."""
    store = request.app.state.store
    spec = req.model or req.name or ""
    if not spec:
        return _error(400, "model is required")
    if store is None:
        return _error(501, "this server has no model store, so it cannot pull models")
    if ("/" in spec or os.sep in spec) and not spec.startswith("hf:") and not spec.lower().endswith(".gguf"):
        # A path is read by the server itself: keep clients to model files, so that the pull's
        # errors cannot be used to probe other files on its disk.
        return _error(400, f"a path to pull must name a .gguf file, not {spec!r}")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    _start_pull(store, spec, loop, events, cancelled)
    label, digest = _pull_label(store, spec)

    if not req.stream:
        async def outcome():
            while (item := await events.get())[0] == "progress":
                pass
            return item

        try:
            item, listening = await _unless_disconnected(request, outcome())
        finally:
            cancelled.set()  # a no-op once the pull is over
        if not listening:
            return JSONResponse({}, status_code=499)
        if item[0] == "error":
            return _error(_pull_status(item[1]), str(item[1]))
        return JSONResponse({"status": "success"})

    # A quick failure gets its own status code; a slow one becomes an error line in the stream.
    pending = []
    try:
        first = await asyncio.wait_for(events.get(), _PULL_FAST_FAIL_S)
    except asyncio.TimeoutError:
        pass
    else:
        if first[0] == "error":
            return _error(_pull_status(first[1]), str(first[1]))
        pending.append(first)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield _line({"status": "pulling manifest"})
            while True:
                item = pending.pop(0) if pending else await events.get()
                if item[0] == "progress":
                    yield _line(_progress_line(item, label, digest))
                elif item[0] == "error":
                    yield _line({"error": str(item[1])})
                    return
                else:
                    yield _line({"status": "success"})
                    return
        finally:
            cancelled.set()

    return StreamingResponse(body(), media_type=NDJSON)
