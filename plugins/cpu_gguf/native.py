"""The backend's C kernels: compiled once per machine on first use, loaded with ctypes.

They need only a C compiler (gcc or clang, with OpenMP), no Python headers and no torch headers,
so the build takes about a second. The shared object is cached under the user's cache directory,
keyed by the source, the flags and this CPU's feature flags; without a compiler the backend falls
back to its pure-torch paths, and says so once in the log.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)
SRC = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return os.uname().machine


def _cache_dir() -> Path:
    import platformdirs

    return Path(os.environ.get("EMBER_KERNEL_CACHE") or platformdirs.user_cache_dir("ember")) / "kernels"


@lru_cache(maxsize=None)
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library for csrc/<name>.c, or None (with a logged reason) if it can't be built."""
    if os.environ.get("EMBER_NO_NATIVE"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.warning("no C compiler found: cpu_gguf uses its slower pure-torch kernels")
        return None
    source = (SRC / f"{name}.c").read_text()
    key = hashlib.sha256("\0".join([source, cc, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *FLAGS, str(SRC / f"{name}.c"), "-o", tmp, "-lm"], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(tmp, target)  # atomic: a concurrent build never sees half a library
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or e
            log.warning("building the %s kernel failed, using pure-torch kernels: %s", name, str(detail)[-2000:])
            Path(tmp).unlink(missing_ok=True)
            return None
    return ctypes.CDLL(str(target))


@lru_cache(maxsize=None)
def paged_decode():
    lib = load("paged_attention")
    if lib is None:
        return None
    fn = lib.ember_paged_decode
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    fn.argtypes = [p, p, p, p, i64, p, p, i32, i32, i32, i32, i64, i32, f32, i32]
    fn.restype = ctypes.c_int
    return fn
