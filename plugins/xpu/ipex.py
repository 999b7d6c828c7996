"""intel-extension-for-pytorch (IPEX) on the XPU: its paged flash-attention kernels and fused
RMSNorm, loaded lazily and only where they can run.

The kernels used, from ``ipex.llm.modules.PagedAttention`` (the calls vLLM's XPU backend made
through ``vllm/_ipex_ops.py``):

* ``reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, ...)`` writes each
  token's key and value at its slot of a [num_blocks, block_size, num_kv_heads, head_dim] cache;
* ``flash_attn_varlen_func(out, query, key_cache, value_cache, cu_seqlens_q, cu_seqlens_kv,
  max_seqlen_q, max_seqlen_kv, scale, is_causal, block_tables, ...)`` attends a whole mixed step
  (prompt chunks over cached context and decode rows) over that cache, causal mask aligned to
  each sequence's last position.

That cache layout is the portable path's too, so a step the kernels cannot take (a float32 cache,
a GPU without the matrix engines they need) runs on the portable path over the same pool.

The trailing arguments of those two methods changed between IPEX releases (k_scale/v_scale
before or after alibi_slopes, kv_cache_dtype added), so they are passed by name, and only the
names the installed release declares.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ember.backend import AttentionMetadata
from ember.ops.layer_ops import LayerOps
from ember_xpu.portable import PortableAttention, padding, to_device

log = logging.getLogger(__name__)

DISTRIBUTION = "intel-extension-for-pytorch"
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def version_problem(ipex_version: str, torch_version: str) -> str | None:
    """Why this IPEX release cannot work beside this torch, or None. Checked before importing:
    IPEX calls exit(127) on import when torch's major.minor differs from its own."""
    release, _, label = ipex_version.partition("+")
    if label != "xpu":
        return (f"{DISTRIBUTION} {ipex_version} is not the XPU build (PyPI carries the CPU build; the XPU "
                f"wheels are on https://pytorch-extension.intel.com/release-whl/stable/xpu/us/)")
    if _major_minor(release) != _major_minor(torch_version):
        return (f"{DISTRIBUTION} {ipex_version} needs PyTorch {_major_minor(release)}.*, "
                f"but PyTorch {torch_version} is installed")
    return None


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


@functools.lru_cache(maxsize=None)
def load() -> tuple[Any, str]:
    """(the intel_extension_for_pytorch module, "") when its paged-attention kernels can be used
    here; (None, why not) otherwise."""
    if importlib.util.find_spec("intel_extension_for_pytorch") is None:
        return None, f"{DISTRIBUTION} is not installed"
    try:
        version = md.version(DISTRIBUTION)
    except md.PackageNotFoundError:  # importable without metadata: a source tree; let the import decide
        version = "(version unknown)"
    else:
        problem = version_problem(version, torch.__version__)
        if problem:
            return None, problem
    try:
        import intel_extension_for_pytorch as ipex
    except (Exception, SystemExit) as e:  # SystemExit: its own version check, should ours have missed
        return None, f"importing intel_extension_for_pytorch {version} failed: {e!r}"
    paged = paged_attention(ipex)
    missing = [n for n in ("reshape_and_cache_flash", "flash_attn_varlen_func") if not hasattr(paged, n)]
    if missing:
        return None, (f"{DISTRIBUTION} {version} has no PagedAttention.{' or .'.join(missing)}; "
                      f"2.7.10+xpu and 2.8.10+xpu have both")
    return ipex, ""


def paged_attention(ipex):
    """ipex.llm.modules.PagedAttention, or None in a release without it."""
    return getattr(getattr(getattr(ipex, "llm", None), "modules", None), "PagedAttention", None)


