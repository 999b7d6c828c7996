"""cuda: ember's backend for NVIDIA GPUs, registered like any third-party plugin.

Its Triton kernels (``ember_cuda.kernels``) are shared with the rocm backend. Importing this
package must not import triton or initialise CUDA: ``ember plugins`` has to be able to say why the
backend is unavailable on a machine without either.
"""
from ember.plugins import hookimpl


@hookimpl
def ember_register_backends(register):
    from ember_cuda.backend import CudaBackend

    register(CudaBackend)
