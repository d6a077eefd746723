"""The seed-compatible emb_pruner scripts run the same code as `megatron-prune vocab`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from test_vocab_bpe import calib_docs, make_bytelevel_tokenizer
from test_vocab_model import model_with_tokenizer
from tiny import logits

from megatron.prune.vocab import TokenCounts, prune_hf_vocab

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "emb_pruner" / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_seed_scripts_count_then_prune_in_place(tmp_path):
    tok = make_bytelevel_tokenizer(tmp_path / "tok")
    model = model_with_tokenizer(tmp_path / "model", "llama-gqa", tok)
    reference = tmp_path / "ref_src"
    model_with_tokenizer(reference, "llama-gqa", tok)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(calib_docs()[::25]))
    r = run("get_vocab_freq.py", "--data_type", "txt", "--data_path", str(corpus), "--spm", str(tok / "tokenizer.json"),
            "--vocab_freq", str(tmp_path / "freq"), "--remain_vocab_size", "1700",
            "--remain_vocab_ids_path", str(tmp_path / "ids.pt"), "--workers", "1")
    assert r.returncode == 0, r.stderr
    ids = torch.load(tmp_path / "ids.pt")
    assert len(ids) == 1700
    counts = TokenCounts.load(tmp_path / "freq.json")
    first = (tmp_path / "freq.txt").read_text().split("\n", 1)[0].split()
    assert int(first[1]) == max(counts.counts) and counts.counts[int(first[0])] == max(counts.counts)

    r = run("prune_spm_and_emb.py", "--hf_dir", str(model), "--remain_vocab_path", str(tmp_path / "ids.pt"),
            "--remain_ids_with_spt", str(tmp_path / "final.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "final.json").read_text()) == sorted(ids)
    assert json.loads((model / "config.json").read_text())["vocab_size"] == 1700
    # same result as the library on an identical source
    plan = prune_hf_vocab(reference, tmp_path / "ref_out", keep_ids=ids, progress=False)
    x = torch.tensor([[5, 9, 300, 17]])
    assert torch.equal(logits(model, x), logits(tmp_path / "ref_out", x))
    assert list(plan.vocab) == sorted(ids)
    assert not list(tmp_path.glob(".model.*"))  # no leftover temporary folders

    r = run("prune_spm_and_emb.py", "--hf_dir", str(model), "--remain_vocab_path", str(tmp_path / "missing.pt"))
    assert r.returncode == 2 and "missing.pt does not exist" in r.stderr
