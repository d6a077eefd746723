"""Write a ``torch.save`` file one tensor at a time, as each tensor is computed.

``torch.save`` pickles the whole object first and then copies every storage, so a shard must sit whole in memory
before the first byte is written, and its pickle-then-copy runs after all the compute. Here each tensor's bytes go
into the zip archive (torch's own ``PyTorchFileWriter``, 64-byte aligned records, what ``torch.load(mmap=True)``
needs) the moment it is ready and can then be freed; ``data.pkl`` — the same pickle ``torch.save`` writes, with
storages referenced by key — is written last (zip members are found by name, not by order). The file writes go
through a Python file object, so the GIL is released while bytes are copied and other threads keep computing.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from megatron.prune.io.direct_io import ALIGN, SequentialFile

STORAGE_ALIGNMENT = ALIGN  # records start on disk blocks (torch.save uses 64; loaders read the recorded value)
PICKLE_PROTOCOL = torch.serialization.DEFAULT_PROTOCOL


class _StorageRef:
    """A storage already written as record ``data/<key>``; pickled as torch.save's persistent id."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel

    def persistent_id(self) -> tuple[str, Any, str, str, int]:
        storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[self.dtype])
        return ("storage", storage_type, self.key, "cpu", self.numel)


class _TensorRef:
    """Pickles exactly as a contiguous, hook-free CPU tensor of its storage does (``_rebuild_tensor_v2``)."""

    __slots__ = ("storage", "size", "stride")

    def __init__(self, storage: _StorageRef, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce_ex__(self, proto: int) -> tuple[Any, tuple[Any, ...]]:
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, self.stride, False, OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.persistent_id() if isinstance(obj, _StorageRef) else None


def _storage_at(t: torch.Tensor) -> torch.UntypedStorage:
    """A storage whose first byte is ``t``'s (its memory, no copy): ``write_record`` writes a storage from its start
    (a raw data pointer is deprecated), and ``t`` may be a view into a larger reused buffer."""
    if t.storage_offset() == 0:
        return t.untyped_storage()
    return torch.frombuffer(t.reshape(-1).view(torch.uint8).numpy(), dtype=torch.uint8).untyped_storage()


class TorchStreamWriter:
    """``with TorchStreamWriter(path) as w: ref = w.tensor(t); ...; w.finish(obj_holding_refs)``.

    ``tensor`` writes ``t``'s bytes now and returns a reference to put where the tensor goes in the saved object;
    ``finish`` writes the pickle. ``torch.load`` returns ordinary tensors, each alone in its storage.
    """

    def __init__(self, path: Path | str) -> None:
        self._file = SequentialFile(path)  # O_DIRECT where possible; closed in __exit__
        self._zip = torch._C.PyTorchFileWriter(self._file, False, STORAGE_ALIGNMENT)  # no CRC: torch.load ignores it
        self._count = 0
        self._finished = False

    def tensor(self, t: torch.Tensor) -> _TensorRef:
        """Write ``t`` (any CPU tensor; made contiguous) as the next storage record."""
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.detach().contiguous()
        key = str(self._count)
        self._count += 1
        nbytes = t.numel() * t.element_size()
        self._zip.write_record(f"data/{key}", _storage_at(t) if nbytes else b"", nbytes)
        return _TensorRef(_StorageRef(key, t.dtype, t.numel()), tuple(t.shape), tuple(t.stride()))

    def finish(self, obj: Any) -> None:
        """Pickle ``obj`` (with the references ``tensor`` returned) as ``data.pkl`` and close the archive."""
        buf = io.BytesIO()
        _Pickler(buf, protocol=PICKLE_PROTOCOL).dump(obj)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        alignment = str(STORAGE_ALIGNMENT)
        self._zip.write_record(".storage_alignment", alignment, len(alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._zip.write_end_of_file()
        self._finished = True

    def __enter__(self) -> "TorchStreamWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # The C++ writer ends the archive in its destructor if nobody did; with the file already closed that
        # raises inside a destructor and aborts the process. So: end it here, drop it, then close the file.
        if not self._finished:
            try:
                self._zip.write_end_of_file()
            except Exception:  # noqa: BLE001 - an error is already on its way (or raised below)
                pass
        self._zip = None
        self._file.close()
        if kind is None and not self._finished:
            raise RuntimeError("TorchStreamWriter closed without finish(): the file has no data.pkl")
