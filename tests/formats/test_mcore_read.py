"""Reading Megatron torch-format checkpoints: the logical tensors, safe memory-mapped shards, damaged checkpoints
refused."""

from __future__ import annotations

import shutil
from argparse import Namespace

import torch

from compare import refuse
from megatron.prune.core.roles import expected_roles
from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.mcore import ops, read, schema
from megatron.prune.scoring.methods import magnitude_scores


def test_megatron_source_gives_the_same_logical_tensors(tiny_hf, tmp_path):
    hf = tiny_hf("qwen2-bias")
    mg = open_megatron(ops.hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=2, progress=False))
    src = HFCheckpoint.open(hf)
    for role, layer in expected_roles(src.shape):
        assert torch.equal(mg.get(role, layer), src.get(role, layer)), (role, layer)
    # scores computed from either source are identical, so plans are too
    a, b = magnitude_scores(mg), magnitude_scores(src)
    for name in ("hidden", "heads", "ffn", "groups"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_refuses_missing_shard(tp2, tmp_path, capsys):
    shutil.rmtree(tp2 / "iter_0000000" / "mp_rank_01")
    refuse(["prune", "--input", str(tp2), "--output", str(tmp_path / "o"), "--hidden-size", "40"],
           tmp_path / "o", capsys, "TP=2", "mp_rank_01")


def test_refuses_truncated_shard(tp2, tmp_path, capsys):
    f = tp2 / "iter_0000000" / "mp_rank_01" / schema.MODEL_FILE
    f.write_bytes(f.read_bytes()[:-200])
    refuse(["convert", "megatron-to-hf", "--input", str(tp2), "--output", str(tmp_path / "o")],
           tmp_path / "o", capsys, "mp_rank_01", "truncated")


def test_refuses_shard_count_disagreeing_with_args(tp2, tmp_path, capsys):
    shutil.copytree(tp2 / "iter_0000000" / "mp_rank_01", tp2 / "iter_0000000" / "mp_rank_02")
    refuse(["reshard", "--input", str(tp2), "--output", str(tmp_path / "o"), "--tp", "1"],
           tmp_path / "o", capsys, "args say TP=2", "mp_rank_02")


def test_refuses_unknown_state_dict_key(tp2, tmp_path, capsys):
    f = tp2 / "iter_0000000" / "mp_rank_00" / schema.MODEL_FILE
    sd = torch.load(f, map_location="cpu", weights_only=False)  # not memory-mapped: we overwrite the file
    sd["model"] = dict(sd["model"], **{"decoder.layers.0.self_attention.q_layernorm.weight": torch.ones(8)})
    torch.save(sd, f)
    refuse(["prune", "--input", str(tp2), "--output", str(tmp_path / "o")], tmp_path / "o", capsys,
           "decoder.layers.0.self_attention.q_layernorm.weight")


def test_checkpoint_reads_are_memory_mapped(tmp_path):
    """Reading a shard's args (done for --load and the teacher on every rank) maps the file instead of reading
    every tensor into RAM; a legacy (non-zip) file is still read."""
    from megatron.prune.io.memory import file_mappings

    state = {"model": {"w": torch.arange(4096.0)}, "args": Namespace(num_layers=2)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = read.load_shard(tmp_path / "zip.pt")
    ptr = loaded["model"]["w"].data_ptr()
    assert any(lo <= ptr < hi for lo, hi in file_mappings(tmp_path / "zip.pt"))
    legacy = read.load_shard(tmp_path / "legacy.pt")
    assert legacy["args"].num_layers == 2 and torch.equal(legacy["model"]["w"], state["model"]["w"])
    assert not file_mappings(tmp_path / "legacy.pt")
