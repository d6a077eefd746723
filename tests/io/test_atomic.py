"""Atomic output: bad output paths refused, a failure or Ctrl-C mid-write leaves nothing behind."""

from __future__ import annotations

import shutil

from compare import tree_hash
from megatron.prune.cli import main
from megatron.prune.formats.folder import open_megatron


def test_bad_output_paths_refused(tiny_hf, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf("llama-gqa"), src)
    before = tree_hash(src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for out, must_say in [(src, "is the input folder"), (src / "sub", "inside the input folder"),
                          (tmp_path, "contains the input folder"), (busy, "not empty; pass --overwrite")]:
        rc = main(["prune", "--input", str(src), "--output", str(out), "--num-layers", "2", "--no-progress"])
        assert rc == 2
        assert must_say in capsys.readouterr().err
    assert tree_hash(src) == before
    assert (busy / "keep.txt").read_text() == "mine"
    assert main(["prune", "--input", str(src), "--output", str(busy), "--num-layers", "2", "--no-progress",
                 "--overwrite"]) == 0
    assert not (busy / "keep.txt").exists() and (busy / "model.safetensors").is_file()


def test_failure_mid_write_leaves_nothing(tiny_hf, tmp_path, monkeypatch):
    """An error after some shards were written removes the temporary folder; the output never appears."""
    import megatron.prune.formats.hf as hf

    calls = []
    real = hf.write_safetensors

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C looks like mid-run
        return real(*a, **kw)

    monkeypatch.setattr(hf, "write_safetensors", failing)
    src = tiny_hf("llama-gqa")
    before = tree_hash(src)
    assert main(["prune", "--input", str(src), "--output", str(tmp_path / "out"), "--num-layers", "2",
                 "--max-shard-size", "10KB", "--no-progress"]) == 130  # Ctrl-C: one line, exit code 130
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
    assert tree_hash(src) == before


def test_interrupt_while_writing_megatron_shards_leaves_nothing(tiny_hf, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a Megatron prune (two shards being written at once): no output, no temp folder,
    the input untouched, and the other shard's writer stops too instead of finishing its file."""
    import threading
    import time

    from megatron.prune.formats.mcore import ops, write

    mg = ops.hf_to_megatron(tiny_hf("llama-gqa"), tmp_path / "mg", tp=2, progress=False)
    before = tree_hash(mg)
    real = write.TorchStreamWriter.tensor
    lock, written = threading.Lock(), []

    def tensor(self, t):
        with lock:
            written.append(1)
            n = len(written)
        if n == 5:
            raise KeyboardInterrupt  # what Ctrl-C looks like mid-run (here in a writer thread)
        time.sleep(0.01)  # tiny tensors: give the main thread time to see the interrupt
        return real(self, t)

    monkeypatch.setattr(write.TorchStreamWriter, "tensor", tensor)
    monkeypatch.setattr(write.os, "cpu_count", lambda: 2)  # both TP shards at once
    assert main(["prune", "--input", str(mg), "--output", str(tmp_path / "out"), "--hidden-size", "40",
                 "--no-progress"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mg"]
    assert tree_hash(mg) == before
    per_shard = len(write.shard_jobs(write.Layout(open_megatron(mg).shape, 2, 1, "local", 128),
                                  lambda *a: None, 0, 0)[0])
    assert len(written) < per_shard  # the other writer gave up early instead of finishing its shard


SIGTERM_RUN = """
import os, signal, sys, time
from argparse import Namespace
from pathlib import Path
from megatron.prune.cli import execute
from megatron.prune.io.atomic import atomic_output, scratch_folder

out, nested = Path(sys.argv[1]), sys.argv[2] == "nested"

def run(args):
    with scratch_folder(out, "refit") as scratch:  # the refit's scratch, before the output's temporary exists
        (scratch / "moments").write_text("x")
        if nested:
            with atomic_output(out) as tmp:
                (tmp / "half").write_text("y")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

sys.exit(execute(Namespace(_run=run), "prog"))
"""


def test_sigterm_removes_the_temporaries_and_says_so(tmp_path):
    """SIGTERM (``kill``, ``timeout``, a scheduler) during the refit's scratch phase, or while the output is being
    written inside it: exit 143 with one line, no traceback, nothing left beside the output (the scratch folder was
    left behind when only the output's temporary handled the signal)."""
    import subprocess
    import sys

    for where in ("scratch", "nested"):
        folder = tmp_path / where
        folder.mkdir()
        r = subprocess.run([sys.executable, "-c", SIGTERM_RUN, str(folder / "out"), where], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 143, (where, r.stderr)
        assert r.stderr == "prog: terminated (SIGTERM); nothing half-written is left\n", (where, r.stderr)
        assert list(folder.iterdir()) == [], where
