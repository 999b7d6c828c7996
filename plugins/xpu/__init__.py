"""xpu: ember's backend for Intel GPUs (torch.xpu), registered like any third-party plugin."""
from ember.plugins import hookimpl


@hookimpl
def ember_register_backends(register):
    from ember_xpu.backend import XpuBackend

    register(XpuBackend)
