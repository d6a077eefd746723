"""Safe output handling: validate the output path early, write into a temporary folder, rename at the end.

A failed or interrupted run therefore never leaves a half-written checkpoint at the output path and never
touches its input.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from megatron.prune.errors import PruneError


def check_output_path(inputs: Path | list[Path], output: Path, overwrite: bool = False) -> Path:
    """Refuse an output that is an input, lies inside one, contains one, or is non-empty without ``overwrite``."""
    out = Path(output).resolve()
    for inp in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        src = Path(inp).resolve()
        if out == src:
            raise PruneError(f"output {output} is the input folder; choose a new folder")
        if src in out.parents:
            raise PruneError(f"output {output} lies inside the input folder {inp}; choose a folder outside it")
        if out in src.parents:
            raise PruneError(f"output {output} contains the input folder {inp}; choose another folder")
    if out.exists():
        if not out.is_dir():
            raise PruneError(f"output {output} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise PruneError(f"output folder {output} is not empty; pass --overwrite to replace it")
    return out


@contextmanager
def atomic_output(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``output``, on any failure it is removed."""
    out = Path(output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        # SIGTERM becomes SystemExit so the cleanup below runs, as it does for Ctrl-C.
        signal.signal(signal.SIGTERM, _raise_exit)
    except ValueError:  # not in the main thread
        previous = None
    try:
        yield tmp
        if out.exists():
            if any(out.iterdir()) and not overwrite:
                raise PruneError(f"output folder {output} appeared while writing; not replacing it")
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def scratch_folder(output: Path, what: str) -> Iterator[Path]:
    """A temporary folder beside ``output`` (its filesystem; named like :func:`atomic_output`'s), removed on exit."""
    out = Path(output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}-{what}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def copy_side_files(src: Path, dst: Path, skip: set[str], skip_suffixes: tuple[str, ...] = ()) -> list[str]:
    """Copy the files of ``src`` that are not weights (tokenizer, generation config, ...) into ``dst``."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in skip and not f.name.endswith(skip_suffixes) and not f.name.startswith("."):
            shutil.copy2(f, Path(dst) / f.name)
            copied.append(f.name)
    return copied
