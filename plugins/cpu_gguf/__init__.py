"""cpu_gguf: ember's CPU backend for GGUF models, registered like any third-party plugin."""
from ember.plugins import hookimpl

from ember_cpu_gguf.backend import CpuGgufBackend


@hookimpl
def ember_register_backends(register):
    register(CpuGgufBackend)
