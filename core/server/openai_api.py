"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions.

Every generation first adds its request(s) to the engine and waits for the first output, so that
anything the engine refuses (a prompt longer than the context, max_tokens that cannot fit, a full
queue) reaches the client as a proper error status, streaming or not. Once a response is under
way, a client that goes away cancels the iteration over the engine's outputs, and that aborts the
request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ember.engine.async_engine import AsyncEngine
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams, StructuredOutput
from ember.server.openai_protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 413, 503)}
_STREAMED = {"description": "The response, or with stream=true a text/event-stream of chunks ending in "
                            "`data: [DONE]`.", "content": {"text/event-stream": {}}}

router = APIRouter(prefix="/v1", tags=["OpenAI"])

# logprobs must stay valid JSON: vLLM clamps -inf the same way
_LOGPROB_FLOOR = -9999.0
# template variables the server sets itself; a caller's chat_template_kwargs must not collide
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token",
                                       "timeout_s", "template"})


class ApiError(ValueError):
    """A request we refuse, with the OpenAI error fields to say so."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | int | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.code = status if code is None else code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _ClientGone(Exception):
    pass


# --- models ------------------------------------------------------------------------------------


def _engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


def _served_names(request: Request) -> tuple[str, ...]:
    state = request.app.state
    return (state.model_name, *getattr(state, "model_aliases", ()))


def _check_model(request: Request, name: str) -> None:
    if name not in _served_names(request):
        raise ApiError(f"The model `{name}` does not exist; this server serves `{request.app.state.model_name}`.",
                       param="model", status=404, code="model_not_found")


def _card(request: Request, name: str) -> dict:
    engine = _engine(request)
    return {"id": name, "object": "model", "created": int(engine.started_at), "owned_by": "ember",
            "max_model_len": engine.max_model_len}


@router.get("/models", response_model=ModelList)
async def list_models(request: Request):
    return {"object": "list", "data": [_card(request, request.app.state.model_name)]}


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def retrieve_model(model_id: str, request: Request):
    try:
        _check_model(request, model_id)
    except ApiError as e:
        return e.response()
    return _card(request, model_id)


# --- request -> SamplingParams -----------------------------------------------------------------


def _check_json_schema(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        raise ApiError("a JSON schema must be an object", param)
    try:
        import jsonschema
    except ImportError:  # the structured-output compiler still rejects it, with its own message
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ApiError(f"invalid JSON schema{f' at {where}' if where else ''}: {e.message}", param) from None


def _regex_literal(text: str) -> str:
    # Only the metacharacters every regex dialect agrees on: the grammar engine is not Python's re.
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def _structured(body) -> StructuredOutput | None:
    asked: list[tuple[str, StructuredOutput]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        asked.append(("response_format", StructuredOutput(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError("response_format of type json_schema needs json_schema.schema", "response_format")
        _check_json_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
        asked.append(("response_format", StructuredOutput(json_schema=fmt.json_schema.schema_)))
    if body.guided_json is not None:
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ApiError(f"guided_json is not JSON: {e}", "guided_json") from None
        _check_json_schema(schema, "guided_json")
        asked.append(("guided_json", StructuredOutput(json_schema=schema)))
    if body.guided_regex is not None:
        asked.append(("guided_regex", StructuredOutput(regex=body.guided_regex)))
    if body.guided_choice is not None:
        if not body.guided_choice:
            raise ApiError("guided_choice needs at least one choice", "guided_choice")
        regex = "|".join(f"({_regex_literal(c)})" for c in body.guided_choice)
        asked.append(("guided_choice", StructuredOutput(regex=regex)))
    if body.guided_grammar is not None:
        asked.append(("guided_grammar", StructuredOutput(grammar=body.guided_grammar)))
    if len(asked) > 1:
        raise ApiError(f"give at most one output constraint, not {', '.join(k for k, _ in asked)}", asked[1][0])
    return asked[0][1] if asked else None


def _sampling_params(body, *, max_tokens: int | None, logprobs: int | None,
                     defaults: dict | None = None) -> SamplingParams:
    """defaults: the model's own sampling defaults (a Hugging Face directory's
    generation_config.json), for the fields the request leaves out, as vLLM's server uses them."""
    if body.logit_bias:
        raise ApiError("logit_bias is not supported", "logit_bias")
    if body.stream_options is not None and not body.stream:
        raise ApiError("stream_options is only allowed with stream=true", "stream_options")

    def given(value, default):
        return default if value is None else value

    model = defaults or {}
    return SamplingParams(
        n=given(body.n, 1),
        temperature=given(body.temperature, model.get("temperature", 1.0)),
        top_p=given(body.top_p, model.get("top_p", 1.0)),
        top_k=given(body.top_k, model.get("top_k", 0)),
        min_p=given(body.min_p, model.get("min_p", 0.0)),
        repetition_penalty=given(body.repetition_penalty, model.get("repetition_penalty", 1.0)),
        presence_penalty=given(body.presence_penalty, 0.0),
        frequency_penalty=given(body.frequency_penalty, 0.0),
        seed=body.seed,
        max_tokens=max_tokens,
        min_tokens=given(body.min_tokens, 0),
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=bool(body.ignore_eos),
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        logprobs=logprobs,
        skip_special_tokens=given(body.skip_special_tokens, True),
        structured=_structured(body),
    )


