"""A write-only file written front to back, through ``O_DIRECT`` where the filesystem takes it.

Buffered ``write()`` copies every byte into the page cache one page at a time; on the machines measured that
costs a CPU core about a second per GB, more than the pruning itself. Direct I/O hands whole aligned blocks
to the device with almost no CPU, so a prune runs at disk speed. Bytes are gathered into two page-aligned
staging buffers: one fills while a background thread writes the other. Where direct I/O is refused (tmpfs,
some network filesystems, an unaligned device) the file falls back to ordinary writes, with the same result;
``MEGATRON_PRUNE_DIRECT_IO=0`` asks for ordinary writes everywhere.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path
from types import TracebackType

import numpy as np

ALIGN = 4096  # offset, length and address alignment direct I/O needs on every common device and filesystem
STAGING_BYTES = 32 << 20
_SMALL = 1 << 16  # writes below this go through a plain memoryview copy (no numpy overhead)
_ZERO_COPY = 1 << 20  # aligned writes from this size on skip the staging copy


def _address(view: memoryview) -> int:
    """Address of a (possibly read-only) buffer's first byte."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if view.nbytes else 0


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """``np.empty`` whose data starts on an :data:`ALIGN` boundary, so it can be written without a copy."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


ENV_SWITCH = "MEGATRON_PRUNE_DIRECT_IO"  # "0": always ordinary buffered writes


def _open_direct(path: Path) -> int | None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


class SequentialFile:
    """``write``/``close`` like a binary file opened ``"wb"``; ``direct`` says whether O_DIRECT is in use."""

    def __init__(self, path: Path | str, staging_bytes: int = STAGING_BYTES) -> None:
        self.path = Path(path)
        fd = _open_direct(self.path)
        self.direct = fd is not None
        self._staged = self.direct  # aligned staging + pwrite, kept even if direct I/O is refused later
        self._fd = fd if fd is not None else os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._size = 0  # bytes accepted so far
        self._closed = False
        self._lock = threading.Lock()
        self._retired: list[int] = []  # descriptors replaced by a fall-back, closed with the file
        if not self._staged:
            return
        size = max(ALIGN, staging_bytes // ALIGN * ALIGN)
        # anonymous maps are page aligned; each array keeps its map alive
        self._bufs = [np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8) for _ in range(2)]
        self._fill = 0  # which buffer fills
        self._used = 0  # bytes in it
        self._offset = 0  # file offset of the filling buffer's first byte
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- the writer thread -------------------------------------------------------------------------
    def _pwrite_all(self, buf: np.ndarray | memoryview, n: int, offset: int) -> None:
        view = memoryview(buf)[:n]
        done = 0
        while done < n:
            fd = self._fd
            try:
                done += os.pwrite(fd, view[done:], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL or (fd == self._fd and not self.direct):
                    raise
                if fd == self._fd:  # (else another thread has fallen back already: retry on its descriptor)
                    self._fall_back()  # the filesystem opened O_DIRECT but refuses it for this I/O
        del view

    def _fall_back(self) -> None:
        """Continue with ordinary writes (pwrite keeps the offsets); the O_DIRECT descriptor is closed at the end
        because the other thread may still be using it (it then gets EINVAL too and retries here)."""
        with self._lock:
            if self.direct:
                self._retired.append(self._fd)
                self._fd = os.open(self.path, os.O_WRONLY)
                self.direct = False

    def _flush_async(self, n: int) -> None:
        """Hand the filling buffer (``n`` bytes) to a writer thread and switch to the other one."""
        self._wait()
        buf, offset = self._bufs[self._fill], self._offset

        def run() -> None:
            try:
                self._pwrite_all(buf, n, offset)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = e

        writer = threading.Thread(target=run, name="direct-io-writer", daemon=True)
        writer.start()
        self._writer = writer  # only once started: a Ctrl-C between the two lines must not leave an unjoinable one
        self._fill ^= 1
        self._used = 0
        self._offset += n

    def _wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # -- file interface ------------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        src = memoryview(data).cast("B")
        n = src.nbytes
        if not self._staged:
            done = 0
            while done < n:
                done += os.write(self._fd, src[done:])
            self._size += n
            return n
        done = 0
        if n >= _ZERO_COPY and self._size % ALIGN == 0 and _address(src) % ALIGN == 0:
            # Block-aligned in memory and in the file: the device reads the caller's memory itself (no copy).
            # The staged bytes end on a block boundary here; they go out on the writer thread meanwhile.
            if self._used:
                self._flush_async(self._used)
            done = n // ALIGN * ALIGN
            self._pwrite_all(src, done, self._offset)
            self._offset += done
        while done < n:
            buf = self._bufs[self._fill]
            take = min(n - done, buf.nbytes - self._used)
            if take >= _SMALL:  # numpy copies without the GIL
                np.copyto(buf[self._used:self._used + take], np.frombuffer(src[done:done + take], dtype=np.uint8))
            else:
                memoryview(buf)[self._used:self._used + take] = src[done:done + take]
            self._used += take
            done += take
            if self._used == buf.nbytes:
                self._flush_async(self._used)
        self._size += n
        return n

    def close(self) -> None:
        """Write what is left (padded to a block, then cut back to the true size) and close."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._staged:
                self._wait()
                if self._used:
                    padded = -(-self._used // ALIGN) * ALIGN
                    self._bufs[self._fill][self._used:padded] = 0
                    self._pwrite_all(self._bufs[self._fill], padded, self._offset)
                os.ftruncate(self._fd, self._size)
        finally:
            if self._staged and self._writer is not None:  # an error is on its way: just let the thread end
                self._writer.join()
            for fd in (self._fd, *self._retired):
                os.close(fd)

    def __enter__(self) -> "SequentialFile":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
