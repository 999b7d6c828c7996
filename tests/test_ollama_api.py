"""Ollama's API (ember.server.ollama_api) against a real server on loopback, mostly through the
official `ollama` client: what its users and the tools built on it will see."""
import datetime as dt
import json
import re
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")
ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# Short answers keep the file fast on a 2-core CPU; greedy makes them stable.
GREEDY = {"temperature": 0, "num_predict": 16}
LONG_PROMPT = "Write a very long story about a dragon."


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


def created_at(value: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))  # RFC 3339
    assert t.tzinfo is not None
    assert abs((dt.datetime.now(dt.timezone.utc) - t).total_seconds()) < 120
    return t


def check_final(r) -> None:
    """The last object of a generate or chat: done, why, and timings in nanoseconds."""
    d = r if isinstance(r, dict) else r.model_dump()
    assert d["done"] is True and d["done_reason"] in ("stop", "length")
    created_at(d["created_at"])
    names = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
    for key in (*names, "prompt_eval_count", "eval_count"):
        assert isinstance(d[key], int) and d[key] >= 0, (key, d[key])
    assert d["prompt_eval_count"] > 0 and d["eval_count"] > 0
    # Nanoseconds, not seconds or milliseconds: a real request on this model takes more than
    # 0.1 ms of prompt evaluation and less than a minute in all.
    assert 100_000 < d["prompt_eval_duration"] and d["total_duration"] < 60e9
    parts = d["load_duration"] + d["prompt_eval_duration"] + d["eval_duration"]
    assert parts <= d["total_duration"]


def test_chat_streamed_and_not(client):
    r = client.chat(model="smollm2", messages=FRANCE, options=GREEDY)
    assert r.message.role == "assistant" and "Paris" in r.message.content
    check_final(r)

    chunks = list(client.chat(model="smollm2", messages=FRANCE, options=GREEDY, stream=True))
    *pieces, last = chunks
    assert pieces and all(c.done is False and c.message.role == "assistant" for c in pieces)
    for c in pieces:
        created_at(c.created_at)
    assert last.message.content == ""
    check_final(last)
    # greedy, so streaming changes nothing but the packaging
    assert "".join(c.message.content for c in pieces) == r.message.content
    assert last.eval_count == r.eval_count and last.prompt_eval_count == r.prompt_eval_count


def test_generate_streamed_and_not(client, server):
    r = client.generate(model="smollm2", prompt="What is the capital of France?", options=GREEDY)
    assert "Paris" in r.response
    check_final(r)
    # the prompt went through the chat template, and `context` is prompt then answer
    assert len(r.context) == r.prompt_eval_count + r.eval_count

    chunks = list(client.generate(model="smollm2:latest", prompt="What is the capital of France?",
                                  options=GREEDY, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].response == ""
    check_final(chunks[-1])
    assert "".join(c.response for c in chunks) == r.response

    # the wire format itself: NDJSON, one object per line
    with httpx.stream("POST", f"{server.url}/api/generate", timeout=60, json={
            "model": "smollm2", "prompt": "Hi", "options": {"num_predict": 3}}) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert [x["done"] for x in lines][-1] is True and len(lines) >= 2


def test_generate_raw_and_system(client):
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    r = client.generate(model="smollm2", prompt=prompt, raw=True, options=GREEDY)
    assert "Paris" in r.response and not r.context  # raw mode returns no context
    check_final(r)
    pirate = client.generate(model="smollm2", prompt="What is the capital of France?", options=GREEDY,
                             system="You are a pirate. Always answer like a pirate.")
    assert pirate.prompt_eval_count != r.prompt_eval_count  # the system prompt replaced the default


def test_options(client):
    r = client.chat(model="smollm2", messages=[{"role": "user", "content": LONG_PROMPT}],
                    options={"num_predict": 5})
    assert r.eval_count == 5 and r.done_reason == "length"

    sampled = {"temperature": 1.0, "seed": 1234, "num_predict": 8}
    a = client.generate(model="smollm2", prompt=LONG_PROMPT, options=sampled)
    b = client.generate(model="smollm2", prompt=LONG_PROMPT, options=sampled)
    assert a.response == b.response and a.eval_count == b.eval_count == 8

    s = client.chat(model="smollm2", messages=FRANCE, options={**GREEDY, "stop": ["Paris"]})
    assert "Paris" not in s.message.content and s.done_reason == "stop"

    # num_ctx below the server's context caps prompt plus output
    p = r.prompt_eval_count
    c = client.chat(model="smollm2", messages=[{"role": "user", "content": LONG_PROMPT}],
                    options={"num_ctx": p + 3, "temperature": 0})
    assert c.eval_count == 3 and c.done_reason == "length"
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="smollm2", messages=FRANCE, options={"num_ctx": 8})
    assert e.value.status_code == 400 and "context window" in e.value.error
    # unknown and unsupported options are ignored, as Ollama does
    u = client.chat(model="smollm2", messages=FRANCE,
                    options={**GREEDY, "mirostat": 2, "num_gpu": 99, "no_such_option": 1})
    assert "Paris" in u.message.content


