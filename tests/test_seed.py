"""The seed project's entry points, run as its README writes them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from compare import assert_same_tensors, mg_shards
from megatron.prune.core.plan import PrunePlan
from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.mcore import ops
from megatron.prune.vocab import TokenCounts, prune_hf_vocab
from tiny import logits
from tiny_corpus import calib_docs, make_bytelevel_tokenizer, model_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent

ROUND_TRIPS = [("llama-gqa", tp, pp) for tp in (1, 2, 4) for pp in (1, 2)] + \
              [("qwen2-bias", tp, pp) for tp in (1, 2, 4) for pp in (1, 2)] + \
              [("llama-tied", tp, pp) for tp in (1, 2) for pp in (1, 2)]


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


def test_seed_compatible_hf_entry_point(tiny_hf, tmp_path):
    import json
    from pathlib import Path

    from megatron.prune.core.plan import PrunePlan

    cfg = tmp_path / "target.json"
    cfg.write_text(json.dumps({"intermediate_size": 32, "num_hidden_layers": 3, "num_key_value_heads": 2,
                               "num_attention_heads": 4, "hidden_size": 40}))
    script = Path(__file__).parent.parent / "prune_hf" / "prune_llama.py"
    r = subprocess.run([sys.executable, str(script), "--model_name_or_path", str(tiny_hf("llama-gqa")),
                        "--prune_config_path", str(cfg), "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    t = PrunePlan.load(tmp_path / "out").target
    assert (t.ffn_hidden_size, t.num_layers, t.num_query_groups, t.num_attention_heads, t.hidden_size) == (
        32, 3, 2, 4, 40)


def test_scripts_convert_prune_and_transfer(tiny_hf, tmp_path):
    """scripts/hf_to_megatron.sh -> scripts/prune_llama.sh (prune_llama.py) -> scripts/transfer.sh, as a user runs them."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    hf = tiny_hf("llama-gqa")
    env = dict(os.environ, PYTHON=sys.executable)

    def sh(script: str, **kw: str) -> None:
        proc = subprocess.run(["bash", str(repo / "scripts" / script), "--no-progress"] if script != "prune_llama.sh"
                              else ["bash", str(repo / "scripts" / script), "--no_progress"],
                              env=dict(env, **kw), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    sh("hf_to_megatron.sh", HF=str(hf), MG=str(tmp_path / "mg"), TP="2")
    sh("prune_llama.sh", LOAD=str(tmp_path / "mg"), SAVE=str(tmp_path / "small"), HIDDEN="40", HEADS="4",
       KV_GROUPS="2", FFN="32", DROP="1 2")
    sh("transfer.sh", LOAD=str(tmp_path / "small"), SAVE=str(tmp_path / "small1"), TP="1")
    plan = PrunePlan.load(tmp_path / "small")
    assert [lp.source_layer for lp in plan.layers] == [0, 3] and plan.info["prune_type"] == "balance"
    assert open_megatron(tmp_path / "small1").tp == 1
    ref = ops.apply_plan(open_megatron(ops.hf_to_megatron(hf, tmp_path / "mg2", tp=2, progress=False)), plan, tmp_path / "ref",
                   progress=False)
    assert_same_tensors(mg_shards(ref), mg_shards(tmp_path / "small"))