def bind_optional(fn: Callable, **optional) -> Callable:
    """fn(*args, **the optional arguments its signature names): one call site for releases that
    added, renamed or reordered trailing parameters."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): positionals only
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {k: v for k, v in optional.items() if takes_any or k in params}
    return functools.partial(fn, **named)


@dataclass
class _Plan:
    """One step's arguments for the varlen kernel, shared by every layer."""

    slots: torch.Tensor
    keep: torch.Tensor | None
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    cu_seqlens_k: torch.Tensor
    max_q: int
    max_k: int
    block_tables: torch.Tensor  # int32, cut to the widest context
    tokens: int  # rows that belong to a sequence; any after them are padding

    @classmethod
    def of(cls, meta: AttentionMetadata) -> "_Plan":
        slots, keep = padding(meta)
        dev = meta.block_tables.device
        ends = [0]
        for n in meta.seq_lens_list:
            ends.append(ends[-1] + n)
        max_k = max(meta.seq_lens_list)
        width = -(-max_k // meta.block_size)
        return cls(slots, keep,
                   meta.query_start_loc.to(torch.int32),
                   torch.tensor(ends, dtype=torch.int32, device=dev),
                   max(meta.query_lens_list), max_k,
                   meta.block_tables[:, :width].to(torch.int32).contiguous(),
                   sum(meta.query_lens_list))


class IpexAttention:
    """Paged attention through IPEX's flash kernels, over the portable path's cache layout."""

    def __init__(self, paged, portable: PortableAttention | None = None):
        self._write = bind_optional(paged.reshape_and_cache_flash, kv_cache_dtype="auto", k_scale=1.0, v_scale=1.0)
        self._attend = bind_optional(paged.flash_attn_varlen_func, alibi_slopes=None, k_scale=1.0, v_scale=1.0)
        self.portable = portable or PortableAttention()
        self.failed = ""  # why the kernels were given up on, once they failed
        self._meta: AttentionMetadata | None = None
        self._plan: _Plan | None = None

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if q.device != k_cache.device:
            q, k, v, meta = to_device(k_cache.device, q, k, v, meta)
        if self.failed or k_cache.dtype not in KERNEL_DTYPES:
            return self.portable.forward(q, k, v, k_cache, v_cache, meta, scale)
        try:
            return self._forward(q, k, v, k_cache, v_cache, meta, scale)
        except (RuntimeError, TypeError) as e:
            # e.g. GPUs without XMX engines, or a release whose signature we do not know: the
            # portable path reads the same cache, so the step (and the run) goes on there
            self.failed = repr(e)
            log.warning("IPEX paged attention failed (%s); using the portable path from now on", e)
            return self.portable.forward(q, k, v, k_cache, v_cache, meta, scale)

    def _forward(self, q, k, v, k_cache, v_cache, meta, scale):
        if meta is not self._meta:
            self._meta, self._plan = meta, _Plan.of(meta)
        plan = self._plan
        if plan.keep is not None:
            k, v = k[plan.keep], v[plan.keep]
        # the slots must be exactly as many as the keys (IPEX XPU before 2.8 breaks otherwise)
        self._write(k.to(k_cache.dtype).contiguous(), v.to(v_cache.dtype).contiguous(), k_cache, v_cache, plan.slots)
        query = q.to(k_cache.dtype).contiguous()
        out = torch.empty_like(query)
        self._attend(out, query, k_cache, v_cache, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_q, plan.max_k,
                     scale, True, plan.block_tables)
        if plan.tokens < out.shape[0]:
            out[plan.tokens:] = 0  # padding rows, which the kernel leaves unwritten
        return out


class IpexLayerOps(LayerOps):
    """RMSNorm, with the residual add fused, from IPEX on float16/bfloat16 activations on the XPU;
    the core's torch ops everywhere else.

    Not the core's numerics to the bit: IPEX takes the norm weight in the activation dtype and
    returns the activation dtype, where the core multiplies a float32 weight and returns float32.
    The next linear rounds to the activation dtype either way, so what differs is the rounding of
    the weight; exact mode does not use this. RoPE stays the core's: IPEX's would rotate with
    sin/cos rounded to the activation dtype, undoing the core's float32 tables at long contexts.
    """

    device_type = "xpu"  # where the kernels run (a test stand-in runs on the CPU)

    def __init__(self, functional):
        self.f = functional  # ipex.llm.functional
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _weight(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # norm weights live as long as the model: cast each once (the original is kept in the
        # entry so its id cannot be reused by another tensor)
        entry = self._weights.get(id(weight))
        if entry is None or entry[1].dtype != dtype:
            entry = self._weights[id(weight)] = (weight, weight.to(dtype))
        return entry[1]

    def rms_norm(self, x, weight, eps, residual=None):
        if (x.device.type != self.device_type or x.dtype not in KERNEL_DTYPES
                or (residual is not None and residual.dtype != x.dtype)):
            return super().rms_norm(x, weight, eps, residual)
        w = self._weight(weight, x.dtype)
        if residual is None:
            return self.f.rms_norm(x.contiguous(), w, eps), x
        # add_back: x + residual is written into residual, which callers own (LayerOps contract)
        return self.f.add_rms_norm(residual, x.contiguous(), w, None, eps, True), residual
