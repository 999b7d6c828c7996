"""Build and run the server: ``ember serve MODEL``."""
from __future__ import annotations

import logging
import os
import threading

import uvicorn

from ember.engine.async_engine import AsyncEngine
from ember.server.app import DEFAULT_MAX_BODY, create_app
from ember.server.metrics import EngineMetrics


def load_in_passing_thread(build):
    """Build the LLM for a server on a thread that then exits, and return it.

    Loading runs OpenMP kernels (repacking weights), and OpenMP keeps a pool of worker threads for
    every thread that ever used it. The server's engine runs on a thread of its own, so a pool
    left on the loading thread means more OpenMP threads than cores, and libgomp then lets idle
    workers spin only ~100 times before sleeping: every kernel of a decode step would pay a
    wake-up (32 streaming clients on 2 cores: 348 tok/s that way, 460 this way). A pool dies with
    its thread.
    """
    import threading

    out: dict = {}

    def run():
        try:
            out["value"] = build()
        except BaseException as e:  # re-raised on the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name="ember-load")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def build_app(llm, model_name: str, *, api_key: str | None = None, max_waiting: int = 512,
              max_body_bytes: int = DEFAULT_MAX_BODY, store=None):
    metrics = EngineMetrics(model_name)
    engine = AsyncEngine(llm.engine, max_waiting=max_waiting, model_name=model_name, metrics=metrics)
    return create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes, store=store)


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    logging.getLogger("ember.access").setLevel(logging.INFO)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=30)


class BackgroundServer:
    """A uvicorn server on a thread of this process (tests, `ember run` fallbacks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def api_key_from_env(cli_value: str | None) -> str | None:
    return cli_value or os.environ.get("EMBER_API_KEY") or None
