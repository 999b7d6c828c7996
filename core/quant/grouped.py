"""The integer weights of AWQ, GPTQ and compressed-tensors checkpoints, in one form.

Each of those formats stores, for a linear of shape [out, in], unsigned b-bit integers u, and per
group of `group_size` input columns a scale s and a zero point z, with w = s * (u - z); they differ
in how the integers and zero points are packed into int32 words, in the zero point's convention
and in whether the groups are contiguous (GPTQ's act order gives each input column a group through
g_idx). A quant method unpacks its checkpoint's tensors into a GroupedIntWeight:

    w[n, perm[j]] = scales[n, j // group_size] * u[n, j] + mins[n, j // group_size]

with the input columns reordered (perm) so that every group is contiguous, and mins = -(s * z)
computed once in float32, where it is exact (s a float16 or bfloat16 scale times a small integer).
That is the form of GGUF's Q4_1 with float32 scales, so backends run it on the kernels they have
for GGUF (cpu_gguf: ember_repack_grouped), and ``dequantize()`` is the reference they are tested
against.

The arrays are made from the checkpoint's tensors (views of the mapped file) when a backend first
asks for them, and ``release()`` drops them once it holds its own copy, so a load never holds
every layer unpacked at once.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

FORMATS = {4: "int4", 8: "int8"}  # what backends name in Backend.quant_formats


class GroupedIntWeight:
    def __init__(self, name: str, shape: tuple[int, int], bits: int, group_size: int,
                 make: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]],
                 perm: np.ndarray | None = None, method: str = "", source: str = "",
                 release_source: Callable[[], None] | None = None, source_names: tuple[str, ...] = ()):
        if bits not in FORMATS:
            raise ValueError(f"{name}: {bits}-bit integers are not supported (4 or 8)")
        if shape[1] % group_size:
            raise ValueError(f"{name}: group size {group_size} does not divide {shape[1]} input columns")
        self.name, self.shape, self.bits, self.group_size = name, tuple(shape), bits, group_size
        self.perm, self.method, self.gguf_name = perm, method, source
        self._make, self._arrays, self._release_source = make, None, release_source
        self.source_names = tuple(source_names)  # the checkpoint tensors it was made from

    @property
    def format(self) -> str:
        return FORMATS[self.bits]

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(u uint8 [out, in] in group order, scales and mins float32 [out, in // group_size])"""
        if self._arrays is None:
            u, s, m = self._make()
            out, cols = self.shape
            groups = cols // self.group_size
            if u.shape != (out, cols) or s.shape != (out, groups) or m.shape != (out, groups):
                raise ValueError(f"{self.name}: unpacked to {u.shape}, {s.shape}, {m.shape} for a "
                                 f"[{out}, {cols}] weight in groups of {self.group_size}")
            self._arrays = (np.ascontiguousarray(u, np.uint8), np.ascontiguousarray(s, np.float32),
                            np.ascontiguousarray(m, np.float32))
        return self._arrays

    def release(self) -> None:
        """Drop the unpacked arrays (a backend holds its own copy now) and the file's pages."""
        self._arrays = None
        if self._release_source is not None:
            self._release_source()

    def dequantize_numpy(self) -> np.ndarray:
        """float32 [out, in]: the reference every kernel for these weights is held to (numpy, for
        runners without torch)."""
        u, s, m = self.arrays
        g = self.group_size
        w = (u.reshape(u.shape[0], -1, g).astype(np.float32) * s[:, :, None] + m[:, :, None]).reshape(u.shape)
        if self.perm is not None:
            out = np.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w

    def dequantize(self):
        """dequantize_numpy() as a torch tensor."""
        import torch

        return torch.from_numpy(self.dequantize_numpy())

    def rows(self, start: int, stop: int) -> "GroupedIntWeight":
        """Output rows [start, stop): a column-parallel shard."""
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"{self.name}: rows [{start}, {stop}) are not inside its {self.shape[0]} rows")
        return GroupedIntWeight(self.name, (stop - start, self.shape[1]), self.bits, self.group_size,
                                lambda: tuple(a[start:stop] for a in self.arrays), self.perm, self.method,
                                self.gguf_name)

    def columns(self, start: int, stop: int) -> "GroupedIntWeight":
        """Input columns [start, stop): a row-parallel shard, at group edges and without act order."""
        g = self.group_size
        if not 0 <= start < stop <= self.shape[1] or start % g or stop % g:
            raise ValueError(f"{self.name}: columns split only at multiples of its group size {g} inside "
                             f"its {self.shape[1]} columns, not [{start}, {stop})")
        if self.perm is not None:
            raise ValueError(f"{self.name}: act-order (g_idx) weights do not split by input columns")

        def make():
            u, sc, m = self.arrays
            return u[:, start:stop], sc[:, start // g:stop // g], m[:, start // g:stop // g]

        return GroupedIntWeight(self.name, (self.shape[0], stop - start), self.bits, g, make, None, self.method,
                                self.gguf_name)

    def __repr__(self) -> str:
        return (f"GroupedIntWeight({self.name!r}, {self.format}, {self.shape}, group {self.group_size}"
                f"{', act order' if self.perm is not None else ''})")


class GroupedMethod:
    """What the integer formats' quant methods share, once their tensors are a GroupedIntWeight."""

    def dequantize(self, weight):
        return weight.dequantize()

    def can_fuse(self, weights) -> bool:
        perms = [w.perm for w in weights]
        same = all(p is None for p in perms) or all(p is not None and np.array_equal(p, perms[0]) for p in perms)
        return same and len({(w.bits, w.group_size) for w in weights}) == 1

    def split_output(self, weight, start, stop):
        return weight.rows(start, stop)

    def split_input(self, weight, start, stop):
        return weight.columns(start, stop)


def weight_format(w) -> str:
    """The format a backend must support for this weight: a GGUF type's name, or int4/int8."""
    fmt = getattr(w, "format", None)
    return fmt if isinstance(fmt, str) else w.qtype.name


# --------------------------------------------------------------------------- unpacking helpers


def unpack_int32(words: np.ndarray, bits: int, axis: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Unsigned `bits`-bit fields of int32 words, the lowest first, spread along `axis` (each word
    becomes 32 // bits values there). order: AWQ's interleave, field i holding value order[i]."""
    per = 32 // bits
    w = np.ascontiguousarray(words).view(np.uint32)
    fields = np.stack([(w >> np.uint32(bits * i)) & np.uint32((1 << bits) - 1) for i in range(per)], axis=-1)
    if order is not None:  # field i is value order[i] of its word
        fields = fields[..., np.argsort(order)]
    fields = np.moveaxis(fields, -1, axis + 1 if axis >= 0 else axis)
    shape = list(words.shape)
    shape[axis] *= per
    return fields.reshape(shape).astype(np.uint8)


def group_order(g_idx: np.ndarray, group_size: int, where: str) -> np.ndarray | None:
    """The column permutation that makes GPTQ's act-order groups contiguous (None when g_idx is the
    plain j // group_size). Each group must hold exactly group_size columns."""
    g_idx = np.asarray(g_idx).astype(np.int64)
    cols = g_idx.shape[0]
    if np.array_equal(g_idx, np.arange(cols) // group_size):
        return None
    counts = np.bincount(g_idx, minlength=cols // group_size)
    if g_idx.min() < 0 or len(counts) != cols // group_size or (counts != group_size).any():
        raise ValueError(f"{where}: g_idx does not give each of the {cols // group_size} groups "
                         f"{group_size} columns")
    return np.argsort(g_idx, kind="stable")


def act_order(ckpt, name: str, cols: int, group_size: int, names: list[str]) -> np.ndarray | None:
    """The column order that makes the groups of an act-order checkpoint contiguous, from its g_idx
    tensor `name` (None when the checkpoint has none, or a plain one); appends `name` to `names`."""
    from ember.hf.safetensors import CheckpointError

    if name not in ckpt:
        return None
    g_idx = checkpoint_array(ckpt, name, ("I32", "I64"), (cols,))
    names.append(name)
    try:
        return group_order(g_idx, group_size, f"{ckpt.file_of(name).path}: {ckpt.original_name(name)}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def checkpoint_array(ckpt, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    """A checkpoint tensor as numpy (int32, int8 and uint8 as they are; float16, bfloat16 and
    float32 as float32), after checking its dtype and shape; a CheckpointError names the file."""
    from ember.hf.safetensors import CheckpointError

    if name not in ckpt:
        raise CheckpointError(f"{ckpt.directory}: tensor {name!r} is missing")
    entry, f, original = ckpt.entry(name), ckpt.file_of(name), ckpt.original_name(name)
    if entry.dtype not in dtypes:
        raise CheckpointError(f"{f.path}: tensor {original!r} is {entry.dtype}, expected {' or '.join(dtypes)}")
    if entry.shape != tuple(shape):
        raise CheckpointError(f"{f.path}: tensor {original!r} has shape {list(entry.shape)}, expected {list(shape)}")
    raw = ckpt.raw(name)
    if entry.dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    kind = {"I32": np.int32, "I8": np.int8, "U8": np.uint8, "I64": np.int64, "F16": np.float16,
            "F32": np.float32}[entry.dtype]
    a = raw.view(kind).reshape(shape)
    return a.astype(np.float32) if entry.dtype == "F16" else a


def release_views(ckpt, names: list[str]) -> Callable[[], None]:
    """Lets the file pages under these tensors go (see ember.mapped_file)."""
    def release() -> None:
        for n in names:
            if n in ckpt:
                ckpt.file_of(n).release_view(ckpt.raw(n))
    return release


SCALE_DTYPES = ("F16", "BF16", "F32")
