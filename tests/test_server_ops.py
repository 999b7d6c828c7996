"""The server's operations side against real uvicorn servers on loopback: health, metrics,
tokenize, security, limits, concurrency, disconnects, shutdown."""
import asyncio
import json
import re

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from ember.llm import LLM  # noqa: E402
from ember.server.serve import BackgroundServer, build_app  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llm(tiny_gguf):
    return LLM(str(tiny_gguf), max_model_len=512, kv_cache_memory=64 * 1024**2)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_health_version_tokenize_metrics(tiny_llm):
    with BackgroundServer(build_app(tiny_llm, "tiny")) as srv:
        assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{srv.url}/version").json()["version"]
        ids = httpx.post(f"{srv.url}/tokenize", json={"prompt": "Hello there"}).json()
        assert ids["count"] == len(ids["tokens"]) > 0
        text = httpx.post(f"{srv.url}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
        assert text == "Hello there"
        assert httpx.post(f"{srv.url}/detokenize", json={"tokens": [10**9]}).status_code == 400
        chat = httpx.post(f"{srv.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert chat["count"] > ids["count"]
        m = httpx.get(f"{srv.url}/metrics").text
        for name in ("ember:num_requests_running", "ember:num_requests_waiting", "ember:kv_cache_usage_perc",
                     "ember:prefix_cache_queries_total", "ember:prefix_cache_hits_total",
                     "ember:num_preemptions_total", "ember:prompt_tokens_total", "ember:generation_tokens_total",
                     "ember:time_to_first_token_seconds_count", "ember:inter_token_latency_seconds_count",
                     "ember:e2e_request_latency_seconds_count"):
            metric(m, name)


def test_api_key_guards_everything_but_health(tiny_llm):
    with BackgroundServer(build_app(tiny_llm, "tiny", api_key="s3cret")) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        r = httpx.get(f"{srv.url}/metrics")
        assert r.status_code == 401
        assert httpx.get(f"{srv.url}/v1/models").json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{srv.url}/api/tags").json() == {"error": "missing or invalid API key"}
        bad = httpx.get(f"{srv.url}/metrics", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        ok = httpx.get(f"{srv.url}/metrics", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_body_size_limit(tiny_llm):
    with BackgroundServer(build_app(tiny_llm, "tiny", max_body_bytes=1000)) as srv:
        r = httpx.post(f"{srv.url}/tokenize", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and "larger than 1000" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit still holds
            for _ in range(10):
                yield b" " * 500
        r = httpx.post(f"{srv.url}/tokenize", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert httpx.get(f"{srv.url}/health").status_code == 200


def test_engine_death_turns_health_red(tiny_gguf):
    llm = LLM(str(tiny_gguf), max_model_len=256, kv_cache_memory=32 * 1024**2)
    app = build_app(llm, "tiny")
    engine = app.state.engine

    def broken_step():
        raise RuntimeError("simulated kernel failure")

    llm.engine.step = broken_step
    with BackgroundServer(app) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4})
        assert r.status_code == 503
        assert httpx.get(f"{srv.url}/health").status_code == 503
        assert not engine.is_healthy()


def test_queue_full_gives_503_with_retry_after(tiny_llm):
    app = build_app(tiny_llm, "tiny", max_waiting=2)

    async def burst(url):
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"model": "tiny", "prompt": "hello " * 50, "max_tokens": 64, "ignore_eos": True}
            return await asyncio.gather(*[c.post(f"{url}/v1/completions", json=body) for _ in range(40)])

    with BackgroundServer(app) as srv:
        rs = asyncio.run(burst(srv.url))
        codes = [r.status_code for r in rs]
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] and busy.json()["error"]["type"] == "server_busy"
        assert httpx.get(f"{srv.url}/health").status_code == 200


def test_graceful_shutdown_finishes_in_flight(tiny_gguf):
    llm = LLM(str(tiny_gguf), max_model_len=512, kv_cache_memory=64 * 1024**2)
    app = build_app(llm, "tiny")
    results = []

    async def one(url):
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{url}/v1/completions",
                             json={"model": "tiny", "prompt": "count", "max_tokens": 40, "ignore_eos": True})
            results.append(r.status_code)

    srv = BackgroundServer(app).__enter__()

    async def run():
        tasks = [asyncio.create_task(one(srv.url)) for _ in range(4)]
        await asyncio.sleep(0.3)
        srv.server.should_exit = True  # what SIGTERM does
        await asyncio.gather(*tasks)

    asyncio.run(run())
    srv.thread.join(30)
    assert results == [200] * 4
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


# --- against the real model --------------------------------------------------------------------

@pytest.mark.slow
def test_64_concurrent_streams_are_batched(server):
    async def stream(c, i):
        body = {"model": "smollm2", "stream": True, "max_tokens": 24,
                "messages": [{"role": "user", "content": f"Tell me fact number {i} about the ocean."}]}
        text = []
        async with c.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    text.append(delta.get("content") or "")
        return "".join(text)

    async def run():
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(*[stream(c, i) for i in range(64)])

    before = httpx.get(f"{server.url}/metrics").text
    outs = asyncio.run(run())
    assert len(outs) == 64 and all(outs)
    after = httpx.get(f"{server.url}/metrics").text
    # the step-size histogram: steps that ran more than 16 sequences at once
    def big_steps(text):
        total = metric(text, "ember:step_running_requests_count")
        m = re.search(r'^ember:step_running_requests_bucket\{le="16\.0",model_name="smollm2"\} (\S+)$', text, re.M)
        return total - float(m.group(1))
    assert big_steps(after) - big_steps(before) > 0
    # and every one of those steps was timed
    steps = metric(after, "ember:engine_step_seconds_count") - metric(before, "ember:engine_step_seconds_count")
    assert steps == metric(after, "ember:step_running_requests_count") - metric(before, "ember:step_running_requests_count")
    assert metric(after, "ember:engine_step_seconds_sum") > metric(before, "ember:engine_step_seconds_sum")


@pytest.mark.slow
def test_disconnected_streams_free_their_kv_blocks(server):
    async def abandon(c, i):
        body = {"model": "smollm2", "stream": True, "max_tokens": 400, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Write a very long essay, part {i}."}]}
        async with c.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: ")
                if n >= 3:
                    break  # leaving the block closes the connection mid-stream

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(*[abandon(c, i) for i in range(16)])

    asyncio.run(run())
    engine = server.app.state.engine.engine
    for _ in range(200):  # the aborts land at the engine's next step
        if not engine.has_unfinished_requests():
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not engine.has_unfinished_requests()
    for _ in range(100):  # the gauge is refreshed when the loop goes idle
        usage = metric(httpx.get(f"{server.url}/metrics").text, "ember:kv_cache_usage_perc")
        if usage == 0.0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert usage == 0.0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_ember_run_and_ps_use_a_running_server(tiny_llm, monkeypatch, capsys):
    from ember import cli

    with BackgroundServer(build_app(tiny_llm, "tiny")) as srv:
        monkeypatch.setenv("EMBER_HOST", srv.url)
        assert cli._running_server("tiny") == srv.url
        assert cli._running_server("not-served") is None
        assert cli.main(["run", "tiny", "Say", "hi", "--max-tokens", "5", "--temperature", "0"]) == 0
        out = capsys.readouterr().out
        assert out.strip()  # streamed from the server: the tiny model is not in the store
        assert cli.main(["ps"]) == 0
        assert "tiny" in capsys.readouterr().out
    monkeypatch.setenv("EMBER_HOST", "127.0.0.1:9")  # nothing listens there
    assert cli._running_server("tiny") is None


def test_json_body_without_json_content_type(tiny_llm):
    # `curl URL -d '{...}'`, as Ollama's docs write it, sends form-encoded headers
    with BackgroundServer(build_app(tiny_llm, "tiny")) as srv:
        body = '{"model": "tiny", "prompt": "hi", "stream": false, "options": {"num_predict": 3}}'
        r = httpx.post(f"{srv.url}/api/generate", content=body,
                       headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200 and r.json()["done"] is True
        r = httpx.post(f"{srv.url}/v1/completions", content='{"model": "tiny", "prompt": "hi", "max_tokens": 2}')
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


def test_load_in_passing_thread_returns_or_raises_and_leaves_no_thread():
    import threading

    from ember.server.serve import load_in_passing_thread

    seen = []
    assert load_in_passing_thread(lambda: seen.append(threading.current_thread()) or 42) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def broken():
        raise ValueError("bad model file")

    with pytest.raises(ValueError, match="bad model file"):
        load_in_passing_thread(broken)
