"""tpu: ember's backend for TPUs, a JAX model runner, registered like any third-party plugin.

Importing this package must not import jax: ``ember plugins`` has to be able to say why the
backend is unavailable on a machine without it.
"""
from ember.plugins import hookimpl


@hookimpl
def ember_register_backends(register):
    from ember_tpu.backend import TpuBackend

    register(TpuBackend)
