"""The cpu_gguf kernels, built when the package is installed: csrc/*.c once per instruction set of
this architecture (see plugins/cpu_gguf/native.py, which owns the list and the flags), loaded at run
time with ctypes, the best build the CPU runs chosen once. A build that fails (no C compiler) is a
warning, not a failed install: the kernels are then built on first use, or the backend falls back
to its pure-torch paths."""
import importlib.util
import json
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("_ember_native", HERE / "plugins/cpu_gguf/native.py")
native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native)  # standard library only at import time


SOURCE_DIR = HERE / "plugins/cpu_gguf/_native"
SOURCE_DIR.mkdir(exist_ok=True)  # an editable install copies the libraries here


def _libraries():
    for name in (*native.KERNELS, "cpu_features"):
        for variant in native.VARIANTS if name != "cpu_features" else native.VARIANTS[-1:]:
            yield name, variant


class BuildKernels(build_ext):
    """Plain shared libraries (no Python API), so each is optional, and a manifest records the
    sources each was built from: native.py ignores a library its sources have moved past."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1  # thirteen small libraries

    def build_extension(self, ext):
        Path(self.get_ext_fullpath(ext.name)).parent.mkdir(parents=True, exist_ok=True)
        try:
            super().build_extension(ext)
            self._built.append(ext.name)
        except Exception as e:  # noqa: BLE001 - any compiler failure leaves the first-use build
            self.warn(f"building {ext.name} failed ({e}); it will be built on first use if a compiler is there")

    def run(self):
        self._built = []
        super().run()
        outs = {Path(self.get_ext_fullpath(self.extensions[0].name)).parent}
        if self.inplace or getattr(self, "editable_mode", False):  # the libraries are copied into the tree
            outs.add(SOURCE_DIR)
        keys = {}
        for name, variant in _libraries():
            if f"ember_cpu_gguf._native.{name}_{variant}" in self._built:
                keys[f"{name}_{variant}"] = native.source_key(name, variant)
        for out in outs:
            out.mkdir(parents=True, exist_ok=True)
            (out / "manifest.json").write_text(json.dumps(keys, indent=1, sort_keys=True))

    def get_export_symbols(self, ext):
        return []  # not Python modules: nothing named PyInit_* to export


def extensions():
    if os.environ.get("EMBER_NO_NATIVE"):
        return []
    return [Extension(f"ember_cpu_gguf._native.{name}_{variant}",
                      sources=[f"plugins/cpu_gguf/csrc/{name}.c"],
                      depends=[str(p.relative_to(HERE)) for p in sorted(native.SRC.glob("*.h"))],
                      extra_compile_args=[f for f in native.FLAGS if f not in ("-shared", "-fPIC")]
                      + native.ISA_TABLE[variant][0],
                      extra_link_args=["-fopenmp"], libraries=["m"], optional=True)
            for name, variant in _libraries()]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildKernels})
