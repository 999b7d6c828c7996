"""cpu_gguf's C kernels for aarch64 on an x86-64 machine: cross-compiled with Debian's
gcc-aarch64-linux-gnu, run under qemu-aarch64 (qemu-user) through tests/arm/harness.c, and the same
calls made on this machine's x86-64 build through ctypes, so a test can compare the two bit for bit.

A call is (op, ints, floats, arrays, ret): the kernel, its integer and float arguments, its arrays
(numpy arrays, or None for a NULL pointer), and the indices of the arrays it writes. Both runners
return, per call, (rc, [bytes of each written array, then any the op adds]); harness.c documents
the file format and each op's arguments, and `X86_OPS` below makes the same calls.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
REPO = HERE.parent.parent
CSRC = REPO / "plugins" / "cpu_gguf" / "csrc"  # where native.SRC is not there to say
CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"

# qemu CPU models with just what an ISA needs: a build that uses anything more dies of SIGILL there
QEMU_CPU = {0: "cortex-a53", 1 << 8: "cortex-a76"}  # ARMv8.0; ARMv8.2 with dotprod and FP16


def unavailable() -> str | None:
    """Why the ARM tests can't run here, or None."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return ("cross-testing the aarch64 kernels needs Linux on x86-64 "
                f"(this is {platform.system()} {platform.machine()})")
    missing = [tool for tool, pkg in [(CC, "gcc-aarch64-linux-gnu"), (QEMU, "qemu-user")] if not shutil.which(tool)]
    if missing:
        return (f"{' and '.join(missing)} not found: install Debian's gcc-aarch64-linux-gnu and qemu-user "
                "(.ci/run does) to run cpu_gguf's aarch64 kernels under emulation")
    # the toolchain as a whole: C library headers (libc6-dev-arm64-cross, only a Recommends of the
    # compiler), a static OpenMP runtime, and qemu running what they make
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "probe.c", Path(d) / "probe"
        src.write_text("#include <math.h>\n#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
        try:
            r = subprocess.run([CC, "-static", "-fopenmp", str(src), "-o", str(exe), "-lm"], capture_output=True,
                               text=True, timeout=60)
            if r.returncode:
                return (f"{CC} cannot build a static OpenMP program (is libc6-dev-arm64-cross installed?): "
                        f"{r.stderr.strip()[-300:]}")
            r = subprocess.run([QEMU, "-L", SYSROOT, str(exe)], capture_output=True, text=True, timeout=60)
            if r.returncode:
                return f"{QEMU} cannot run an aarch64 program here (exit {r.returncode}): {r.stderr.strip()[-300:]}"
        except (OSError, subprocess.SubprocessError) as e:
            return f"the aarch64 toolchain probe failed: {e}"
    return None


def arm_isas() -> list[tuple[str, list[str], int]]:
    from ember_cpu_gguf import native

    # native.py's table, so the test builds what would ship: (ISA, flags, cpu_features bit), best first
    return [(isa, list(flags), need) for isa, (flags, need, _) in native.isa_table("aarch64").items()]


def compile_flags() -> list[str]:
    """native.py's flags without the shared-library ones (the harness links the objects statically)."""
    from ember_cpu_gguf import native

    return [f for f in native.FLAGS if f not in ("-shared", "-fPIC", "-fpic")]


def qemu_cpu(need: int) -> str:
    return QEMU_CPU.get(need, "max")


class BuildError(RuntimeError):
    pass


class HarnessError(RuntimeError):
    """The harness died (a kernel crashed, or hit an instruction the emulated CPU lacks)."""


# the kernel library each harness binary links, by the batches it serves
LIBRARIES = ("quant_matmul", "paged_attention", "layer_ops")


@dataclass
class Build:
    isa: str
    cpu: str  # the qemu -cpu model it runs under
    binaries: dict[str, Path] = field(default_factory=dict)  # kernel library -> its harness
    errors: dict[str, str] = field(default_factory=dict)  # csrc file or library -> the compiler's message
    compiled: list[str] = field(default_factory=list)  # the csrc/*.c files that compiled

    def binary(self, library: str) -> Path:
        if library not in self.binaries:
            raise BuildError(self.errors.get(library) or f"no {library} harness for {self.isa}")
        return self.binaries[library]


def csrc() -> Path:
    """The sources native.py builds (so this tests exactly those)."""
    from ember_cpu_gguf import native

    return Path(getattr(native, "SRC", CSRC))


def build_all(out: Path, isas=None, flags=None) -> dict[str, Build]:
    """Every csrc/*.c as its own object (they share static helper names, as their separate libraries
    in native.py do), for each aarch64 ISA, all compilations at once; then per kernel library a
    harness linked statically over it (and cpu_features.c). A file that fails to compile costs
    only the tests of its library: Build.errors keeps the compiler's message."""
    isas = isas or arm_isas()
    flags = flags or compile_flags()
    src_dir = csrc()
    sources = sorted(src_dir.glob("*.c"))
    jobs, builds = [], {}
    for isa, march, need in isas:
        d = out / isa
        d.mkdir(parents=True, exist_ok=True)
        builds[isa] = Build(isa, qemu_cpu(need))
        for src in [*sources, HERE / "harness.c"]:
            cmd = [CC, *flags, *march, "-I", str(src_dir), "-c", str(src), "-o", str(d / f"{src.stem}.o")]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            jobs.append((builds[isa], src, cmd, proc))
    for b, src, cmd, proc in jobs:
        output, _ = proc.communicate(timeout=300)
        if proc.returncode:
            b.errors[src.stem] = f"cross-compiling {src.name} for {b.isa} failed:\n$ {' '.join(cmd)}\n{output}"
        elif src.parent == src_dir:
            b.compiled.append(src.name)
    links = []
    for isa, b in builds.items():
        d = out / isa
        extra = [str(d / "cpu_features.o")] if "cpu_features.c" in b.compiled else []
        for lib in LIBRARIES:
            failed = [b.errors[n] for n in ("harness", lib) if n in b.errors]
            if failed or not (src_dir / f"{lib}.c").exists():
                b.errors[lib] = "\n".join(failed) or f"no {lib}.c in {src_dir}"
                continue
            cmd = [CC, "-static", "-fopenmp", str(d / "harness.o"), str(d / f"{lib}.o"), *extra,
                   "-o", str(d / f"harness-{lib}"), "-lm"]
            links.append((b, lib, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                        text=True)))
    for b, lib, cmd, proc in links:
        output, _ = proc.communicate(timeout=300)
        if proc.returncode:
            b.errors[lib] = f"linking the {lib} harness for {b.isa} failed:\n$ {' '.join(cmd)}\n{output}"
        else:
            b.binaries[lib] = Path(cmd[cmd.index("-o") + 1])
    return builds


