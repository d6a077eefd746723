"""Helpers for tests that launch processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_two_ranks(worker: Path, jobs: list[dict], folder: Path, timeout: int) -> list[dict]:
    """Run ``worker JOBS.json RESULTS.json`` under torchrun on 2 CPU ranks (one thread each); each rank's results."""
    return run_on_ranks(worker, jobs, folder, timeout, 2)


def run_on_ranks(worker: Path, jobs: list[dict], folder: Path, timeout: int, ranks: int) -> list[dict]:
    """Run ``worker JOBS.json RESULTS.json`` under torchrun on ``ranks`` CPU ranks (one thread each); each rank's
    results."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), f"--nproc_per_node={ranks}", str(worker), str(folder / "jobs.json"),
                           str(folder / "results.json")], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((folder / "results.json").read_text())
