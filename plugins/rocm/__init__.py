"""rocm: ember's backend for AMD GPUs, registered like any third-party plugin.

It runs the cuda plugin's Triton kernels (shared, not copied) with AMD's launch settings, on a
ROCm build of PyTorch, where AMD GPUs answer to torch's "cuda" device.
"""
from ember.plugins import hookimpl


@hookimpl
def ember_register_backends(register):
    from ember_rocm.backend import RocmBackend

    register(RocmBackend)
