"""The safetensors file format, read and written without the safetensors library's whole-file buffers: a header read
that detects truncated files, and a writer that streams one tensor at a time once the header is known."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron.prune.errors import PruneError
from megatron.prune.io.direct_io import SequentialFile

DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8"}


DTYPE_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I8": 1,
               "U8": 1}


def read_header(path: Path) -> dict[str, Any]:
    """Read and sanity-check a safetensors header; detects truncated or corrupt files without loading data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise PruneError(f"{path} is not a readable safetensors file ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise PruneError(f"{path} is truncated or corrupt: header promises {8 + n + end} bytes, file has {size}")
    return header


def write_safetensors(path: Path, specs: list[tuple[str, str, tuple[int, ...]]],
                      tensors: Iterator[torch.Tensor]) -> None:
    """Write a safetensors file whose header (name, dtype code, shape) is known before the data.

    Tensors are streamed one at a time, so memory holds a single tensor, never a whole shard.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, code, shape in specs:
        n = DTYPE_SIZES[code] * math.prod(shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
    with SequentialFile(path) as f:  # O_DIRECT where the filesystem allows: no page-cache copy
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, code, shape), t in zip(specs, tensors, strict=True):
            if tuple(t.shape) != tuple(shape) or DTYPE_CODES.get(t.dtype) != code:
                raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, header promised {shape} {code}")
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