def _model_defaults(engine) -> dict:
    """The served model's sampling defaults (generation_config.json), without its EOS list."""
    gen = getattr(getattr(engine, "engine", None), "generation_defaults", None) or {}
    return {k: v for k, v in gen.items() if k != "eos_token_ids"}


# --- tokens as text and bytes, for logprobs ----------------------------------------------------


class _TokenPieces:
    """Each token's exact bytes (a byte-level BPE piece may be part of a character) and its text
    (OpenAI's `bytes:\\xNN` spelling when those bytes are not valid UTF-8 on their own)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, tuple[str, bytes]] = {}

    def _bytes(self, tid: int) -> bytes:
        return self.tok.token_bytes(tid)

    def __call__(self, tid: int) -> tuple[str, bytes]:
        hit = self.cache.get(tid)
        if hit is None:
            raw = self._bytes(tid)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self.cache[tid] = (text, raw)
        return hit


_pieces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_pieces(tokenizer) -> _TokenPieces:
    p = _pieces.get(tokenizer)
    if p is None:
        p = _pieces[tokenizer] = _TokenPieces(tokenizer)
    return p


def _finite(lp: float | None) -> float | None:
    return None if lp is None else max(lp, _LOGPROB_FLOOR)


def _chat_logprobs(pieces: _TokenPieces, ids: list[int], lps: list, tops: list | None) -> dict:
    content = []
    for k, tid in enumerate(ids):
        text, raw = pieces(tid)
        top = []
        for t, lp in (tops[k] if tops and k < len(tops) and tops[k] else ()):
            t_text, t_raw = pieces(t)
            top.append({"token": t_text, "logprob": _finite(lp), "bytes": list(t_raw)})
        content.append({"token": text, "logprob": _finite(lps[k]), "bytes": list(raw), "top_logprobs": top})
    return {"content": content, "refusal": None}


def _completion_logprobs(pieces: _TokenPieces, ids: list[int], lps: list, tops: list | None,
                         offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for k, tid in enumerate(ids):
        text, _ = pieces(tid)
        lp = _finite(lps[k])
        # OpenAI: the sampled token is always there, so up to logprobs + 1 entries
        top = {pieces(t)[0]: _finite(v) for t, v in (tops[k] if tops and k < len(tops) and tops[k] else ())}
        top.setdefault(text, lp)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


# --- running requests ----------------------------------------------------------------------------


class _Generation:
    """One or more engine requests (a batch of prompts) answered together."""

    def __init__(self, engine: AsyncEngine, request_id: str, prompts: list, params: SamplingParams):
        self.engine = engine
        self.params = params
        self.ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
        self.prompts = prompts
        self.firsts: list[RequestOutput] = []
        self.gens: list = []
        self.finished = [False] * len(prompts)

    async def start(self) -> None:
        self.gens = [self.engine.generate(p, self.params, rid) for p, rid in zip(self.prompts, self.ids)]
        try:
            firsts = await asyncio.gather(*(g.__anext__() for g in self.gens), return_exceptions=True)
        except BaseException:
            self.close()
            raise
        errors = [r for r in firsts if isinstance(r, BaseException)]
        if errors:
            self.close()
            # the engine's verdict on the request before a busy or dead engine's
            raise next((e for e in errors if isinstance(e, ValueError)), errors[0])
        self.firsts = firsts

    def close(self) -> None:
        """Abort whatever has not finished. The generators abort on their own when cancelled or
        closed; this also covers one that never got to run again."""
        for rid, done in zip(self.ids, self.finished):
            if not done:
                self.engine.abort(rid)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine produces them, the first outputs first."""
        try:
            if len(self.gens) == 1:
                gen = self.gens[0]
                out = self.firsts[0]
                while True:
                    self.finished[0] = out.finished
                    yield 0, out
                    if out.finished:
                        return
                    out = await gen.__anext__()
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, gen, first: RequestOutput) -> None:
                try:
                    queue.put_nowait((i, first))
                    async for out in gen:
                        queue.put_nowait((i, out))
                except Exception as e:
                    queue.put_nowait((i, e))

            tasks = [asyncio.ensure_future(pump(i, g, f)) for i, (g, f) in enumerate(zip(self.gens, self.firsts))]
            try:
                while not all(self.finished):
                    i, out = await queue.get()
                    if isinstance(out, Exception):
                        raise out
                    self.finished[i] = out.finished
                    yield i, out
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            self.close()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable):
    """`work`, cancelled if the client disconnects first (uvicorn does not cancel a handler)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _respond(request: Request, handler: Awaitable) -> Response:
    try:
        return await _unless_gone(request, handler)
    except ApiError as e:
        return e.response()
    except _ClientGone:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _sse_error(e: BaseException) -> str:
    return _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})


def _stream(gen: "_Generation", events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(_sse_events(gen, events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse_events(gen: "_Generation", events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The SSE stream around a response's chunks: errors said in-stream, then [DONE]."""
    try:
        async for event in events:
            yield event
    except Exception as e:  # the response has begun: all we can do is say so in the stream
        yield _sse_error(e)
    finally:
        gen.close()
    yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class _Ctx:
    request_id: str
    model: str
    n: int
    created: int = field(default_factory=lambda: int(time.time()))