# ------------------------------------------------------------------------------------------------
# calls and the file format


@dataclass
class Call:
    op: str
    ints: list[int]
    floats: list[float]
    arrays: list  # numpy arrays (any dtype; sent as their bytes) or None
    ret: list[int]  # indices of the arrays the call writes
    meta: dict = field(default_factory=dict)  # for the test's checks; not sent


def _pad(n: int) -> bytes:
    return b"\0" * ((8 - n % 8) % 8)


def encode(calls: list[Call]) -> bytes:
    parts = [b"EMBI", struct.pack("<I", len(calls))]
    for c in calls:
        op = c.op.encode()
        assert len(op) <= 16, c.op
        parts.append(op.ljust(16, b"\0"))
        parts.append(struct.pack("<4i", len(c.ints), len(c.floats), len(c.arrays), len(c.ret)))
        parts.append(struct.pack(f"<{len(c.ints)}q", *c.ints))
        parts.append(struct.pack(f"<{len(c.floats)}d", *c.floats))
        for a in c.arrays:
            if a is None:
                parts.append(struct.pack("<q", -1))
                continue
            raw = np.ascontiguousarray(a).tobytes()
            parts += [struct.pack("<q", len(raw)), raw, _pad(len(raw))]
        parts.append(struct.pack(f"<{len(c.ret)}q", *c.ret))
    return b"".join(parts)


def decode(data: bytes) -> list[tuple[int, list[bytes]]]:
    if data[:4] != b"EMBO":
        raise ValueError("not a harness output file")
    (n,), pos, out = struct.unpack_from("<I", data, 4), 8, []
    for _ in range(n):
        rc, k = struct.unpack_from("<qq", data, pos)
        pos += 16
        arrays = []
        for _ in range(k):
            (size,) = struct.unpack_from("<q", data, pos)
            pos += 8
            arrays.append(data[pos:pos + size])
            pos += size + (8 - size % 8) % 8
        out.append((rc, arrays))
    if pos != len(data):
        raise ValueError("trailing bytes in the harness output")
    return out


