"""The streaming torch.save writer."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

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


def test_error_while_streaming_propagates(tmp_path: Path) -> None:
    """An error between records reaches the caller as itself (the C++ writer must not abort the process)."""
    with pytest.raises(KeyError, match="compute failed"):
        with TorchStreamWriter(tmp_path / "x.pt") as out:
            out.tensor(torch.ones(3))
            raise KeyError("compute failed")
