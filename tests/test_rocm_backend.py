"""The rocm backend: the cuda plugin's kernels and runner on a ROCm build of torch. Without one,
its code runs in Triton's interpreter (float16 here, where the cuda backend's tests take float32
and bfloat16), and AMD's launch settings are checked through the DeviceSpec they follow from."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (test_cuda_kernels.py says why)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from ember.backend import BackendOptions  # noqa: E402
from ember.plugins import PluginRegistry  # noqa: E402
from ember.testing import run_check  # noqa: E402
from ember_cuda.kernels import dequant, kv_write, paged_attention as pa  # noqa: E402
from ember_cuda.kernels.launch import DeviceSpec  # noqa: E402
from ember_rocm.backend import InterpretedRocmBackend, RocmBackend  # noqa: E402

MI300 = DeviceSpec("amd", (9, 4), warp_size=64, shared_memory=64 * 1024)
H100 = DeviceSpec("nvidia", (9, 0), warp_size=32, shared_memory=227 * 1024)


@pytest.mark.skipif(torch.version.hip is not None, reason="this is a ROCm build")
def test_unavailable_without_rocm_says_why():
    reason = RocmBackend.availability().reason
    assert ("CPU-only build" in reason and "rocm" in reason) or "CUDA build: the cuda backend" in reason


def test_found_through_its_entry_point_and_asked_for_by_name():
    info = PluginRegistry().backends["rocm"]
    assert info.device_type == "rocm" and info.cls is RocmBackend and info.distribution == "ember"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the kernels run on the GPU here, not in Triton's interpreter")
@pytest.mark.parametrize("check", ["attention", "linear", "kv_allocator"])
def test_conformance_in_the_interpreter_float16(check):
    run_check(check, InterpretedRocmBackend, BackendOptions(dtype="float16"))


def test_amd_launch_settings():
    for group, dtype in [(1, torch.bfloat16), (4, torch.float16), (8, torch.float32)]:
        amd, nv = pa.prefill_config(MI300, 128, group, dtype), pa.prefill_config(H100, 128, group, dtype)
        assert amd["num_stages"] == 1 and amd["waves_per_eu"] == 2
        assert nv["num_stages"] == 2 and "waves_per_eu" not in nv
        # the query tile and one stage of K and V tiles fit the MI300's 64 KiB of LDS
        assert (amd["BLOCK_M"] + 2 * amd["BLOCK_N"]) * 128 * dtype.itemsize <= MI300.shared_memory
        d_amd = pa.decode_config(MI300, 128, group, dtype)
        assert d_amd["num_stages"] == 1 and d_amd["waves_per_eu"] == 2
    # a 64-wide wavefront: the same lanes in half the warps
    assert kv_write.launch_config(MI300, 8, 128)["num_warps"] * 2 == kv_write.launch_config(H100, 8, 128)["num_warps"]
    assert dequant.launch_config(MI300, dequant.Q.Q4_K)["BLOCKS"] == dequant.launch_config(H100, dequant.Q.Q4_K)["BLOCKS"]
