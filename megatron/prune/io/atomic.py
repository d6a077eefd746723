"""Safe output handling: validate the output path early, write into a temporary folder (or file), rename at the end.

A failed or interrupted run therefore never leaves a half-written checkpoint at the output path and never
touches its input. A run killed outright (``kill -9``, a power cut) cannot clean up after itself: its temporary
sibling (``.NAME.partial-PID@HOST-XXXXXXXX``) is removed by the next run writing the same output, once that
process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from megatron.prune.errors import PruneError

# Outputs renamed into place by this process, in order: a Ctrl-C after the last rename finds its output complete.
FINISHED: list[Path] = []
# Ctrl-Cs received while :func:`interrupts_remembered` is on, whether or not their KeyboardInterrupt got through.
INTERRUPTS: list[int] = []


@contextmanager
def interrupts_remembered() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered, so one that a library swallowed (a bare
    ``except:`` around an optional import) still stops the run before an output is renamed into place. A SIGINT
    that was ignored or handled otherwise when the run began (or by an enclosing call of this) is left so."""

    def remember(signum: int, frame: object) -> None:
        INTERRUPTS.append(signum)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    INTERRUPTS.clear()
    with handled(signal.SIGINT, remember):
        yield


@contextmanager
def handled(signum: int, handler: Callable[[int, object], None]) -> Iterator[None]:
    """``handler`` for ``signum`` for the duration, the previous one restored after; nothing in a thread other than
    the main one (Python handles signals there only)."""
    try:
        previous = signal.signal(signum, handler)
    except ValueError:  # not in the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signum, previous)


def raise_if_interrupted() -> None:
    """Re-raise a Ctrl-C that arrived during the run but did not stop it."""
    if INTERRUPTS:
        raise KeyboardInterrupt


def check_output_path(inputs: Path | list[Path], output: Path, overwrite: bool = False) -> Path:
    """Refuse an output that is an input, lies inside one, contains one, is non-empty without ``overwrite``, or
    cannot be written (a file on its path, a read-only filesystem, /proc)."""
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
    check_writable_parent(output)
    return out


def check_writable_parent(output: Path | str, flag: str = "output") -> Path:
    """Refuse ``output`` when its folder cannot be made or written in: a file where a folder should be, a read-only
    filesystem, no permission, a pseudo-filesystem such as /proc. A probe folder is made and removed at once, so
    the check is what the write will meet. Returns the nearest existing folder."""
    out = Path(output).absolute()
    folder = out.parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise PruneError(f"{flag} {output}: {folder} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=folder))
    except OSError as e:
        raise PruneError(f"{flag} {output}: cannot write in {folder} ({e.strerror or e}); choose another "
                         "place") from None
    return folder


def partial_name(out: Path) -> str:
    """The temporary sibling of ``out`` this process writes into: ``.NAME.partial-PID@HOST-XXXXXXXX``."""
    return f".{out.name}.partial-{os.getpid()}@{_host()}-{uuid.uuid4().hex[:8]}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "localhost"


_OWNER = re.compile(r"(\d+)(?:@([A-Za-z0-9_.]*))?(?:-[0-9a-f]{8})?(?:-[a-z]+)?")  # -WHAT: a scratch_folder


def partial_owner(out: Path, sibling: str) -> tuple[int, str] | None:
    """(pid, host) of a temporary sibling of ``out`` named by :func:`partial_name` (or by earlier versions, which
    named no host: taken as this one), None for any other name."""
    prefix = f".{out.name}.partial-"
    m = _OWNER.fullmatch(sibling[len(prefix):]) if sibling.startswith(prefix) else None
    return None if m is None else (int(m.group(1)), m.group(2) or _host())


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_partials(output: Path | str) -> list[Path]:
    """Remove the temporary siblings of ``output`` left by runs of this machine that were killed (their process is
    gone), saying so; name the others (a run still writing, or another machine's). Returns what was removed."""
    out = Path(output).absolute()
    if not out.parent.is_dir():
        return []
    removed = []
    for p in sorted(out.parent.glob(f".{glob_escape(out.name)}.partial-*")):
        owner = partial_owner(out, p.name)
        if owner is None:
            continue
        pid, host = owner
        if host == _host() and not process_alive(pid):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
            print(f"note: removed {p}, left by an interrupted run (process {pid})", file=sys.stderr)
        elif pid != os.getpid():
            print(f"note: {p} is being written by process {pid} on {host}, or was left by it; remove it once that "
                  "run is over", file=sys.stderr)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextmanager
def atomic_output(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``output``, on any failure it is removed."""
    out = Path(output).resolve()
    check_writable_parent(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out)
    tmp = out.parent / partial_name(out)
    tmp.mkdir()
    try:
        with terminate_raises():
            yield tmp
        raise_if_interrupted()
        if out.exists():
            if any(out.iterdir()) and not overwrite:
                raise PruneError(f"output folder {output} appeared while writing; not replacing it")
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            FINISHED.append(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
            FINISHED.append(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling file path; on success it replaces ``path`` (one rename), on any failure it is
    removed. The folder must exist (checked first)."""
    path = Path(path).absolute()
    check_writable_parent(path)
    clean_stale_partials(path)
    tmp = path.with_name(partial_name(path))
    try:
        with terminate_raises():
            yield tmp
        raise_if_interrupted()
        os.replace(tmp, path)
        FINISHED.append(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def scratch_folder(output: Path, what: str) -> Iterator[Path]:
    """A temporary folder beside ``output`` (its filesystem), removed on exit; named like :func:`atomic_output`'s with
    ``-WHAT`` added, so that the next run removes one a killed run left."""
    out = Path(output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out)
    tmp = out.parent / f"{partial_name(out)}-{what}"
    tmp.mkdir()
    try:
        with terminate_raises():
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Terminated(SystemExit):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler), raised where it lands so that cleanups run as for Ctrl-C;
    exit status 143."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


@contextmanager
def terminate_raises() -> Iterator[None]:
    """While a temporary file or folder exists: SIGTERM raises :class:`Terminated` instead of ending the process
    on the spot, so the temporary is removed. Nested uses keep the outer handler (restored on exit)."""
    with handled(signal.SIGTERM, _raise_terminated):
        yield


def copy_side_files(src: Path, dst: Path, skip: set[str], skip_suffixes: tuple[str, ...] = ()) -> list[str]:
    """Copy the files of ``src`` that are not weights (tokenizer, generation config, ...) into ``dst``."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in skip and not f.name.endswith(skip_suffixes) and not f.name.startswith("."):
            shutil.copy2(f, Path(dst) / f.name)
            copied.append(f.name)
    return copied