class _Tally:
    """Token counts for usage, from each choice's latest output."""

    def __init__(self, num_prompts: int):
        self.prompt = [0] * num_prompts
        self.cached = [0] * num_prompts
        self.completion: dict[int, int] = {}

    def see(self, p: int, out: RequestOutput, index: int, o: CompletionOutput) -> None:
        self.prompt[p] = len(out.prompt_token_ids)
        self.cached[p] = out.num_cached_tokens
        self.completion[index] = len(o.token_ids)

    def usage(self) -> dict:
        return _usage(sum(self.prompt), sum(self.completion.values()), sum(self.cached))


def _new_tokens(o: CompletionOutput) -> tuple[int, int]:
    """The range of token positions this output added. The engine keeps appending to its logprob
    lists, so positions, not lengths of those lists, say what belongs to this output."""
    end = len(o.token_ids)
    return end - len(o.delta_token_ids), end


# --- /v1/completions ---------------------------------------------------------------------------


def _completion_prompts(prompt) -> list:
    # the request model has already refused empty prompts
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


@router.post("/completions", response_model=Completion, responses={200: _STREAMED, **_ERRORS})
async def create_completion(body: CompletionRequest, request: Request):
    return await _respond(request, _completion(body, request))


async def _completion(body: CompletionRequest, request: Request) -> Response:
    _check_model(request, body.model)
    if body.suffix:
        raise ApiError("suffix is not supported", "suffix")
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise ApiError("best_of must equal n (no server-side ranking of samples)", "best_of")
    if body.echo and body.logprobs is not None:
        raise ApiError("echo together with logprobs (prompt logprobs) is not supported", "echo")
    prompts = _completion_prompts(body.prompt)
    # null means OpenAI's default here, not "up to the context" as in chat
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    engine = _engine(request)
    params = _sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, defaults=_model_defaults(engine))
    ctx = _Ctx(f"cmpl-{uuid.uuid4().hex}", body.model, n)
    gen = _Generation(engine, ctx.request_id, prompts, params)
    await gen.start()
    pieces = _token_pieces(engine.tokenizer) if body.logprobs is not None else None

    def echoed(out: RequestOutput) -> str:
        if not body.echo:
            return ""
        return out.prompt if out.prompt is not None else engine.tokenizer.decode(
            out.prompt_token_ids, skip_special_tokens=False)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(gen, _completion_events(gen, ctx, pieces, echoed, include_usage))

    tally = _Tally(len(prompts))
    final: dict[int, tuple[RequestOutput, CompletionOutput]] = {}
    try:
        async for p, out in gen.outputs():
            for o in out.outputs:
                final[p * n + o.index] = (out, o)
                tally.see(p, out, p * n + o.index, o)
    finally:
        gen.close()
    choices = []
    for index in sorted(final):
        out, o = final[index]
        prefix = echoed(out)
        lp = None
        if pieces is not None:
            lp = _completion_logprobs(pieces, o.token_ids, o.logprobs or [], o.top_logprobs, len(prefix))
        choices.append({"index": index, "text": prefix + o.text, "logprobs": lp,
                        "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return JSONResponse({"id": ctx.request_id, "object": "text_completion", "created": ctx.created,
                         "model": ctx.model, "choices": choices, "usage": tally.usage()})


