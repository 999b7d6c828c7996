"""What launch settings depend on: a small description of the device a kernel runs on.

Every kernel's settings name enable_fp_fusion: Triton 3.9 warns when it is left to its default,
which 3.10 turns off. The interpreter ignores it, as it ignores num_warps and num_stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class DeviceSpec:
    vendor: str  # "nvidia", "amd" or "interpreter" (Triton's, on CPU tensors)
    capability: tuple[int, int] = (0, 0)  # compute capability (AMD: gfx major, minor)
    warp_size: int = 32
    shared_memory: int = 48 * 1024  # bytes a program may use (the opt-in maximum)

    @property
    def interpreter(self) -> bool:
        return self.vendor == "interpreter"


INTERPRETER = DeviceSpec("interpreter")


def describe(device: torch.device | str) -> DeviceSpec:
    return _describe(torch.device(device))


@lru_cache(maxsize=None)  # asked on every launch
def _describe(device: torch.device) -> DeviceSpec:
    if device.type != "cuda":
        return INTERPRETER
    props = torch.cuda.get_device_properties(device)
    amd = torch.version.hip is not None
    return DeviceSpec(
        vendor="amd" if amd else "nvidia",
        capability=(props.major, props.minor),
        warp_size=getattr(props, "warp_size", 64 if amd else 32),
        shared_memory=getattr(props, "shared_memory_per_block_optin", 48 * 1024),
    )


def head_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # q, k and v are often strided views of one fused projection; the kernels take any row and
    # head strides but read head_dim as contiguous
    return x if x.stride(-1) == 1 else x.contiguous()
