"""README_EN.md sections 1-4 run as pasted: their shell blocks, in order, in one bash, on a fresh copy of the clone,
so the README cannot drift from what works. A tiny model stands in for the embedded one (the README's `M`), the
training runs a few short iterations (its TRAIN_ITERS, SEQ_LEN, ... variables), and the shape numbers are scaled to
the tiny model by the substitutions below, each of which must appear in the README as written. `make install` is
recorded, not run: the test already runs in the installed environment."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from procs import free_port
from tiny_corpus import make_bytelevel_tokenizer, model_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("### 1. Prune", "### 2. Megatron checkpoints", "### 3. Recover", "### 4. Vocabulary")
# README text -> what the tiny model (4 layers, hidden 48, 6 heads in 3 KV groups, FFN 72, vocab 600) takes instead
SUBSTITUTIONS = {
    "--num-layers 24": "--num-layers 3",
    "--hidden-size 480": "--hidden-size 40",
    "--num-attention-heads 6": "--num-attention-heads 4",
    "--ffn-hidden-size 1024": "--ffn-hidden-size 48",
    "--ffn-hidden-size 1020": "--ffn-hidden-size 48",
    "--keep 16000": "--keep 400",
}
SMALL_RUN = {"TRAIN_ITERS": "2", "SEQ_LEN": "32", "MICRO_BATCH": "1", "GLOBAL_BATCH": "2"}


def readme_blocks(text: str) -> list[str]:
    """The ```bash blocks of sections 1-4, in order."""
    start = text.index(SECTIONS[0])
    end = text.index("\n## ", start)
    body = text[start:end]
    assert all(s in body for s in SECTIONS), "a section heading changed: update SECTIONS"
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def scaled(script: str) -> str:
    for old, new in SUBSTITUTIONS.items():
        assert old in script, f"the README no longer says {old!r}: update SUBSTITUTIONS"
        script = script.replace(old, new)
    return script


def fresh_clone(dest: Path) -> Path:
    """The tracked files of the repository (what a fresh clone holds), copied to ``dest``."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def recording_make(folder: Path) -> Path:
    log = folder / "make.log"
    shim = folder / "make"
    shim.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return log


@pytest.mark.slow
def test_readme_sections_1_to_4_run_as_pasted(tmp_path):
    blocks = readme_blocks((ROOT / "README_EN.md").read_text())
    assert len(blocks) == 4
    clone = fresh_clone(tmp_path / "clone")
    tools = tmp_path / "bin"
    tools.mkdir()
    make_log = recording_make(tools)
    tok = make_bytelevel_tokenizer(tmp_path / "tok", 600)
    model = model_with_tokenizer(tmp_path / "tiny", "llama-gqa", tok, num_attention_heads=6, num_key_value_heads=3,
                                 intermediate_size=72)
    env = {k: v for k, v in os.environ.items() if k not in ("LOAD", "SAVE", "DATA", "TOKENIZER", "KD_TEACHER")}
    env.update(SMALL_RUN, M=str(model), PYTHON=sys.executable, PYTHONPATH=str(clone), MASTER_PORT=str(free_port()),
               PATH=f"{tools}:{Path(sys.executable).parent}:{env['PATH']}")
    script = "set -euo pipefail\n" + "\n".join(scaled("\n".join(blocks)).splitlines())
    r = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    assert make_log.read_text().split() == ["install"]
    for done in ("small/prune_plan.json", "hf-small/config.json", "recovered-hf/config.json",
                 "data/corpus_text_document.idx", "small-vocab/tokenizer.json", "counts.json"):
        assert (clone / done).is_file(), done
    assert r.stdout.count("perplexity: ") == 2 and "dropped layers: " in r.stdout
    assert re.search(r"iteration\s+2/\s*2 \|", r.stdout + r.stderr)


def commands_of(text: str) -> list[list[str]]:
    """Every ```bash block as its command lines, comments and trailing blanks dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[re.sub(r"\s+#.*$|^#.*$", "", line).rstrip() for line in b.splitlines()] for b in blocks]


def test_both_readmes_give_the_same_commands():
    """README.md (Chinese) and README_EN.md say the same thing: their shell blocks differ in comments only."""
    zh, en = commands_of((ROOT / "README.md").read_text()), commands_of((ROOT / "README_EN.md").read_text())
    assert len(en) >= 6 and zh == en