async def _completion_events(gen: _Generation, ctx: _Ctx, pieces, echoed, include_usage: bool):
    tally = _Tally(len(gen.prompts))
    offsets: dict[int, int] = {}
    done: set[int] = set()

    def chunk(choices: list, usage=None) -> str:
        obj = {"id": ctx.request_id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
               "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return _sse(obj)

    async for p, out in gen.outputs():
        for o in out.outputs:
            index = p * ctx.n + o.index
            if index in done:
                continue
            tally.see(p, out, index, o)
            text = o.delta_text
            if index not in offsets:
                text = echoed(out) + text
                offsets[index] = len(text) - len(o.delta_text)
            lp = None
            if pieces is not None:
                a, b = _new_tokens(o)
                lp = _completion_logprobs(pieces, o.token_ids[a:b], (o.logprobs or [])[a:b],
                                          (o.top_logprobs or [])[a:b], offsets[index])
                offsets[index] += sum(len(t) for t in lp["tokens"])
            if o.finished:
                done.add(index)
            if text or o.finished or (lp and lp["tokens"]):
                yield chunk([{"index": index, "text": text, "logprobs": lp,
                              "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}])
    if include_usage:
        yield chunk([], tally.usage())


# --- /v1/chat/completions ----------------------------------------------------------------------


def _chat_messages(body: ChatCompletionRequest) -> list[dict]:
    out = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        tool_calls = getattr(m, "tool_calls", None)
        if content is None and not tool_calls:  # an assistant turn that said nothing
            content = ""
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        for key, value in (("name", m.name), ("tool_calls", tool_calls), ("tool_call_id", getattr(m, "tool_call_id", None))):
            if value is not None:
                msg[key] = value
        out.append(msg)
    return out


@router.post("/chat/completions", response_model=ChatCompletion, responses={200: _STREAMED, **_ERRORS})
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    return await _respond(request, _chat(body, request))


async def _chat(body: ChatCompletionRequest, request: Request) -> Response:
    _check_model(request, body.model)
    for key in ("tools", "functions"):
        if getattr(body, key):
            raise ApiError("tool calling is not supported by this server", key)
    template_kwargs = dict(body.chat_template_kwargs or {})
    if clash := sorted(_RESERVED_TEMPLATE_KWARGS & template_kwargs.keys()):
        raise ApiError(f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
    if body.logprobs:
        logprobs = body.top_logprobs or 0
    elif body.top_logprobs:
        raise ApiError("top_logprobs needs logprobs=true", "top_logprobs")
    else:
        logprobs = None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    engine = _engine(request)
    params = _sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, defaults=_model_defaults(engine))
    messages = _chat_messages(body)
    # a chat template is sandboxed but still may take its time: keep it off the event loop
    prompt_ids = await run_in_threadpool(engine.tokenizer.encode_chat, messages, **template_kwargs)
    n = params.n
    ctx = _Ctx(f"chatcmpl-{uuid.uuid4().hex}", body.model, n)
    gen = _Generation(engine, ctx.request_id, [prompt_ids], params)
    await gen.start()
    pieces = _token_pieces(engine.tokenizer) if logprobs is not None else None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(gen, _chat_events(gen, ctx, pieces, include_usage))

    tally = _Tally(1)
    final: dict[int, CompletionOutput] = {}
    try:
        async for p, out in gen.outputs():
            for o in out.outputs:
                final[o.index] = o
                tally.see(p, out, o.index, o)
    finally:
        gen.close()
    choices = []
    for index in sorted(final):
        o = final[index]
        lp = _chat_logprobs(pieces, o.token_ids, o.logprobs or [], o.top_logprobs) if pieces else None
        choices.append({"index": index, "message": {"role": "assistant", "content": o.text},
                        "logprobs": lp, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return JSONResponse({"id": ctx.request_id, "object": "chat.completion", "created": ctx.created,
                         "model": ctx.model, "choices": choices, "usage": tally.usage()})


async def _chat_events(gen: _Generation, ctx: _Ctx, pieces, include_usage: bool):
    tally = _Tally(1)
    done: set[int] = set()

    def chunk(choices: list, usage=None) -> str:
        obj = {"id": ctx.request_id, "object": "chat.completion.chunk", "created": ctx.created,
               "model": ctx.model, "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return _sse(obj)

    for index in range(ctx.n):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for p, out in gen.outputs():
        for o in out.outputs:
            if o.index in done:
                continue
            tally.see(p, out, o.index, o)
            lp = None
            if pieces is not None:
                a, b = _new_tokens(o)
                lp = _chat_logprobs(pieces, o.token_ids[a:b], (o.logprobs or [])[a:b],
                                    (o.top_logprobs or [])[a:b])
            if o.finished:
                done.add(o.index)
            if o.delta_text or o.finished or (lp and lp["content"]):
                delta = {"content": o.delta_text} if o.delta_text else {}
                yield chunk([{"index": o.index, "delta": delta, "logprobs": lp,
                              "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}])
    if include_usage:
        yield chunk([], tally.usage())
