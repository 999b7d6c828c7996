"""A model file mapped read-only: tensor bytes are zero-copy views, and their pages can be let go.

GGUF and safetensors files share this: a backend repacks (or uploads) each weight, then the
weight's pages leave the resident set, so a load peaks at one copy of the weights.
"""
from __future__ import annotations

import mmap
import os

import numpy as np


class MappedFile:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        self._buf: np.ndarray | None = None
        with open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = np.frombuffer(self._mm, dtype=np.uint8) if self._mm is not None else np.zeros(0, np.uint8)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """Bytes [offset, offset + nbytes) of the file: a read-only, zero-copy uint8 view."""
        if self._buf is None:
            raise ValueError(f"{self.path}: file is closed")
        return self._buf[offset:offset + nbytes]

    def release_view(self, view: np.ndarray) -> None:
        """release_pages for one tensor's bytes (a view of this file) as soon as the backend has its
        own copy: only the whole pages inside the view go; its neighbours' bytes are untouched."""
        if self._mm is None or self._buf is None or not hasattr(mmap, "MADV_DONTNEED") or view.size == 0:
            return
        start = view.ctypes.data - self._buf.ctypes.data
        if not 0 <= start <= len(self._mm) - view.nbytes:
            return  # not a view of this file
        first, end = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > first:
            self._mm.madvise(mmap.MADV_DONTNEED, first, end - first)

    def release_pages(self) -> None:
        """Let the mapped pages go from this process's resident set once the backend has its own
        copy of the weights (repacked or dequantized). The mapping stays valid: a later read (an
        embedding row) faults its page back in from the page cache."""
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Drop the mapping. Views stay valid: the mmap lives until they are gone."""
        self._buf = None
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # exported views still alive; the GC unmaps it after them
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
