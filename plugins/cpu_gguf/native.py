"""The backend's C kernels, one build per instruction set, the best this CPU runs chosen once.

Each csrc/<name>.c is compiled once per ISA of its architecture with fixed flags (never
-march=native), so one build runs on any CPU that has that ISA, and every ISA's build computes the
same bits (the kernels do the same integer dots and float steps in the same order on every path):

    x86-64:  avx512 (x86-64-v4 + VNNI, with AMX tiles where the CPU and kernel allow),
             avx2 (x86-64-v3: AVX2, FMA, F16C), scalar (baseline x86-64)
    aarch64: neon (ARMv8.2 with the dot product and FP16), scalar (baseline ARMv8)

`pip install` builds them all into the package (setup.py); a source checkout, or an install that
had no compiler, builds the one it needs on first use into the user's cache (up to about ten
seconds a library, needing only a C compiler with OpenMP: no Python or torch headers). csrc/cpu_features.c, built for
the baseline, says what this CPU runs; EMBER_MAX_CPU_ISA caps the choice (as oneDNN's
ONEDNN_MAX_CPU_ISA does), for measuring a slower path on a faster CPU. Without a compiler or a
prebuilt library the backend falls back to its pure-torch paths, and says so once in the log.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)
SRC = Path(__file__).parent / "csrc"
PREBUILT = Path(__file__).parent / "_native"  # what setup.py builds at install time
KERNELS = ("quant_matmul", "paged_attention", "layer_ops", "llama_forward")
# -ffp-contract=off: the compiler never fuses a * b + c on its own, so a path's float steps are the
# ones its source spells out (fmaf / FMA intrinsics where it wants one) whatever the ISA flags
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off"]
# EMBER_KERNEL_FLAGS adds flags to the first-use build (say "-O1 -g -fsanitize=address", run with
# libasan preloaded); prebuilt libraries don't match them and are passed over
FLAGS += os.environ.get("EMBER_KERNEL_FLAGS", "").split()


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


# csrc/cpu_features.c's bits
FEATURES = {"avx2": 1 << 0, "avx512_vnni": 1 << 1, "amx_int8": 1 << 2, "avx_vnni": 1 << 3,
            "neon_dotprod": 1 << 8, "i8mm": 1 << 9}
# per architecture, best first: (ISA, compiler flags, the feature it needs, what it is)
_ISAS = {
    "x86_64": [
        ("avx512", ["-march=x86-64-v4", "-mavx512vnni", "-mamx-tile", "-mamx-int8", "-mtune=generic"], "avx512_vnni",
         "AVX-512 VNNI"),
        ("avx2", ["-march=x86-64-v3", "-mtune=generic"], "avx2", "AVX2 with FMA and F16C"),
        ("scalar", ["-march=x86-64", "-mtune=generic"], None, "portable C"),
    ],
    "aarch64": [
        ("neon", ["-march=armv8.2-a+dotprod+fp16"], "neon_dotprod", "NEON with the dot product"),
        ("scalar", ["-march=armv8-a"], None, "portable C"),
    ],
}


def isa_table(arch: str) -> dict[str, tuple[list[str], int, str]]:
    """An architecture's ISAs, best first: their compiler flags, the cpu_features.c bit each needs
    and what it is (the ARM tests cross-compile aarch64's on x86-64)."""
    return {isa: (flags, FEATURES.get(need, 0), what)
            for isa, flags, need, what in _ISAS.get(arch, [("scalar", [], None, "portable C")])}


ISA_TABLE = isa_table(machine())
VARIANTS = tuple(ISA_TABLE)  # this architecture's ISAs, best first; the tests run every one the CPU has


def source_key(name: str, variant: str) -> str:
    """What a build of csrc/<name>.c for `variant` depends on: its source, every header, the flags."""
    text = "\0".join(p.read_text() for p in [SRC / f"{name}.c", *sorted(SRC.glob("*.h"))])
    return hashlib.sha256("\0".join([text, *FLAGS, *ISA_TABLE[variant][0]]).encode()).hexdigest()[:16]


def _prebuilt(name: str, variant: str) -> Path | None:
    """The install-time build of `name` for `variant`, if it was built from these very sources (an
    editable install whose C files were edited since falls back to a fresh build)."""
    try:
        manifest = json.loads((PREBUILT / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get(f"{name}_{variant}") != source_key(name, variant):
        return None
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = PREBUILT / f"{name}_{variant}{suffix}"
        if path.exists():
            return path
    return None


def _cache_dir() -> Path:
    import platformdirs

    return Path(os.environ.get("EMBER_KERNEL_CACHE") or platformdirs.user_cache_dir("ember")) / "kernels"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(name: str, variant: str) -> Path | None:
    cc = compiler()
    if cc is None:
        log.warning("no C compiler and no prebuilt %s kernels: cpu_gguf uses its slower pure-torch kernels", variant)
        return None
    key = hashlib.sha256(f"{source_key(name, variant)}\0{cc}".encode()).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{variant}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, *ISA_TABLE[variant][0], str(SRC / f"{name}.c"), "-o", tmp, "-lm"],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, target)  # atomic: a concurrent build never sees half a library
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("building the %s kernel (%s) failed, using pure-torch kernels: %s", name, variant,
                    str(detail)[-2000:])
        Path(tmp).unlink(missing_ok=True)
        return None
    return target


def _library_path(name: str, variant: str) -> Path | None:
    return _prebuilt(name, variant) or _build(name, variant)


@lru_cache(maxsize=None)
def cpu_features() -> int:
    """csrc/cpu_features.c's bits for this CPU (0 when it can't be built: the scalar path only)."""
    if os.environ.get("EMBER_NO_NATIVE"):
        return 0
    path = _library_path("cpu_features", VARIANTS[-1])
    return int(ctypes.CDLL(str(path)).ember_cpu_features()) if path else 0


def feature_names() -> list[str]:
    bits = cpu_features()
    return [name for name, bit in FEATURES.items() if bits & bit]


def runnable(variant: str) -> tuple[bool, str]:
    """Whether this CPU runs `variant`'s build, and why not."""
    if variant not in ISA_TABLE:
        return False, f"{variant} is not an instruction set of {machine()} (those are: {', '.join(VARIANTS)})"
    need, what = ISA_TABLE[variant][1], ISA_TABLE[variant][2]
    if cpu_features() & need != need:
        return False, f"this CPU has no {what}"
    return True, what


@lru_cache(maxsize=None)
def selected() -> tuple[str, str]:
    """(ISA, why): the best build this CPU runs, under EMBER_MAX_CPU_ISA when that is set."""
    cap = os.environ.get("EMBER_MAX_CPU_ISA", "").strip().lower()
    if cap and cap not in ISA_TABLE:
        log.warning("EMBER_MAX_CPU_ISA=%s is not one of %s; ignored", cap, ", ".join(VARIANTS))
        cap = ""
    for variant in VARIANTS[VARIANTS.index(cap):] if cap else VARIANTS:
        ok, what = runnable(variant)
        if ok:
            better = [v for v in VARIANTS[:VARIANTS.index(variant)] if runnable(v)[0]]
            why = (f"capped by EMBER_MAX_CPU_ISA={cap}" if better else
                   "the best this CPU runs" + (f" (it lacks {ISA_TABLE[VARIANTS[0]][2]})" if variant != VARIANTS[0] else ""))
            return variant, f"{what}: {why}"
    return VARIANTS[-1], "portable C"


def describe() -> str:
    """One line for `ember plugins --verbose`: which kernels run here, and why."""
    variant, why = selected()
    if os.environ.get("EMBER_NO_NATIVE"):
        return "C kernels disabled (EMBER_NO_NATIVE): pure-torch kernels"
    where = "prebuilt" if _prebuilt("quant_matmul", variant) else "built on first use" if compiler() else "unavailable (no compiler)"
    feats = ", ".join(feature_names()) or "none"
    return f"{machine()} kernels: {variant} ({why}); CPU features: {feats}; libraries {where}"


@lru_cache(maxsize=None)
def load(name: str, variant: str | None = None) -> ctypes.CDLL | None:
    """csrc/<name>.c built for `variant` (default: the selected ISA), or None (with a logged reason)
    when there is neither a prebuilt library nor a compiler. Loading a build this CPU can't run
    raises, rather than crash at its first instruction."""
    if os.environ.get("EMBER_NO_NATIVE"):
        return None
    variant = variant or selected()[0]
    ok, why = runnable(variant)
    if not ok:
        raise RuntimeError(f"cannot load the {variant} kernels: {why}")
    path = _library_path(name, variant)
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:  # a broken build (say, an unresolved symbol): the torch paths still run
        log.warning("loading the %s kernel (%s) failed, using pure-torch kernels: %s", name, variant, e)
        return None


_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _attention_fn(name: str, dtype: str, argtypes: list, restype, variant: str | None = None):
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
def paged_prefill(dtype: str = "float32", variant: str | None = None):
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
def layer_ops(variant: str | None = None) -> LayerOpsLib | None:
    lib = load("layer_ops", variant)
    return LayerOpsLib(lib) if lib is not None else None


class QuantMatmul:
    """csrc/quant_matmul.c: repack GGUF blocks at load, then int8-activation matmuls."""

    def __init__(self, lib: ctypes.CDLL):
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.supported = lib.ember_qmm_supported
        self.supported.argtypes, self.supported.restype = [i32], i32
        self.vectorized = bool(lib.ember_qmm_vectorized())
        lib.ember_qmm_path.restype = ctypes.c_char_p
        self.path = lib.ember_qmm_path().decode()  # "avx512-vnni", "avx2" or "scalar"
        self.amx = bool(lib.ember_qmm_amx())  # 16-row tiles on AMX (same bits as the VNNI path)
        self.set_amx = lib.ember_qmm_set_amx
        self.set_amx.argtypes, self.set_amx.restype = [i32], None
        self.repacked_size = lib.ember_repacked_size
        self.repacked_size.argtypes, self.repacked_size.restype = [i32, i64, i64], i64
        self.repack = lib.ember_repack
        self.repack.argtypes, self.repack.restype = [i32, p, i64, i64, p, i32], i32
        self.new = lib.ember_qlinear_new
        self.new.argtypes, self.new.restype = [i32, p, p, p, i64, p, i32, i32], p
        self.run = lib.ember_qlinear_run
        self.run.argtypes, self.run.restype = [p, p, i64, i64, p], i32
        self.repack_grouped = lib.ember_repack_grouped
        self.repack_grouped.argtypes, self.repack_grouped.restype = [i32, p, p, p, i64, i64, p, i32], i32
        self.set_perm = lib.ember_qlinear_set_perm
        self.set_perm.argtypes, self.set_perm.restype = [p, p], None
        self.free = lib.ember_qlinear_free
        self.free.argtypes, self.free.restype = [p], None


@lru_cache(maxsize=None)
def quant_matmul(variant: str | None = None) -> QuantMatmul | None:
    lib = load("quant_matmul", variant)
    return QuantMatmul(lib) if lib is not None else None


@lru_cache(maxsize=None)
def llama_forward(variant: str | None = None) -> ctypes.CDLL | None:
    """csrc/llama_forward.c: a whole decoder step over the other libraries' kernels."""
    lib = load("llama_forward", variant)
    if lib is not None:
        lib.ember_llama_step.restype = ctypes.c_int
    return lib


def reset() -> None:
    """Forget every choice and library loaded, so the next call follows EMBER_MAX_CPU_ISA and
    EMBER_NO_NATIVE again (for tests that run one model on several ISAs)."""
    for fn in (cpu_features, selected, load, paged_decode, write_kv, paged_prefill, layer_ops, quant_matmul,
               llama_forward):
        fn.cache_clear()


def address(fn) -> int:
    """A ctypes function's entry point, to hand to C code that calls it directly."""
    return ctypes.cast(fn, ctypes.c_void_p).value
