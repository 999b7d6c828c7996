"""A strict GGUF v2/v3 parser.

Every length and count in the header is checked against the bytes that remain before anything is
read or allocated, so a truncated or hostile file fails with a GGUFError instead of a crash, a hang
or a giant allocation. Tensor data is never copied: `raw()` returns views of a read-only mmap.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ember.mapped_file import MappedFile

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Far above any real vocabulary or merge list, yet keeps a hostile array from becoming a list
# tens of times the file's size.
MAX_ARRAY_LEN = 1 << 24
MAX_ARRAY_DEPTH = 4
_INT64_MAX = (1 << 63) - 1

# Smallest possible encodings, used to reject counts that cannot fit in the remaining bytes.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1),
    GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4),
    GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4),
    GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
    GGUFValueType.BOOL: ("<B", 1),
}
_MIN_ITEM_BYTES = {**{t: s for t, (_, s) in _SCALARS.items()},
                   GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 4 + 8}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFError(ValueError):
    """A GGUF file is malformed, unsupported or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: ggml's ne reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                            f"only {self.size - self.pos} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"string length {n} of {what} at offset {self.pos - 8} runs past "
                            f"the end of file ({self.size - self.pos} bytes left)")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def name(self, what: str) -> str:
        b = self.raw_string(what)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8: {b[:64]!r}") from None

    def check_count(self, n: int, item_bytes: int, what: str) -> None:
        if n * item_bytes > self.size - self.pos:
            raise self.fail(f"{what} {n} cannot fit in the file ({self.size} bytes, "
                            f"{self.size - self.pos} left at offset {self.pos})")

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            # Token texts are not always valid UTF-8; surrogateescape keeps their bytes recoverable.
            return self.raw_string(f"value of {key!r}").decode("utf-8", "surrogateescape")
        if vtype == GGUFValueType.ARRAY:
            return self.array(key, depth)
        if vtype not in _SCALARS:
            raise self.fail(f"unknown value type {vtype} for key {key!r} at offset {self.pos - 4}")
        fmt, n = _SCALARS[vtype]
        self.need(n, f"value of {key!r}")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        if vtype == GGUFValueType.BOOL:
            if v > 1:
                raise self.fail(f"invalid bool value {v} for key {key!r}")
            return bool(v)
        return v

    def array(self, key: str, depth: int) -> list:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"arrays nested deeper than {MAX_ARRAY_DEPTH} in key {key!r}")
        itype = self.u32(f"array item type of {key!r}")
        n = self.u64(f"array length of {key!r}")
        if itype not in _MIN_ITEM_BYTES:
            raise self.fail(f"unknown value type {itype} for array items of key {key!r}")
        if n > MAX_ARRAY_LEN:
            raise self.fail(f"array length {n} of key {key!r} exceeds the limit {MAX_ARRAY_LEN}")
        self.check_count(n, _MIN_ITEM_BYTES[itype], f"array length of key {key!r}:")
        if itype == GGUFValueType.STRING:
            return self.string_array(n, key)
        if itype == GGUFValueType.ARRAY:
            return [self.array(key, depth + 1) for _ in range(n)]
        fmt, size = _SCALARS[itype]
        arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=n, offset=self.pos)
        self.pos += n * size
        if itype == GGUFValueType.BOOL:
            if n and arr.max() > 1:
                raise self.fail(f"invalid bool value in array {key!r}")
            return arr.astype(bool).tolist()
        return arr.tolist()

    def string_array(self, n: int, key: str) -> list[str]:
        # The hot loop of parsing (vocabularies and merges): locals only, one bounds check each.
        buf, size, pos, out = self.buf, self.size, self.pos, []
        unpack, append = _U64.unpack_from, out.append
        for i in range(n):
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"length of item {i} of {key!r}")
            (ln,) = unpack(buf, pos)
            pos += 8
            if ln > size - pos:
                raise self.fail(f"string length {ln} of item {i} of {key!r} at offset {pos - 8} "
                                f"runs past the end of file")
            append(buf[pos:pos + ln].decode("utf-8", "surrogateescape"))
            pos += ln
        self.pos = pos
        return out


