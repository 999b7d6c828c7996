"""The rocm backend: the cuda backend's code on a ROCm build of PyTorch.

Everything device-specific in the kernels goes through ember_cuda.kernels.launch.DeviceSpec, which
reports vendor "amd", a 64-wide wavefront and the card's LDS size on ROCm; the launch settings
follow from it (one pipeline stage and an occupancy hint for attention, as AMD's MI300 tuning
guide advises). The runner, the profiling pass and HIP graphs (torch's CUDA graph API on ROCm)
are the cuda backend's.
"""
from __future__ import annotations

from ember.backend import Availability
from ember_cuda.backend import CudaBackend, InterpretedCudaBackend, _triton_missing, torch_build


class RocmBackend(CudaBackend):
    name = "rocm"
    device_type = "rocm"
    priority = 50
    description = ("AMD GPUs on ROCm: the cuda backend's Triton kernels with AMD launch settings, GGUF weights "
                   "dequantized on the GPU, HIP graphs for decode, sampling on the device")
    device = "cuda"  # what torch calls a ROCm GPU

    @classmethod
    def availability(cls) -> Availability:
        build = torch_build()  # without importing torch, as the cuda backend
        if build["hip"] is None:
            if build["cuda"] is not None:
                return Availability.no(f"this PyTorch ({build['__version__']}) is a CUDA build: the cuda backend runs it")
            return Availability.no(f"this PyTorch ({build['__version__']}) is a CPU-only build; install a ROCm build "
                                   "(pip install torch --index-url https://download.pytorch.org/whl/rocm6.4)")
        import torch

        if not torch.cuda.is_available():
            return Availability.no(f"no AMD GPU is visible to ROCm {torch.version.hip} "
                                   "(check HIP_VISIBLE_DEVICES and that the user is in the render group)")
        missing = _triton_missing()
        if missing:
            return Availability.no(missing.replace("'ember[cuda]'", "pytorch-triton-rocm, which ROCm builds of torch bring"))
        return Availability.yes()


class InterpretedRocmBackend(InterpretedCudaBackend):
    """The rocm backend's code in Triton's interpreter, for tests. The interpreter has no vendor:
    what differs on a card (launch settings) is tested through DeviceSpec in test_cuda_kernels."""

    name = "rocm_interpreter"
    description = "the rocm backend's Triton kernels in Triton's interpreter, on CPU tensors (for tests)"
