"""Writing Megatron shards: the balanced-pruning gather equals unfuse/slice/fuse, fc1 per rank, concurrent shard
writers."""

from __future__ import annotations

import argparse

import pytest
import torch

from compare import assert_same_tensors
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.select import make_plan
from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.mcore import ops, read, schema, write
from megatron.prune.io.memory import BufferPool
from megatron.prune.scoring.methods import random_scores


@pytest.mark.parametrize("dtype,block", [(torch.bfloat16, 1 << 17), (torch.bfloat16, 24), (torch.float32, 1)])
def test_param_gather_equals_unfuse_slice_fuse(dtype, block, monkeypatch):
    """The one-row-gather-one-column-gather shortcut of balanced pruning == unfuse -> slice_role -> fuse
    (with the row blocks of the gather as large as the tensor, a few rows, one row)."""
    from megatron.prune.core.slicing import AxisIndex, slice_role

    monkeypatch.setattr(write, "_GATHER_BLOCK_BYTES", block)
    g = torch.Generator().manual_seed(0)
    ng, np_, hn, h, f = 4, 8, 3, 10, 12  # one rank's source: 4 groups of 2 heads
    index = AxisIndex(hidden=(0, 2, 3, 7, 9), groups=(1, 3), heads=(2, 3, 6, 7), ffn=(0, 4, 5, 11))
    stored = {"qkv": ((np_ + 2 * ng) * hn, h), "qkv_bias": ((np_ + 2 * ng) * hn,), "proj": (h, np_ * hn),
              "fc1": (2 * f, h), "fc2": (h, f), "embed": (16, h)}
    for key, size in stored.items():
        p = schema.PARAM_BY_KEY[key]
        t = torch.randn(size, generator=g).to(dtype)
        parts = schema.unfuse(p, t, ng, np_, hn)
        want = schema.fuse(p, {r: slice_role(r, x, index, hn) for r, x in parts.items()}, 2)
        gather = write.param_gather(p, index, size, (ng, 2), np_, hn)
        got = gather(t)
        assert got.shape == want.shape and got.dtype == dtype and torch.equal(got, want), key
        assert got.data_ptr() != t.data_ptr()
        pool = BufferPool()
        for _ in range(2):  # the second time into the buffer handed back by the first
            pooled = gather(t, pool)
            assert torch.equal(pooled, want), key
            pool.give_back(pooled)
    keep_all = write.param_gather(schema.PARAM_BY_KEY["qkv"], AxisIndex(), stored["qkv"], (ng, ng), np_, hn)
    assert keep_all.rows is None and keep_all.cols is None  # identity: no copy at all


@pytest.mark.parametrize("rows,cols", [([0, 5], None), (None, [1, 4]), ([-1], [0]), ([0], [-2])])
def test_gather_refuses_out_of_range_like_index_select(rows, cols):
    """The fast take mode would wrap an out-of-range index around silently; the gather raises instead."""
    t = torch.arange(20, dtype=torch.bfloat16).reshape(5, 4)
    as_index = lambda x: None if x is None else torch.tensor(x)  # noqa: E731
    with pytest.raises(IndexError):
        write.Gather(as_index(rows), as_index(cols))(t)


def test_fc1_shard_is_gate_shard_then_up_shard(tiny_hf, tmp_path):
    hf = tiny_hf("llama-gqa")
    mg = ops.hf_to_megatron(hf, tmp_path / "mg", tp=2, progress=False)
    src = HFCheckpoint.open(hf)
    gate, up = src.get("gate", 1), src.get("up", 1)
    f = gate.shape[0] // 2
    for r, sd in ops.iter_state_dicts(mg):
        fc1 = sd["model"]["decoder.layers.1.mlp.linear_fc1.weight"]
        rank = r[0]
        assert torch.equal(fc1, torch.cat([gate[rank * f : (rank + 1) * f], up[rank * f : (rank + 1) * f]]))


def small_plan(shape, tp: int, balance: bool, seed: int = 3, **target) -> PrunePlan:
    t = dict(hidden_size=40, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=32, num_layers=3)
    t.update(target)
    return make_plan(shape, shape.replace(**t), random_scores(shape, seed), tp=tp, balance=balance)


def test_shards_written_at_once_equal_shards_written_in_turn(tiny_hf, tmp_path):
    """Writing a stage's TP shards concurrently (and several compute threads per file) changes no byte of any
    shard's pickle and no tensor."""
    hf = tiny_hf("llama-gqa")
    plan = small_plan(HFCheckpoint.open(hf).shape, 2, True)
    src = open_megatron(ops.hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=1, progress=False))
    layout = write.Layout(plan.target, 2, 1, src.spec, src.padded_vocab)
    args = argparse.Namespace(tensor_model_parallel_size=2)
    for n, workers in ((1, 1), (2, 4)):
        (tmp_path / f"out{n}").mkdir()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(write, "WORKERS", workers)
            m.setattr(write.os, "cpu_count", lambda: 8)  # so that two files at once still get 4 threads each
            write.write_checkpoint(tmp_path / f"out{n}", layout, write.balanced_params(src, plan, layout), args,
                                src.release, progress=False, files_at_once=n)
    for rank in ("mp_rank_00", "mp_rank_01"):
        a, b = (tmp_path / f"out{n}" / "iter_0000000" / rank / schema.MODEL_FILE for n in (1, 2))
        assert torch._C.PyTorchFileReader(str(a)).get_record("data.pkl") == torch._C.PyTorchFileReader(
            str(b)).get_record("data.pkl")
        assert_same_tensors(read.load_shard(a)["model"], read.load_shard(b)["model"])
