"""Bounded-memory helpers: the ordered thread map, the buffer pool, dropping read pages of a mapped file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.prune.io.memory import BufferPool, drop_mapped_pages, file_mappings, ordered_map


def test_ordered_map_keeps_order_and_bounds_lookahead() -> None:
    """Results come in input order however long each takes, and no more than ``ahead`` wait unconsumed."""
    lock, state = threading.Lock(), {"done": 0, "taken": 0, "max_waiting": 0}

    def fn(i: int) -> int:
        time.sleep(0.001 * ((7 * i) % 5))
        with lock:
            state["done"] += 1
            state["max_waiting"] = max(state["max_waiting"], state["done"] - state["taken"])
        return i

    got = []
    for x in ordered_map(fn, range(40), workers=3, ahead=4):
        got.append(x)
        with lock:
            state["taken"] += 1
    assert got == list(range(40))
    assert 1 <= state["max_waiting"] <= 4


def test_ordered_map_raises_worker_error() -> None:
    def fn(i: int) -> int:
        if i == 5:
            raise ValueError("boom at 5")
        return i

    got = []
    with pytest.raises(ValueError, match="boom at 5"):
        for x in ordered_map(fn, range(20), workers=2, ahead=3):
            got.append(x)
    assert got == list(range(5))


def test_pool_reuses_only_its_own_whole_arrays() -> None:
    pool = BufferPool()
    a = pool.empty((4, 8), np.int16)
    ta = torch.from_numpy(a)
    pool.give_back(ta)
    assert pool.empty((4, 8), np.int16).ctypes.data == a.ctypes.data  # reused
    assert pool.empty((4, 8), np.int16).ctypes.data != a.ctypes.data  # (it is lent out again now)
    b = pool.empty((2, 8), np.int16)
    pool.give_back(torch.from_numpy(b)[:1])  # part of an array: not reusable
    pool.give_back(torch.ones(2, 8, dtype=torch.int16))  # not the pool's
    assert pool.empty((2, 8), np.int16).ctypes.data != b.ctypes.data


def test_pool_keeps_at_most_max_idle_bytes() -> None:
    pool = BufferPool(max_idle_bytes=3 * 1024)
    arrays = [pool.empty((1024,), np.uint8) for _ in range(5)]
    for a in arrays:
        pool.give_back(torch.from_numpy(a))
    assert sum(x.nbytes for x in pool._idle.values()) <= 3 * 1024


def test_dropping_mapped_pages_keeps_the_values(tmp_path: Path) -> None:
    """Pages of a read-only file mapping leave the resident set and read back the same; memory that is not in
    the mapping (anonymous: dropping it would zero it) is never touched."""
    path = tmp_path / "t.pt"
    torch.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, path)
    w = torch.load(path, mmap=True, weights_only=True)["w"]
    want = w.clone()
    maps = file_mappings(path)
    if not maps:
        pytest.skip("no /proc/self/maps here")
    assert drop_mapped_pages(w, maps) > 0
    assert torch.equal(w, want)
    anon = want.clone()
    assert drop_mapped_pages(anon, maps) == 0 and torch.equal(anon, want)