def test_format_json_and_schema(client):
    jsonschema = pytest.importorskip("jsonschema")
    ask = [{"role": "user", "content": "What is the capital of France and its population? Answer in JSON."}]
    r = client.chat(model="smollm2", messages=ask, format="json", options={"temperature": 0, "num_predict": 80})
    assert r.done_reason == "stop"
    assert isinstance(json.loads(r.message.content), dict)

    schema = {"type": "object",
              "properties": {"capital": {"type": "string", "maxLength": 20},
                             "population": {"type": "integer"}},
              "required": ["capital", "population"], "additionalProperties": False}
    g = client.generate(model="smollm2", prompt=ask[0]["content"], format=schema,
                        options={"temperature": 0, "num_predict": 80})
    assert g.done_reason == "stop"
    jsonschema.validate(json.loads(g.response), schema)


def test_load_requests_return_at_once(server, client):
    r = client.generate(model="smollm2")
    assert r.done and r.done_reason == "load" and r.response == ""
    c = httpx.post(f"{server.url}/api/chat", json={"model": "smollm2", "messages": []}).json()
    assert c["done"] is True and c["done_reason"] == "load" and c["message"]["content"] == ""


def test_model_listing(client, server):
    (listed,) = [m for m in client.list().models if m.model == "smollm2:latest"]
    assert listed.size > 1_000_000 and len(listed.digest) == 64 and listed.modified_at
    assert listed.details.format == "gguf" and listed.details.family == "llama"
    assert listed.details.quantization_level == "Q4_1" and listed.details.parameter_size.endswith("M")

    (running,) = client.ps().models
    assert running.model == "smollm2:latest" and running.size >= listed.size
    assert running.expires_at > dt.datetime.now(dt.timezone.utc) and running.size_vram == 0
    assert running.context_length == 2048

    info = client.show("smollm2")
    assert info.details.family == "llama" and "<|im_start|>" in info.template
    assert info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.context_length"] == 8192 and info.modelinfo["llama.block_count"] == 30
    assert info.modelinfo["tokenizer.ggml.tokens"] == []  # long arrays only when verbose
    assert "num_ctx 2048" in info.parameters and 'stop "<|im_end|>"' in info.parameters
    assert info.modelfile.count("FROM ") == 1
    verbose = httpx.post(f"{server.url}/api/show", json={"model": "smollm2", "verbose": True}).json()
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 49152

    assert httpx.get(f"{server.url}/api/version").json()["version"]
    spec = httpx.get(f"{server.url}/openapi.json").json()
    chat = spec["paths"]["/api/chat"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/OllamaChatRequest")
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "application/x-ndjson"}
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nope")
    assert e.value.status_code == 404 and e.value.error == "model 'nope' not found"