class GGUFFile(MappedFile):
    """A parsed GGUF file; tensor bytes stay in a read-only mmap until `raw()` views them."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.version = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        if self.size < 4 + 4 + 8 + 8:
            self.close()
            raise GGUFError(f"{self.path}: file too small to be GGUF ({self.size} bytes)")
        try:
            self._parse(_Cursor(self._mm, self.size, self.path))
        except GGUFError:
            self.close()
            raise
        except (struct.error, UnicodeDecodeError, OverflowError) as e:  # belt and braces
            self.close()
            raise GGUFError(f"{self.path}: malformed file: {e}") from e

    def _parse(self, c: _Cursor) -> None:
        magic = bytes(c.buf[0:4])
        if magic != GGUF_MAGIC:
            raise c.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file")
        c.pos = 4
        version = c.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
                raise c.fail("big-endian GGUF files are not supported")
            raise c.fail(f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
        self.version = version
        n_tensors = c.u64("tensor_count")
        n_kv = c.u64("kv_count")
        c.check_count(n_kv, _MIN_KV_BYTES, "kv_count")
        for _ in range(n_kv):
            key = c.name("metadata key")
            vtype = c.u32(f"value type of {key!r}")
            if key in self.metadata:
                raise c.fail(f"duplicate metadata key {key!r}")
            self.metadata[key] = c.value(vtype, key)
        self.alignment = self._read_alignment(c)
        c.check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor_count")
        infos = [self._tensor_info(c) for _ in range(n_tensors)]
        self.data_offset = -(-c.pos // self.alignment) * self.alignment
        self._place_tensors(c, infos)

    def _read_alignment(self, c: _Cursor) -> int:
        a = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(a, int) or isinstance(a, bool) or a <= 0 or a & (a - 1):
            raise c.fail(f"general.alignment must be a positive power of two, got {a!r}")
        return a

    def _tensor_info(self, c: _Cursor) -> tuple:
        """(name, torch-order shape, qtype, offset relative to the data section, nbytes)"""
        name = c.name("tensor name")
        n_dims = c.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has n_dims {n_dims}, expected 1..{MAX_DIMS}")
        c.need(8 * n_dims, f"dims of tensor {name!r}")
        ne = struct.unpack_from(f"<{n_dims}Q", c.buf, c.pos)
        c.pos += 8 * n_dims
        n_elements = 1
        for d in ne:
            if d == 0 or d > _INT64_MAX:
                raise c.fail(f"tensor {name!r} has invalid dim {d} in {list(ne)}")
            n_elements *= d
        if n_elements > _INT64_MAX:
            raise c.fail(f"tensor {name!r} dims {list(ne)}: element count overflows int64")
        raw_type = c.u32(f"type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise c.fail(f"tensor {name!r} has unknown tensor type {raw_type}") from None
        if ne[0] % block:
            raise c.fail(f"tensor {name!r}: row size {ne[0]} is not a multiple of the "
                         f"{qtype.name} block size {block}")
        offset = c.u64(f"data offset of tensor {name!r}")
        nbytes = n_elements // block * type_size
        return name, tuple(reversed(ne)), qtype, offset, nbytes

    def _place_tensors(self, c: _Cursor, infos) -> None:
        for name, shape, qtype, rel, nbytes in infos:
            if name in self.tensors:
                raise c.fail(f"duplicate tensor name {name!r}")
            if rel % self.alignment:
                raise c.fail(f"tensor {name!r} data offset {rel} is misaligned "
                             f"(alignment {self.alignment})")
            start = self.data_offset + rel
            if start + nbytes > c.size:
                raise c.fail(f"tensor {name!r} data [{start}, {start + nbytes}) runs past the "
                             f"end of file ({c.size} bytes)")
            self.tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)
        prev = None
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                raise c.fail(f"tensors {prev.name!r} and {t.name!r} overlap")
            prev = t

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only, zero-copy uint8 view of the file."""
        if self._buf is None:
            raise ValueError(f"{self.path}: file is closed")
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        t = self.tensors[name]
        return self.view(t.offset, t.nbytes)

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, "
                f"{len(self.metadata)} keys, {len(self.tensors)} tensors)")
