"""The streaming torch.save writer and the ordered thread map that feeds it."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron.prune.memory import ordered_map
from megatron.prune.torch_stream import TorchStreamWriter


def sample() -> dict:
    g = torch.Generator().manual_seed(0)
    model = {"w": torch.randn(6, 4, generator=g).to(torch.bfloat16), "n": None,
             "h": torch.randn(5, generator=g, dtype=torch.float16), "f": torch.randn(3, 2, generator=g),
             "i": torch.arange(7), "e": torch.empty(0, 3)}
    return {"args": argparse.Namespace(hidden_size=4, params_dtype=torch.bfloat16), "checkpoint_version": 3.0,
            "iteration": 0, "model": model}


def stream_save(obj: dict, path: Path) -> None:
    with TorchStreamWriter(path) as out:
        refs = {k: None if v is None else out.tensor(v) for k, v in obj["model"].items()}
        out.finish({**obj, "model": refs})


def load(path: Path, mmap: bool) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


def test_pickle_is_torch_saves_own(tmp_path: Path) -> None:
    """data.pkl is byte-identical to torch.save's for the same object, so every torch.load path reads it."""
    obj = sample()
    torch.save(obj, tmp_path / "ref.pt")
    stream_save(obj, tmp_path / "mine.pt")
    ref, mine = (torch._C.PyTorchFileReader(str(tmp_path / n)) for n in ("ref.pt", "mine.pt"))
    assert mine.get_record("data.pkl") == ref.get_record("data.pkl")
    assert sorted(mine.get_all_records()) == sorted(ref.get_all_records())


@pytest.mark.parametrize("mmap", [False, True])
def test_loads_back_equal(tmp_path: Path, mmap: bool) -> None:
    obj = sample()
    stream_save(obj, tmp_path / "mine.pt")
    back = load(tmp_path / "mine.pt", mmap)
    assert vars(back["args"]) == vars(obj["args"]) and back["iteration"] == 0
    assert back["model"].keys() == obj["model"].keys()
    for k, v in obj["model"].items():
        if v is None:
            assert back["model"][k] is None
        else:
            assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k


def test_view_is_written_alone(tmp_path: Path) -> None:
    """A non-contiguous view is stored as its own contiguous values, not its base storage."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    view = base[1:3, ::2]
    stream_save({"model": {"v": view}}, tmp_path / "v.pt")
    back = torch.load(tmp_path / "v.pt", weights_only=True)["model"]["v"]
    assert torch.equal(back, view) and back.is_contiguous()
    assert back.untyped_storage().nbytes() == view.numel() * view.element_size()


def test_unfinished_writer_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="finish"):
        with TorchStreamWriter(tmp_path / "x.pt") as out:
            out.tensor(torch.ones(2))


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


def test_error_while_streaming_propagates(tmp_path: Path) -> None:
    """An error between records reaches the caller as itself (the C++ writer must not abort the process)."""
    with pytest.raises(KeyError, match="compute failed"):
        with TorchStreamWriter(tmp_path / "x.pt") as out:
            out.tensor(torch.ones(3))
            raise KeyError("compute failed")