@pytest.mark.parametrize("path, body, status, needle", [
    ("generate", {"model": "nope", "prompt": "hi"}, 404, "model 'nope' not found"),
    ("chat", {"model": "other:7b", "messages": FRANCE}, 404, "model 'other:7b' not found"),
    ("generate", {"prompt": "hi"}, 400, "model"),
    ("generate", {"model": "smollm2", "prompt": 42}, 400, "prompt"),
    ("generate", {"model": "smollm2", "prompt": "hi", "stream": "maybe"}, 400, "stream"),
    ("generate", {"model": "smollm2", "prompt": "hi", "options": {"temperature": "hot"}}, 400, "temperature"),
    ("generate", {"model": "smollm2", "prompt": "hi", "options": {"temperature": -1}}, 400, "temperature"),
    ("generate", {"model": "smollm2", "prompt": "hi", "options": {"num_predict": -7}}, 400, "num_predict"),
    ("generate", {"model": "smollm2", "prompt": "hi", "format": "xml"}, 400, "format"),
    ("generate", {"model": "smollm2", "prompt": "hi", "format": {"type": "nonsense"}}, 400, "schema"),
    ("generate", {"model": "smollm2", "prompt": "hi", "images": ["aGk="]}, 400, "images"),
    ("generate", {"model": "smollm2", "prompt": "hi", "think": True}, 400, "thinking"),
    ("chat", {"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("chat", {"model": "smollm2", "messages": [{"content": "hi"}]}, 400, "role"),
    ("chat", {"model": "smollm2", "messages": "hi"}, 400, "messages"),
    ("chat", {"model": "smollm2", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]},
     400, "images"),
    ("chat", {"model": "smollm2", "messages": FRANCE, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]}, 400, "tools"),
    ("generate", {"model": "smollm2", "prompt": "hi", "options": {"seed": 2**64}}, 400, "seed"),
    ("show", {"model": "nope"}, 404, "not found"),
    ("show", {"model": "/etc/passwd"}, 404, "not found"),
    ("pull", {"model": "smollm2"}, 501, "store"),
])
def test_bad_requests(server, path, body, status, needle):
    r = httpx.post(f"{server.url}/api/{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert list(err) == ["error"] and isinstance(err["error"], str) and needle in err["error"]


def test_server_healthy_after_bad_requests(server, client):
    r = httpx.post(f"{server.url}/api/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert client.chat(model="smollm2", messages=FRANCE, options=GREEDY).done


def aborted_total(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^ember:request_aborted_total\{[^}]*\} (\S+)$", text, re.M).group(1))


def wait_idle(server, timeout=10.0) -> None:
    engine = server.app.state.engine.engine
    deadline = time.monotonic() + timeout
    while engine.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.requests, "the request outlived its client"


def test_disconnect_cancels(server):
    long = {"model": "smollm2", "prompt": LONG_PROMPT, "options": {"seed": 0, "num_predict": 1000}}
    before = aborted_total(server)
    with httpx.stream("POST", f"{server.url}/api/generate", json=long, timeout=60) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["done"] is False
    wait_idle(server)
    assert aborted_total(server) == before + 1

    # not streamed: the server notices between tokens that nobody waits for the answer
    body = json.dumps({**long, "stream": False}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        engine = server.app.state.engine.engine
        deadline = time.monotonic() + 30
        while not engine.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.requests
    wait_idle(server)
    assert aborted_total(server) == before + 2


def test_pull_into_a_store(tiny_gguf, smollm2_gguf, tmp_path):
    from ember.llm import LLM
    from ember.server.serve import BackgroundServer, build_app
    from ember.store import ModelStore

    llm = LLM(str(tiny_gguf), max_model_len=256, kv_cache_memory=16 * 1024**2)
    store = ModelStore(tmp_path / "models")
    with BackgroundServer(build_app(llm, "tiny", store=store)) as srv:
        client = ollama.Client(host=srv.url)
        size = smollm2_gguf.stat().st_size
        events = list(client.pull(str(smollm2_gguf), stream=True))
        statuses = [e.status for e in events]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        assert statuses.index("verifying sha256 digest") < statuses.index("writing manifest")
        downloads = [e for e in events if e.status.startswith("downloading")]
        assert downloads and all(e.total == size and e.digest for e in downloads)
        done = [e.completed for e in downloads]
        assert done == sorted(done) and done[-1] == size

        (pulled,) = [m for m in client.list().models if m.model == "model:latest"]
        assert pulled.size == size and pulled.details.quantization_level == "Q4_1"
        assert pulled.digest == store.manifest("model")["sha256"]
        assert client.show("model").modelinfo["llama.block_count"] == 30

        # again, not streamed: already there, so nothing to fetch
        assert client.pull(str(smollm2_gguf)).status == "success"
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("no-such-model")
        assert e.value.status_code == 404
        with pytest.raises(ollama.ResponseError) as e:
            list(client.pull(str(tmp_path / "missing.gguf"), stream=True))
        assert e.value.status_code == 404
        with pytest.raises(ollama.ResponseError) as e:  # the server's other files stay out of reach
            client.pull("/etc/passwd")
        assert e.value.status_code == 400

        # a stored model that this server does not serve: a clear 404, not another model's answer
        r = httpx.post(f"{srv.url}/api/generate", json={"model": "model", "prompt": "hi"})
        assert r.status_code == 404 and "serves only 'tiny'" in r.json()["error"]