def run_arm(build: Build, library: str, calls: list[Call], workdir: Path, name: str, cpu: str | None = None,
            timeout: float = 300) -> list[tuple[int, list[bytes]]]:
    """The calls, in one process of `library`'s harness under qemu-aarch64 (BuildError if it
    did not build)."""
    binary = build.binary(library)
    tag = f"{name}-{build.isa}-{cpu or build.cpu}"
    src, dst = workdir / f"{tag}.in", workdir / f"{tag}.out"
    src.write_bytes(encode(calls))
    env = dict(os.environ, OMP_WAIT_POLICY="passive")  # idle emulated threads must not spin
    cmd = [QEMU, "-cpu", cpu or build.cpu, "-L", SYSROOT, str(binary), str(src), str(dst)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode:
        raise HarnessError(f"the {build.isa} harness failed (exit {r.returncode}) on {name}:\n$ {' '.join(cmd)}\n"
                           f"{r.stdout}{r.stderr}")
    return decode(dst.read_bytes())


# ------------------------------------------------------------------------------------------------
# the same calls on this machine's x86-64 build, through native.py


def _ptr(a):
    return None if a is None else a.ctypes.data


def _copies(c: Call):
    return [None if a is None else np.array(a, copy=True, order="C") for a in c.arrays]


def _x86_info(c, arrs, variant, native):
    ks = native.quant_matmul(variant)
    o = arrs[0].view(np.int32)
    for t in range(64):
        o[t] = ks.supported(t)
    o[64], o[65] = int(ks.vectorized), int(ks.amx)
    o[66] = native.cpu_features() if hasattr(native, "cpu_features") else -1
    return 0, []


def _x86_qlinear(c, arrs, variant, native):
    ks = native.quant_matmul(variant)
    nparts, K, M, ldx, threads, flags = c.ints
    types, ns, x, bias = arrs[0].view(np.int32), arrs[1].view(np.int64), arrs[2], arrs[3]
    N = int(ns.sum())
    y = np.full(M * N, np.nan, np.float32)
    rc, bufs = 0, []
    for p in range(nparts):
        size = ks.repacked_size(int(types[p]), int(ns[p]), K)
        buf = np.zeros(max(size, 1), np.uint8)
        t, n_p = int(types[p]), int(ns[p])
        if size <= 0:
            r = -2
        elif t in (260, 264):  # grouped: u [N][K] bytes, then s and m float32 [N][K/32], as harness.c reads them
            base = arrs[4 + p].ctypes.data
            r = ks.repack_grouped(t, base, base + n_p * K, base + n_p * K + 4 * n_p * (K // 32), n_p, K,
                                  buf.ctypes.data, threads)
        else:
            r = ks.repack(t, _ptr(arrs[4 + p]), n_p, K, buf.ctypes.data, threads)
        rc = rc or r
        bufs.append(buf[:max(size, 0)])
    if rc == 0:
        n = len(bufs)
        h = ks.new(n, (ctypes.c_int * n)(*map(int, types)), (ctypes.c_void_p * n)(*(b.ctypes.data for b in bufs)),
                   (ctypes.c_int64 * n)(*map(int, ns)), K, _ptr(bias), threads, flags)
        assert h
        rc = ks.run(h, x.ctypes.data, ldx, M, y.ctypes.data)
        ks.free(h)
    return rc, [y.tobytes(), *(b.tobytes() for b in bufs)]


# the argument types native.py declares for these (used where its wrapper takes no variant)
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_ARGTYPES = {
    "ember_paged_decode": ([_P, _I64, _P, _P, _P, _I64, _P, _P, _I32, _I32, _I32, _I32, _I64, _I32, _F32, _I32, _P, _P,
                            _I64, _P], ctypes.c_int),
    "ember_write_kv": ([_I64, _P, _P, _I64, _P, _P, _P, _I32, _I32, _I64, _I32, _I32], None),
    "ember_paged_prefill": ([_P, _I64, _P, _P, _P, _I64, _P, _P, _I32, _P, _I32, _I32, _I32, _I64, _I32, _F32, _I32],
                            ctypes.c_int),
}


def _attention_lib_fn(native, variant, base, dtype):
    """native.py's wrapper for `variant` where it takes one; else the symbol from native.load, with
    the argument types native.py gives it."""
    import inspect

    wrapper = getattr(native, base.replace("ember_", ""), None)
    if wrapper is not None and "variant" in inspect.signature(wrapper).parameters:
        return wrapper(dtype, variant=variant)
    fn = getattr(native.load("paged_attention", variant), base + ("_f16" if dtype == "float16" else ""))
    fn.argtypes, fn.restype = _ARGTYPES[base]
    return fn


def _dtype(op):
    return "float16" if op.endswith("_f16") else "float32"


def _x86_decode(c, arrs, variant, native):
    fn = _attention_lib_fn(native, variant, "ember_paged_decode", _dtype(c.op))
    ldq, bt_stride, B, H, KVH, D, NB, BS, threads, ldkv = c.ints
    q, kc, vc, bt, lens, out, kn, vn, slots = arrs
    return fn(_ptr(q), ldq, _ptr(kc), _ptr(vc), _ptr(bt), bt_stride, _ptr(lens), _ptr(out), B, H, KVH, D, NB, BS,
              c.floats[0], threads, _ptr(kn), _ptr(vn), ldkv, _ptr(slots)), []


def _x86_prefill(c, arrs, variant, native):
    fn = _attention_lib_fn(native, variant, "ember_paged_prefill", _dtype(c.op))
    ldq, bt_stride, nseq, H, KVH, D, NB, BS, threads = c.ints
    q, kc, vc, bt, starts, lens, out = arrs
    return fn(_ptr(q), ldq, _ptr(kc), _ptr(vc), _ptr(bt), bt_stride, _ptr(starts), _ptr(lens), nseq, _ptr(out), H,
              KVH, D, NB, BS, c.floats[0], threads), []


def _x86_write_kv(c, arrs, variant, native):
    fn = _attention_lib_fn(native, variant, "ember_write_kv", _dtype(c.op))
    ntok, ldkv, KVH, D, NB, BS, threads = c.ints
    kn, vn, slots, kc, vc = arrs
    fn(ntok, _ptr(kn), _ptr(vn), ldkv, _ptr(slots), _ptr(kc), _ptr(vc), KVH, D, NB, BS, threads)
    return 0, []


def _x86_rms_norm(c, arrs, variant, native):
    ldx, ldr, ldo, M, D, threads = c.ints
    x, res, w, out = arrs
    native.layer_ops(variant).rms_norm(_ptr(x), ldx, _ptr(res), ldr, _ptr(w), _ptr(out), ldo, M, D, c.floats[0],
                                       threads)
    return 0, []


def _x86_rope(c, arrs, variant, native):
    ldq, hq, ldk, hk, M, ldc, D, rot = c.ints
    q, k, pos, cos, sin = arrs
    native.layer_ops(variant).rope(_ptr(q), ldq, hq, _ptr(k), ldk, hk, M, _ptr(pos), _ptr(cos), _ptr(sin), ldc, D, rot)
    return 0, []


def _x86_swiglu(c, arrs, variant, native):
    ldx, ldo, M, I, threads = c.ints
    x, out = arrs
    native.layer_ops(variant).swiglu(_ptr(x), ldx, _ptr(out), ldo, M, I, threads)
    return 0, []


def _x86_dequant_rows(c, arrs, variant, native):
    qtype, row_bytes, n, dim = c.ints
    table, ids, out = arrs
    return native.layer_ops(variant).dequant_rows(qtype, _ptr(table), row_bytes, _ptr(ids), n, _ptr(out), dim), []


X86_OPS = {"info": _x86_info, "qlinear": _x86_qlinear, "decode": _x86_decode, "decode_f16": _x86_decode,
           "prefill": _x86_prefill, "prefill_f16": _x86_prefill, "write_kv": _x86_write_kv,
           "write_kv_f16": _x86_write_kv, "rms_norm": _x86_rms_norm, "rope": _x86_rope, "swiglu": _x86_swiglu,
           "dequant_rows": _x86_dequant_rows}


def run_x86(calls: list[Call], variant: str) -> list[tuple[int, list[bytes]]]:
    """The calls on native.py's x86-64 build for `variant`, with the harness's reply format."""
    from ember_cpu_gguf import native

    out = []
    for c in calls:
        arrs = _copies(c)
        rc, extra = X86_OPS[c.op](c, arrs, variant, native)
        out.append((int(rc), [arrs[i].tobytes() for i in c.ret] + extra))
    return out
