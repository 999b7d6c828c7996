"""`ember pull / list / rm / show`: the model-store subcommands, registered by ember.cli."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path

from ember.store import ModelStore, StoreError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pull",
        help="download a model into the local store",
        description="Fetch a model into the local store: a catalogue name (smollm2), a local "
        ".gguf path, or hf:OWNER/REPO/FILE.gguf. A model already present is not fetched again.",
    )
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--name", help="store under this name instead of the derived one")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser("list", aliases=["ls"], help="list the models in the local store")
    p.set_defaults(func=cmd_list)

    p = subparsers.add_parser("rm", help="remove models from the local store")
    p.add_argument("names", metavar="NAME", nargs="+")
    p.set_defaults(func=cmd_rm)

    p = subparsers.add_parser("show", help="show a stored model's manifest and GGUF metadata")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)


def _store(args: argparse.Namespace) -> ModelStore:
    # The top-level parser may offer a --models-dir; otherwise EMBER_MODELS or the default.
    return ModelStore(getattr(args, "models_dir", None))


def _error(msg: object) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _name_of(model_path: Path) -> str:
    tag_dir = model_path.parent
    return tag_dir.parent.name if tag_dir.name == "latest" else f"{tag_dir.parent.name}:{tag_dir.name}"


def cmd_pull(args: argparse.Namespace) -> int:
    try:
        path = _store(args).pull(args.spec, progress=not args.quiet, name=args.name)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was stored", file=sys.stderr)
        return 130
    except (StoreError, OSError) as e:
        return _error(e)
    print(f"pulled {_name_of(path)} -> {path}")
    return 0


def human_size(n: int) -> str:
    # Decimal units, as `ollama list` prints them.
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    if unit == "B":
        return f"{int(n)} B"
    return f"{n:.1f} {unit}" if n < 10 else f"{n:.0f} {unit}"


def human_age(when: _dt.datetime | None, now: _dt.datetime | None = None) -> str:
    if when is None:
        return "unknown"
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    secs = max(0, int((now - when).total_seconds()))
    for size, unit in ((31536000, "year"), (2592000, "month"), (604800, "week"),
                       (86400, "day"), (3600, "hour"), (60, "minute")):
        if secs >= size:
            k = secs // size
            if k == 1:
                return f"About a{'n' if unit == 'hour' else ''} {unit} ago"
            return f"{k} {unit}s ago"
    return "Less than a minute ago"


def cmd_list(args: argparse.Namespace) -> int:
    try:
        entries = _store(args).list()
    except (StoreError, OSError) as e:
        return _error(e)
    rows = [("NAME", "SIZE", "MODIFIED")]
    rows += [(e.name, human_size(e.size), human_age(e.pulled_at)) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}    {r[1]:<{widths[1]}}    {r[2]}".rstrip())
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = _store(args)
    rc = 0
    for name in args.names:
        try:
            store.remove(name)
        except (StoreError, OSError) as e:
            rc = _error(e)
            continue
        print(f"deleted '{name}'")
    return rc


def _plain(v):
    # The reader may hand back wrapped values, numpy scalars or raw bytes.
    if hasattr(v, "value") and not isinstance(v, (str, bytes)):
        v = v.value
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "replace")
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _human_count(n: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            x = n / div
            return f"{x:.1f}{suffix}" if x < 10 else f"{x:.0f}{suffix}"
    return str(n)


def _file_type_name(ft) -> str | None:
    if ft is None:
        return None
    try:
        from gguf import LlamaFileType

        return LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
    except Exception:  # unknown code or no gguf package: the raw number still says something
        return str(ft)


def gguf_summary(path: Path) -> dict | None:
    """Headline facts from the file's metadata, or None when no GGUF reader is importable."""
    try:
        from ember.gguf.reader import GGUFFile
    except ImportError:
        return None
    f = GGUFFile(path)
    try:
        meta = f.metadata
        get = lambda key: _plain(meta[key]) if key in meta else None  # noqa: E731
        arch = get("general.architecture")
        params = get("general.parameter_count")
        return {
            "architecture": arch,
            "parameters": _human_count(int(params)) if params is not None else get("general.size_label"),
            "context_length": get(f"{arch}.context_length") if arch else None,
            "embedding_length": get(f"{arch}.embedding_length") if arch else None,
            "quantization": _file_type_name(get("general.file_type")),
            "chat_template": "tokenizer.chat_template" in meta,
        }
    finally:
        close = getattr(f, "close", None)
        if callable(close):
            close()


def directory_summary(path: Path) -> dict:
    """Headline facts of a Hugging Face model directory, from config.json and the safetensors
    headers (no tensor is read)."""
    from ember.hf.config import CONFIG_FILE, read_json
    from ember.hf.safetensors import Checkpoint
    from ember.tokenizer import _chat_template_of, _read_tokenizer_config

    hf = read_json(path / CONFIG_FILE, "model config")
    ckpt = Checkpoint(path)
    try:
        params = sum(math.prod(ckpt.entry(n).shape) for n in ckpt)
        dtypes = sorted({ckpt.entry(n).dtype for n in ckpt})
    finally:
        ckpt.close()
    qc = hf.get("quantization_config")
    quant = qc.get("quant_method") if isinstance(qc, dict) else None
    return {
        "architecture": hf.get("model_type"),
        "parameters": _human_count(params),  # stored values: packed quantized weights count less
        "context_length": hf.get("max_position_embeddings"),
        "embedding_length": hf.get("hidden_size"),
        "quantization": quant or "/".join(dtypes),
        "chat_template": _chat_template_of(path, _read_tokenizer_config(path)) is not None,
    }


def model_summary(path: Path) -> dict | None:
    return directory_summary(path) if path.is_dir() else gguf_summary(path)


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        try:
            manifest = store.manifest(args.name)
        except StoreError:
            if not Path(args.name).expanduser().exists():
                raise
            manifest = None  # a file or directory outside the store
        path = store.resolve(args.name)
        if manifest is None:
            manifest = {"path": str(path)}
    except (StoreError, OSError) as e:
        return _error(e)
    summary = None
    warning = None
    try:
        summary = model_summary(path)
    except Exception as e:  # a metadata problem must not hide the manifest
        warning = f"could not read the model's metadata: {e}"
    if args.json:
        print(json.dumps({**manifest, "path": str(path), "model": summary,
                          "gguf": summary if not path.is_dir() else None}, indent=2))
    else:
        print("  Model")
        if summary:
            labels = [("architecture", "architecture"), ("parameters", "parameters"),
                      ("context length", "context_length"), ("embedding length", "embedding_length"),
                      ("quantization", "quantization")]
            for label, key in labels:
                if summary.get(key) is not None:
                    print(f"    {label:<18}{summary[key]}")
            print(f"    {'chat template':<18}{'yes' if summary['chat_template'] else 'no'}")
        print()
        print("  Manifest")
        for key in ("name", "source", "size", "sha256", "pulled_at", "format"):
            if key in manifest:
                value = manifest[key]
                if key == "size":
                    value = f"{value} ({human_size(int(value))})"
                print(f"    {key:<18}{value}")
        print(f"    {'path':<18}{path}")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


__all__ = ["register", "cmd_pull", "cmd_list", "cmd_rm", "cmd_show", "gguf_summary", "directory_summary",
           "model_summary"]
