"""A strict reader of safetensors files, and of a checkpoint's shards as one set of tensors.

The format (github.com/huggingface/safetensors): an 8-byte little-endian header length, that many
bytes of JSON naming each tensor's dtype, shape and byte range, then the data. Everything in the
header is checked against the file before any tensor is touched, so a truncated or hostile file
is an error naming the file and the tensor, never a crash or a giant allocation. Tensor bytes
stay in a read-only mmap (see ember.mapped_file): a checkpoint is never copied whole.

The `safetensors` library writes the files (transformers' save_pretrained, the quantizers); it
reads them as framework tensors, and bf16 has no numpy type, so the loader reads the bytes itself,
as the same [rows, row_nbytes] views the GGUF loader gives. The tests read every file both ways.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.mapped_file import MappedFile

# dtype -> bytes per element (the spec's list)
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
# The safetensors library refuses headers above 100 MB; a real one is a few hundred KB.
MAX_HEADER_BYTES = 100_000_000
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file or directory that ember cannot read: the message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


class SafetensorsFile(MappedFile):
    def __init__(self, path: str | os.PathLike):
        try:
            super().__init__(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
        try:
            self.metadata, self.tensors = self._parse()
        except CheckpointError:
            self.close()
            raise

    def _fail(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {msg}")

    def _parse(self) -> tuple[dict[str, str], dict[str, TensorEntry]]:
        if self.size < 8:
            raise self._fail(f"too small to be a safetensors file ({self.size} bytes)")
        n = int.from_bytes(self.view(0, 8).tobytes(), "little")
        if n > MAX_HEADER_BYTES:
            raise self._fail(f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit: not a "
                             f"safetensors file, or a corrupt one")
        if 8 + n > self.size:
            raise self._fail(f"header of {n} bytes runs past the end of the file ({self.size} bytes): "
                             f"truncated?")
        try:
            header = json.loads(self.view(8, n).tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must map strings to strings")
        data_start, data_len = 8 + n, self.size - 8 - n
        tensors: dict[str, TensorEntry] = {}
        for name, info in header.items():
            tensors[name] = self._entry(name, info, data_start, data_len)
        prev = None
        for t in sorted(tensors.values(), key=lambda t: t.offset):
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                raise self._fail(f"tensors {prev.name!r} and {t.name!r} overlap")
            prev = t
        return metadata, tensors

    def _entry(self, name: str, info, data_start: int, data_len: int) -> TensorEntry:
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise self._fail(f"{where}: header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise self._fail(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            raise self._fail(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_uint(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise self._fail(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair")
        begin, end = offsets
        if end > data_len:
            raise self._fail(f"{where}: data [{begin}, {end}) runs past the end of the data "
                             f"({data_len} bytes): truncated?")
        want = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != want:
            raise self._fail(f"{where}: {end - begin} bytes of data for shape {shape} of {dtype} "
                             f"({want} bytes)")
        return TensorEntry(name, dtype, tuple(shape), data_start + begin, end - begin)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only, zero-copy uint8 view of the file."""
        t = self.tensors[name]
        return self.view(t.offset, t.nbytes)


def _uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class Checkpoint:
    """Every tensor of a directory's safetensors files: one file, or the shards its
    model.safetensors.index.json lists. Tensors go by the names ember's layers use: the file's
    own names with the model type's renames applied (Mixtral's ``block_sparse_moe.experts.0.w1``
    is ``mlp.experts.0.gate_proj``); original_name() gives the file's."""

    def __init__(self, directory: str | os.PathLike, renames: tuple[tuple[str, str], ...] = ()):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        self._index: dict[str, str] = {}
        if index.is_file():
            shards = self._shards_from_index(index)
        elif (self.directory / SINGLE_FILE).is_file():  # transformers' name for an unsharded checkpoint
            shards = [SINGLE_FILE]
        else:
            shards = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.directory}: no *.safetensors file and no {INDEX_FILE}")
        rules = [(re.compile(pattern), repl) for pattern, repl in renames]
        self.files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}  # name -> its file, its name there
        try:
            for shard in shards:
                f = self.files[shard] = SafetensorsFile(self.directory / shard)
                for original in f.tensors:
                    name = original
                    for rule, repl in rules:
                        name = rule.sub(repl, name)
                    if name in self._where:
                        other, other_name = self._where[name]
                        raise CheckpointError(f"{self.directory}: tensor {original!r} of {shard} is also "
                                              f"in {Path(other.path).name} (as {other_name!r})")
                    self._where[name] = (f, original)
            for name, shard in self._index.items():
                if name not in self.files[shard].tensors:
                    raise CheckpointError(f"{index}: tensor {name!r} is not in {shard}, where the "
                                          f"index puts it")
        except BaseException:
            self.close()
            raise

    def _shards_from_index(self, index: Path) -> list[str]:
        try:
            doc = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: not a readable JSON index: {e}") from None
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        self._index = wmap
        shards = sorted(set(wmap.values()))
        for shard in shards:
            if Path(shard).name != shard or shard in (".", ".."):
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name in the directory")
            if not (self.directory / shard).is_file():
                names = [n for n, s in wmap.items() if s == shard]
                raise CheckpointError(f"{index}: shard {shard} is missing (it holds {names[0]!r}"
                                      + (f" and {len(names) - 1} more" if len(names) > 1 else "") + ")")
        return shards

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def original_name(self, name: str) -> str:
        return self._where[name][1]

    def entry(self, name: str) -> TensorEntry:
        f, original = self._where[name]
        return f.tensors[original]

    def file_of(self, name: str) -> SafetensorsFile:
        return self._where[name][0]

    def raw(self, name: str) -> np.ndarray:
        f, original = self._where[name]
        return f.raw(original)

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def release_pages(self) -> None:
        for f in self.files.values():
            f.release_pages()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
