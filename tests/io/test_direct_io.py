"""SequentialFile: the bytes on disk are exactly the bytes written, whatever the path (staged, zero-copy, plain,
fallen back from O_DIRECT mid-file)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from megatron.prune.io import direct_io
from megatron.prune.io.direct_io import ALIGN, SequentialFile, aligned_empty


def pieces() -> list[memoryview]:
    """Small, odd, large-unaligned and large block-aligned buffers, in an order that crosses staging borders."""
    rng = np.random.default_rng(0)
    out = []
    for n in (5, 100, 70_000, ALIGN, 3 << 20, 3, 1 << 20, 12_345):
        out.append(memoryview(rng.integers(0, 255, n, dtype=np.uint8).tobytes()))
    big = aligned_empty((2 << 20,), np.uint8)
    big[:] = rng.integers(0, 255, big.size, dtype=np.uint8)
    pad = ALIGN - sum(p.nbytes for p in out) % ALIGN  # so the aligned buffer lands on a block in the file
    out.append(memoryview(b"\0" * pad))
    out.append(memoryview(big))
    out.append(memoryview(b"tail"))
    return out


def write_all(path: Path, parts: list[memoryview], staging: int) -> SequentialFile:
    with SequentialFile(path, staging) as f:
        for p in parts:
            assert f.write(p) == p.nbytes
    return f


@pytest.mark.parametrize("staging", [ALIGN, 1 << 16, 32 << 20])
def test_bytes_on_disk_equal_bytes_written(tmp_path: Path, staging: int) -> None:
    parts = pieces()
    write_all(tmp_path / "f.bin", parts, staging)
    assert (tmp_path / "f.bin").read_bytes() == b"".join(bytes(p) for p in parts)


def test_aligned_empty_is_aligned() -> None:
    for shape, dtype in (((3, 5), np.int16), ((7,), np.float32), ((0,), np.uint8)):
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and (a.size == 0 or a.ctypes.data % ALIGN == 0)


@pytest.mark.parametrize("how", ["refused", "switched off"])
def test_plain_writes_when_direct_io_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "refused":
        monkeypatch.setattr(direct_io, "_open_direct", lambda path: None)
    else:
        monkeypatch.setenv(direct_io.ENV_SWITCH, "0")
    parts = pieces()
    f = write_all(tmp_path / "f.bin", parts, 1 << 16)
    assert not f.direct
    assert (tmp_path / "f.bin").read_bytes() == b"".join(bytes(p) for p in parts)


def test_falls_back_when_the_filesystem_refuses_a_direct_write(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """O_DIRECT opened but a write gets EINVAL (some network filesystems): the rest goes through plain writes."""
    real = os.pwrite
    direct_fds: set[int] = set()
    real_open = direct_io._open_direct

    def open_direct(path: Path) -> int | None:
        fd = real_open(path)
        if fd is not None:
            direct_fds.add(fd)
        return fd

    def pwrite(fd: int, data, offset: int) -> int:
        if fd in direct_fds and offset > 0:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_io, "_open_direct", open_direct)
    monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
    parts = pieces()
    f = write_all(tmp_path / "f.bin", parts, 1 << 16)
    if not direct_fds:
        pytest.skip("this filesystem refuses O_DIRECT at open already")
    assert not f.direct
    assert (tmp_path / "f.bin").read_bytes() == b"".join(bytes(p) for p in parts)


def test_writer_thread_error_reaches_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def pwrite(fd: int, data, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space"):
        with SequentialFile(tmp_path / "f.bin", ALIGN) as f:
            if not f.direct:
                pytest.skip("no O_DIRECT here: plain writes do not use pwrite")
            for p in pieces():
                f.write(p)
