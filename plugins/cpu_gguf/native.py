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
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# "native": every instruction this CPU has (the AVX-512 VNNI paths where it has them);
# "portable": baseline x86-64 (or the compiler's default elsewhere), which builds the kernels'
# scalar fallbacks, so the tests check those on any machine.
VARIANTS = ("native", "portable")


def _march(variant: str) -> list[str]:
    if variant == "native":
        return ["-march=native"]
    return ["-march=x86-64"] if os.uname().machine in ("x86_64", "AMD64") else []


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
def load(name: str, variant: str = "native") -> ctypes.CDLL | None:
    """The compiled library for csrc/<name>.c, or None (with a logged reason) if it can't be built."""
    if os.environ.get("EMBER_NO_NATIVE"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.warning("no C compiler found: cpu_gguf uses its slower pure-torch kernels")
        return None
    # the headers too: a change to one must rebuild every library that includes it
    source = "\0".join(p.read_text() for p in [SRC / f"{name}.c", *sorted(SRC.glob("*.h"))])
    flags = [*FLAGS, *_march(variant)]
    key = hashlib.sha256("\0".join([source, cc, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{variant}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *flags, str(SRC / f"{name}.c"), "-o", tmp, "-lm"], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(tmp, target)  # atomic: a concurrent build never sees half a library
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or e
            log.warning("building the %s kernel failed, using pure-torch kernels: %s", name, str(detail)[-2000:])
            Path(tmp).unlink(missing_ok=True)
            return None
    return ctypes.CDLL(str(target))


_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _attention_fn(name: str, dtype: str, argtypes: list, restype, variant: str = "native"):
    """csrc/paged_attention.c's `name` for a float32 cache, or `name`_f16 for a float16 one."""
    lib = load("paged_attention", variant)
    if lib is None:
        return None
    fn = getattr(lib, {"float32": name, "float16": name + "_f16"}[dtype])
    fn.argtypes, fn.restype = argtypes, restype
    return fn


@lru_cache(maxsize=None)
def paged_decode(dtype: str = "float32"):
    """The decode kernel for a float32 or float16 KV cache (None without a compiler)."""
    return _attention_fn("ember_paged_decode", dtype, [_p, _i64, _p, _p, _p, _i64, _p, _p, _i32, _i32, _i32, _i32,
                                                       _i64, _i32, _f32, _i32, _p, _p, _i64, _p], ctypes.c_int)


@lru_cache(maxsize=None)
def write_kv(dtype: str = "float32"):
    """Scatter new keys and values into a float32 or float16 cache (None without a compiler)."""
    return _attention_fn("ember_write_kv", dtype, [_i64, _p, _p, _i64, _p, _p, _p, _i32, _i32, _i64, _i32, _i32], None)


@lru_cache(maxsize=None)
def paged_prefill(dtype: str = "float32", variant: str = "native"):
    """Prefill and mixed-step attention (any query lengths, causal over each sequence's cache) for a
    float32 or float16 KV cache, None without a compiler; its contract and return codes are in
    csrc/paged_attention.c. `variant` picks the build (the tests run both)."""
    return _attention_fn("ember_paged_prefill", dtype, [_p, _i64, _p, _p, _p, _i64, _p, _p, _i32, _p, _i32, _i32,
                                                        _i32, _i64, _i32, _f32, _i32], ctypes.c_int, variant)


class LayerOpsLib:
    """csrc/layer_ops.c: RMSNorm (with the residual add), RoPE in place, SwiGLU."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        self.rms_norm = lib.ember_rms_norm
        self.rms_norm.argtypes, self.rms_norm.restype = [p, i64, p, i64, p, p, i64, i64, i64, f32, i32], None
        self.rope = lib.ember_rope
        self.rope.argtypes, self.rope.restype = [p, i64, i32, p, i64, i32, i64, p, p, p, i64, i32, i32], None
        self.swiglu = lib.ember_swiglu
        self.swiglu.argtypes, self.swiglu.restype = [p, i64, p, i64, i64, i64, i32], None
        self.dequant_rows = lib.ember_dequant_rows
        self.dequant_rows.argtypes, self.dequant_rows.restype = [i32, p, i64, p, i64, p, i64], i32


@lru_cache(maxsize=None)
def layer_ops(variant: str = "native") -> LayerOpsLib | None:
    lib = load("layer_ops", variant)
    return LayerOpsLib(lib) if lib is not None else None


class QuantMatmul:
    """csrc/quant_matmul.c: repack GGUF blocks at load, then int8-activation matmuls."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.supported = lib.ember_qmm_supported
        self.supported.argtypes, self.supported.restype = [i32], i32
        self.vectorized = bool(lib.ember_qmm_vectorized())
        self.amx = bool(lib.ember_qmm_amx())  # 16-row tiles on AMX (same bits as the VNNI path)
        self.set_amx = lib.ember_qmm_set_amx
        self.set_amx.argtypes, self.set_amx.restype = [i32], None
        self.repacked_size = lib.ember_repacked_size
        self.repacked_size.argtypes, self.repacked_size.restype = [i32, i64, i64], i64
        self.repack = lib.ember_repack
        self.repack.argtypes, self.repack.restype = [i32, p, i64, i64, p, i32], i32
        self.new = lib.ember_qlinear_new
        self.new.argtypes, self.new.restype = [i32, p, p, p, i64, p, i32], p
        self.run = lib.ember_qlinear_run
        self.run.argtypes, self.run.restype = [p, p, i64, i64, p], i32
        self.free = lib.ember_qlinear_free
        self.free.argtypes, self.free.restype = [p], None


@lru_cache(maxsize=None)
def quant_matmul(variant: str = "native") -> QuantMatmul | None:
    lib = load("quant_matmul", variant)
    return QuantMatmul(lib) if lib is not None else None


@lru_cache(maxsize=None)
def llama_forward(variant: str = "native") -> ctypes.CDLL | None:
    """csrc/llama_forward.c: a whole decoder step over the other libraries' kernels."""
    lib = load("llama_forward", variant)
    if lib is not None:
        lib.ember_llama_step.restype = ctypes.c_int
    return lib


def address(fn) -> int:
    """A ctypes function's entry point, to hand to C code that calls it directly."""
    return ctypes.cast(fn, ctypes.c_void_p).value
