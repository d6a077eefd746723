"""The streaming torch.save writer."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from megatron.prune.io.torch_stream import TorchStreamWriter


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


def test_contiguous_view_at_an_offset_is_written_from_its_first_byte(tmp_path: Path) -> None:
    """Rows of a larger (reused) buffer: its own bytes, written through the storage API torch.save uses (a raw data
    pointer is deprecated in torch and warns on every process's first write)."""
    import subprocess
    import sys

    code = f"""
import argparse, torch
from megatron.prune.io.torch_stream import TorchStreamWriter
base = torch.arange(48, dtype=torch.bfloat16).reshape(8, 6)
with TorchStreamWriter({str(tmp_path / "rows.pt")!r}) as out:
    out.finish({{"rows": out.tensor(base[3:5]), "none": out.tensor(base[2:2]), "all": out.tensor(base)}})
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "deprecated" not in r.stderr, r.stderr
    back = torch.load(tmp_path / "rows.pt", weights_only=True)
    base = torch.arange(48, dtype=torch.bfloat16).reshape(8, 6)
    assert torch.equal(back["rows"], base[3:5]) and torch.equal(back["all"], base)
    assert back["none"].shape == (0, 6) and back["rows"].untyped_storage().nbytes() == 2 * 6 * 2


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
