"""The engine loop beside an asyncio event loop: the server's view of the engine.

One thread owns the LLMEngine and runs its steps; the event loop talks to it through a command
queue and gets each request's outputs on an asyncio queue as soon as a step produces them. A
consumer that stops listening (a client that disconnected) aborts its request, which frees its
KV blocks at the next step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from ember.engine.llm_engine import LLMEngine
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 503 + Retry-After)."""


class EngineDead(RuntimeError):
    """The engine loop stopped on an error; no request can be served (HTTP 503)."""


class RequestAborted(EngineDead):
    """The request was aborted while its caller still listened (the server is shutting down)."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    sink: "_Sink"
    done: concurrent.futures.Future


@dataclass
class _Abort:
    request_id: str


class _Sink:
    """Delivers a request's outputs from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the listener's loop is closed: nobody is left to tell
            pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 512, model_name: str = "model", metrics=None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.model_name = model_name
        self.metrics = metrics
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, _Sink] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._pending = 0  # added but not yet scheduled, counted from the event loop's side
        self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
        self._thread.start()
        self.started_at = time.time()

    # --- the event loop's side ------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def is_healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def num_waiting(self) -> int:
        return self.engine.num_waiting()

    def num_running(self) -> int:
        return self.engine.num_running()

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Raises ValueError for a request the engine rejects,
        QueueFull when too many wait, EngineDead when the loop is gone. Leaving the iteration
        early (or being cancelled) aborts the request."""
        if not self.is_healthy():
            raise EngineDead(f"the engine stopped: {self.error!r}")
        if self._stopping:
            raise QueueFull("the server is shutting down")
        if self.engine.num_waiting() + self._commands.qsize() >= self.max_waiting:
            raise QueueFull(f"{self.max_waiting} requests are already waiting")
        request_id = request_id or f"req-{next(self._ids)}"
        sink = _Sink(asyncio.get_running_loop())
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Add(request_id, prompt, params, sink, done))
        self._wake.set()
        finished = False
        try:
            # re-raises the engine's validation error, if any. Cancelled here (the client left),
            # the request may still have been added: the finally below aborts it either way.
            await asyncio.wrap_future(done)
            while True:
                item = await sink.queue.get()
                if isinstance(item, RequestAborted):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDead(f"the engine stopped: {item!r}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        except ValueError:
            finished = True  # rejected: nothing was added
            raise
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))
        self._wake.set()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let running ones finish for up to `timeout` seconds, then abort
        whatever is left and stop the loop."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self._sinks and time.monotonic() < deadline and self.is_healthy():
            await asyncio.sleep(0.05)
        for rid in list(self._sinks):
            self.abort(rid)
        self._commands.put(None)
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)

    # --- the engine thread ----------------------------------------------------------------------
    def _drain_commands(self) -> bool:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            if cmd is None:
                return False
            if isinstance(cmd, _Add):
                if not cmd.done.set_running_or_notify_cancel():
                    continue  # the caller gave up before we got to it
                try:
                    self.engine.add_request(cmd.prompt, cmd.params, cmd.request_id)
                except Exception as e:  # a bad request: the caller gets the error, the loop goes on
                    cmd.done.set_exception(e)
                    continue
                self._sinks[cmd.request_id] = cmd.sink
                cmd.done.set_result(None)
            elif isinstance(cmd, _Abort):
                if self.engine.abort_request(cmd.request_id) and self.metrics:
                    self.metrics.aborted(cmd.request_id)
                sink = self._sinks.pop(cmd.request_id, None)
                if sink is not None:  # someone still listens (shutdown): end their wait
                    sink.put(RequestAborted(f"request {cmd.request_id} was aborted"))

    def _loop(self) -> None:
        try:
            while True:
                if not self._drain_commands():
                    return
                if not self.engine.has_unfinished_requests():
                    if self.metrics:
                        self.metrics.gauges(self.engine)
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                outs = self.engine.step()
                if self.metrics:
                    self.metrics.step(self.engine, outs, time.perf_counter() - t0)
                for out in outs:
                    sink = self._sinks.get(out.request_id)
                    if sink is None:
                        continue
                    if out.finished:
                        del self._sinks[out.request_id]
                    sink.put(out)
        except BaseException as e:  # the engine is broken: tell every waiter, then stop
            log.exception("engine loop died")
            self.error = e
            for sink in self._sinks.values():
                sink.put(e)
            self._sinks.clear()
            while True:  # fail any add that raced in
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(cmd, _Add):
                    cmd.done.set_exception(EngineDead(f"the engine stopped: {e!r}"))
