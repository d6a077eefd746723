"""Bounded memory for file-to-file tensor surgery: a bounded parallel map, reused scratch arrays, and
handing memory-mapped input pages back once read.

Pruning a 70B TP=8 checkpoint must fit a 64 GB machine, so nothing here holds more than a few tensors;
and it must run about as fast as copying the files, so nothing here pays for memory twice.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import sys
import threading
import weakref
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from megatron.prune.io.direct_io import aligned_empty


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, ahead: int) -> Iterator[Any]:
    """``map(fn, items)`` computed by ``workers`` threads, in order, with at most ``ahead`` results computed and
    not yet consumed (the memory bound)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        todo = iter(items)
        try:
            for item in itertools.islice(todo, max(1, ahead)):
                pending.append(pool.submit(fn, item))
            while pending:
                result = pending.popleft().result()
                for item in itertools.islice(todo, 1):
                    pending.append(pool.submit(fn, item))
                yield result
                del result
        finally:
            for f in pending:
                f.cancel()


class BufferPool:
    """Scratch arrays for computed tensors, reused once their bytes are written.

    A fresh large array costs a page fault and the kernel zeroing every page (about 15% of a prune's CPU time);
    a shard repeats the same few tensor shapes layer after layer, so arrays handed back by the writer are
    taken again instead. At most ``max_idle_bytes`` wait idle; arrays never handed back are simply freed.
    """

    def __init__(self, max_idle_bytes: int = 1 << 30) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._lock = threading.Lock()
        self._idle: OrderedDict[int, np.ndarray] = OrderedDict()  # id -> array, oldest first
        self._lent: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()  # by data ptr

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, reused when one is idle."""
        with self._lock:
            for key, arr in self._idle.items():
                if arr.shape == shape and arr.dtype == dtype:
                    del self._idle[key]
                    break
            else:
                arr = aligned_empty(shape, dtype)  # block aligned: written to disk without a copy
            self._lent[arr.ctypes.data] = arr
            return arr

    def give_back(self, t: torch.Tensor) -> None:
        """``t`` will not be read again: reuse its memory if it is a whole array from :meth:`empty` (else no-op)."""
        with self._lock:
            arr = self._lent.pop(t.data_ptr(), None) if t.numel() else None
            if arr is None or arr.nbytes != t.numel() * t.element_size():
                return
            self._idle[id(arr)] = arr
            while sum(a.nbytes for a in self._idle.values()) > self.max_idle_bytes:
                self._idle.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


# ---- memory-mapped input ------------------------------------------------------------------------

_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def file_mappings(path: Path | str) -> list[tuple[int, int]]:
    """Address ranges where ``path`` is memory-mapped in this process (Linux ``/proc/self/maps``; else none)."""
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == target:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def drop_mapped_pages(t: torch.Tensor, mappings: list[tuple[int, int]]) -> int:
    """Unmap the whole pages of ``t``'s bytes that lie in one of ``mappings`` (read-only file mappings).

    They leave this process's resident set; the file's pages stay in the page cache, and touching them again
    simply maps them back, so the tensor still reads the same. Memory not in ``mappings`` is never touched
    (dropping anonymous memory would zero it). Returns the bytes dropped.
    """
    if _MADVISE is None or not t.numel():
        return 0
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    for m_lo, m_hi in mappings:
        if m_lo <= lo and hi <= m_hi:
            start = -(-lo // _PAGE) * _PAGE
            end = hi // _PAGE * _PAGE
            if end > start and _MADVISE(start, end - start, _MADV_DONTNEED) == 0:
                return end - start
            return 0
    return 0
