"""Triton kernels of the cuda backend, one module each, each with a plain torch wrapper.

Launch settings come from one function per kernel that takes a ``DeviceSpec`` (see ``launch``),
so the rocm backend runs these same kernels with settings of its own. On CPU tensors the kernels
run in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported): that is how
CI, with no GPU, tests them.
"""
