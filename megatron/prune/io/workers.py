"""Worker processes that end with the process that started them, however it ends."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent_pid: int) -> None:
    """Have Linux kill this worker process the moment its parent dies (``kill -9`` included): a pool's workers would
    otherwise run on through their queued work for a minute. Call it first thing in the worker; no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def check_workers(workers: int, least: int = 1) -> None:
    """Refuse a worker count below ``least`` or above 4 processes per CPU of this machine (each worker holds a
    tokenizer: 100,000 of them hang the machine rather than finish sooner)."""
    from megatron.prune.errors import PruneError

    most = 4 * (os.cpu_count() or 1)
    if not least <= workers <= most:
        raise PruneError(f"--workers {workers}: choose {least}..{most} (at most 4 per CPU; this machine has "
                         f"{os.cpu_count() or 1})")
