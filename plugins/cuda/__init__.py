"""cuda: ember's backend for NVIDIA GPUs (and, through the same Triton kernels, AMD ones).

So far only its kernels exist, in ``ember_cuda.kernels``; the backend class and its entry point
come next. Importing this package must not import triton: ``ember plugins`` has to be able to
say why the backend is unavailable on a machine without it.
"""
