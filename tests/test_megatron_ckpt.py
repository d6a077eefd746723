"""Megatron checkpoints: fusions, HF<->Megatron round trips, reshard, balanced/unbalanced pruning, bad input."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tree_hash

from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.mcore import args as mcore_args
from megatron.prune.formats.mcore import ops
from megatron.prune.formats.mcore import read
from megatron.prune.formats.mcore import schema
from megatron.prune.formats.mcore import write
from megatron.prune.cli import main as cli_main
from megatron.prune.core.roles import expected_roles
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.hf import apply_plan as apply_hf_plan
from megatron.prune.io.memory import BufferPool
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.select import make_plan
from megatron.prune.scoring.methods import magnitude_scores, random_scores
from megatron.prune.errors import PruneError
from megatron.prune.core.roles import ROLE_AXES


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Per-tensor torch.equal over identical key sets; refuses to compare an object with itself."""
    assert a is not b, "comparing a state dict with itself proves nothing"
    assert sorted(a) == sorted(b)
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
            continue
        assert a[k] is not b[k], k
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = HFCheckpoint.open(folder)
    return {f"{r}.{l}": ckpt.get(r, l) for r, l in expected_roles(ckpt.shape)}


def mg_shards(folder: Path) -> dict[str, object]:
    return {f"{k}:{name}": v for k, sd in ops.iter_state_dicts(folder) for name, v in sd["model"].items()}


# ---- fusions and the name table ---------------------------------------------------------------


def test_fuse_qkv_layout_is_per_group_and_inverts():
    ng, np_, hn, h = 2, 6, 2, 3
    q = torch.arange(np_ * hn * h, dtype=torch.float32).reshape(np_ * hn, h)
    k = -torch.arange(1, ng * hn * h + 1, dtype=torch.float32).reshape(ng * hn, h)
    v = 1000 + torch.arange(ng * hn * h, dtype=torch.float32).reshape(ng * hn, h)
    qkv = schema.fuse_qkv(q, k, v, ng)
    per = (np_ // ng + 2) * hn
    for g in range(ng):  # group g's rows: its 3 q heads, then k_g, then v_g
        block = qkv[g * per : (g + 1) * per]
        qh = np_ // ng * hn
        assert torch.equal(block[:qh], q[g * qh : (g + 1) * qh])
        assert torch.equal(block[qh : qh + hn], k[g * hn : (g + 1) * hn])
        assert torch.equal(block[qh + hn :], v[g * hn : (g + 1) * hn])
    for a, b in zip(schema.unfuse_qkv(qkv, ng, np_, hn), (q, k, v)):
        assert torch.equal(a, b)
    bias = schema.fuse_qkv(q[:, 0], k[:, 0], v[:, 0], ng)
    assert all(torch.equal(a, b) for a, b in zip(schema.unfuse_qkv(bias, ng, np_, hn), (q[:, 0], k[:, 0], v[:, 0])))


def test_fuse_fc1_inverts():
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    g2, u2 = schema.unfuse_fc1(schema.fuse_fc1(gate, up))
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_tp_axis_declared_once_and_consistent_with_role_axes():
    for p in schema.PARAMS:
        assert {schema.role_tp_axis(r) for r in p.roles} == {p.tp_axis}, p.key
    assert set(schema.PARAM_OF_ROLE) == set(ROLE_AXES)


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


# ---- round trips ------------------------------------------------------------------------------

ROUND_TRIPS = [("llama-gqa", tp, pp) for tp in (1, 2, 4) for pp in (1, 2)] + \
              [("qwen2-bias", tp, pp) for tp in (1, 2, 4) for pp in (1, 2)] + \
              [("llama-tied", tp, pp) for tp in (1, 2) for pp in (1, 2)]


@pytest.mark.parametrize("family,tp,pp", ROUND_TRIPS)
def test_hf_megatron_hf_round_trip_is_bit_exact(tiny_hf, tmp_path, family, tp, pp):
    hf = tiny_hf(family)
    mg = ops.hf_to_megatron(hf, tmp_path / "mg", tp=tp, pp=pp, progress=False)
    ckpt = open_megatron(mg)
    assert (ckpt.tp, ckpt.pp, ckpt.padded_vocab) == (tp, pp, 128 * tp)
    assert len(ckpt.files) == tp * pp
    a = ckpt.args
    src = HFCheckpoint.open(hf)
    assert (a.num_layers, a.hidden_size, a.num_query_groups, a.kv_channels, a.ffn_hidden_size) == (
        src.shape.num_layers, src.shape.hidden_size, src.shape.num_query_groups, src.shape.head_dim,
        src.shape.ffn_hidden_size)
    assert a.untie_embeddings_and_output_weights == (not src.shape.tied_embeddings)
    assert a.add_qkv_bias == (family == "qwen2-bias")
    assert a.norm_epsilon == src.config["rms_norm_eps"] and a.normalization == "RMSNorm" and a.swiglu
    back = ops.megatron_to_hf(mg, tmp_path / "hf", progress=False)
    assert_same_tensors(hf_tensors(hf), hf_tensors(back))
    assert HFCheckpoint.open(back).config["architectures"] == src.config["architectures"]


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


def test_reshard_chain_is_bit_exact(tiny_hf, tmp_path):
    hf = tiny_hf("llama-gqa")
    start = ops.hf_to_megatron(hf, tmp_path / "tp2", tp=2, progress=False)
    x = ops.reshard(start, tmp_path / "tp1", tp=1, progress=False)
    x = ops.reshard(x, tmp_path / "tp4pp2", tp=4, pp=2, progress=False)
    assert len(open_megatron(x).files) == 8
    x = ops.reshard(x, tmp_path / "te", spec="transformer_engine", progress=False)
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in next(ops.iter_state_dicts(x))[1]["model"]
    x = ops.reshard(x, tmp_path / "end", tp=2, pp=1, spec="local", progress=False)
    assert_same_tensors(mg_shards(start), mg_shards(x))


def test_cli_convert_and_reshard(tiny_hf, tmp_path):
    hf = tiny_hf("llama-tied")
    assert cli_main(["convert", "hf-to-megatron", "--input", str(hf), "--output", str(tmp_path / "mg"),
                     "--tp", "2", "--no-progress"]) == 0
    assert cli_main(["reshard", "--input", str(tmp_path / "mg"), "--output", str(tmp_path / "mg1"), "--tp", "1",
                     "--no-progress"]) == 0
    assert cli_main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg1"), "--output",
                     str(tmp_path / "hf"), "--no-progress"]) == 0
    assert_same_tensors(hf_tensors(hf), hf_tensors(tmp_path / "hf"))
    assert (tmp_path / "mg" / "hf_meta" / "config.json").is_file()


def test_export_of_a_chosen_iteration(tp2, tmp_path, capsys):
    """--iteration N exports that saved iteration (training keeps several); by default the tracker's (latest)."""
    import shutil

    shutil.copytree(tp2 / "iter_0000000", tp2 / "iter_0000007")
    for f in (tp2 / "iter_0000007").glob("mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        state["model"]["decoder.final_layernorm.weight"] += 1.0
        torch.save(state, f)
    assert cli_main(["convert", "megatron-to-hf", "--input", str(tp2), "--output", str(tmp_path / "it7"),
                     "--iteration", "7", "--no-progress"]) == 0
    ops.megatron_to_hf(tp2, tmp_path / "latest", progress=False)
    latest, it7 = hf_tensors(tmp_path / "latest"), hf_tensors(tmp_path / "it7")
    assert torch.equal(it7.pop("final_norm.None"), latest.pop("final_norm.None") + 1.0)
    assert_same_tensors(latest, it7)
    refuse(["convert", "megatron-to-hf", "--input", str(tp2), "--output", str(tmp_path / "x"), "--iteration", "3"],
           tmp_path / "x", capsys, "no iteration 3 saved (saved: 0, 7)")
    refuse(["convert", "hf-to-megatron", "--input", str(tmp_path / "it7"), "--output", str(tmp_path / "y"),
            "--iteration", "3"], tmp_path / "y", capsys, "--iteration 3: only for megatron-to-hf")


def test_torch_dist_output_round_trips_and_reshards(tiny_hf, tmp_path, monkeypatch):
    """hf -> torch_dist (TP=2, PP=2, megatron-core's saver) -> hf is bit-exact, reading each stored element once
    (layer by layer, not the whole stacked tensor per layer); CLI reshard of it to torch TP=1 is bit-exact too.
    (megatron-core's own loader at TP=2 is checked in test_megatron_parity.py.)"""
    import math

    import torch.distributed.checkpoint as dcp

    from megatron.prune.formats.mcore.dist import TorchDistCheckpoint

    hf = tiny_hf("qwen2-bias")
    out = ops.hf_to_megatron(hf, tmp_path / "dist", tp=2, pp=2, progress=False, ckpt_format="torch_dist")
    ck = open_megatron(out)
    assert isinstance(ck, TorchDistCheckpoint) and (ck.tp, ck.pp) == (2, 2)
    assert ck.args.ckpt_format == "torch_dist" and not list(ck.iter_dir.glob("mp_rank_*"))
    stored = sum(math.prod(md.size) for md in ck.metadata.state_dict_metadata.values() if hasattr(md, "size"))
    read = []
    load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda sd, *a, **k: (read.extend(t.numel() for t in sd.values()
                                                                       if isinstance(t, torch.Tensor)),
                                                           load(sd, *a, **k))[1])
    assert_same_tensors(hf_tensors(hf), hf_tensors(ops.megatron_to_hf(out, tmp_path / "back", progress=False)))
    assert sum(read) == stored, (sum(read), stored)
    monkeypatch.setattr(dcp, "load", load)
    assert cli_main(["reshard", "--input", str(out), "--output", str(tmp_path / "tp1"), "--tp", "1", "--pp", "1",
                     "--no-progress"]) == 0
    assert open_megatron(tmp_path / "tp1").tp == 1
    assert_same_tensors(hf_tensors(hf), hf_tensors(ops.megatron_to_hf(tmp_path / "tp1", tmp_path / "b1",
                                                                     progress=False)))


def test_refuses_unknown_ckpt_format(tp2, tmp_path):
    with pytest.raises(PruneError, match="'zarr'.*torch, torch_dist"):
        ops.reshard(tp2, tmp_path / "y", ckpt_format="zarr", progress=False)
    assert not (tmp_path / "y").exists()


# ---- pruning ----------------------------------------------------------------------------------


def small_plan(shape, tp: int, balance: bool, seed: int = 3, **target) -> PrunePlan:
    t = dict(hidden_size=40, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=32, num_layers=3)
    t.update(target)
    return make_plan(shape, shape.replace(**t), random_scores(shape, seed), tp=tp, balance=balance)


@pytest.mark.parametrize("family,pp,spec", [("llama-gqa", 1, "local"), ("qwen2-bias", 2, "transformer_engine"),
                                            ("llama-tied", 1, "local")])
def test_balanced_prune_of_tp2_equals_pruning_hf(tiny_hf, tmp_path, family, pp, spec):
    hf = tiny_hf(family)
    src = HFCheckpoint.open(hf)
    target = {} if family != "llama-tied" else dict(num_attention_heads=6, num_query_groups=2, hidden_size=36)
    plan = small_plan(src.shape, 2, True, num_layers=2 if pp == 2 else 3, **target)
    mg = ops.hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=pp, spec=spec, progress=False)
    before = tree_hash(mg)
    out = ops.apply_plan(open_megatron(mg), plan, tmp_path / "pruned", progress=False)
    assert tree_hash(mg) == before
    ck = open_megatron(out)
    assert (ck.tp, ck.pp, ck.spec, ck.shape) == (2, pp, spec, plan.target)
    assert ck.args.iteration == 0 and PrunePlan.load(out) == plan
    back = ops.megatron_to_hf(out, tmp_path / "back", progress=False)
    ref = apply_hf_plan(hf, tmp_path / "ref", plan, progress=False)
    assert_same_tensors(hf_tensors(ref), hf_tensors(back))


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


def test_unbalanced_prune_changes_tp_and_equals_pruning_hf(tiny_hf, tmp_path):
    hf = tiny_hf("llama-gqa")
    src = HFCheckpoint.open(hf)
    plan = small_plan(src.shape, 1, False, seed=7, ffn_hidden_size=24)
    mg = ops.hf_to_megatron(hf, tmp_path / "mg", tp=2, progress=False)
    out = ops.apply_plan(open_megatron(mg), plan, tmp_path / "pruned", prune_type="unbalance", tp=1, progress=False)
    assert open_megatron(out).tp == 1
    ref = apply_hf_plan(hf, tmp_path / "ref", plan, progress=False)
    assert_same_tensors(hf_tensors(ref), hf_tensors(ops.megatron_to_hf(out, tmp_path / "back", progress=False)))


def test_cli_prune_detects_megatron_and_reapplies_plan(tiny_hf, tmp_path, capsys):
    mg = ops.hf_to_megatron(tiny_hf("llama-gqa"), tmp_path / "mg", tp=2, progress=False)
    flags = ["--hidden-size", "40", "--num-query-groups", "2", "--ffn-hidden-size", "32", "--drop-layers", "1",
             "--method", "magnitude", "--no-progress"]
    assert cli_main(["prune", "--input", str(mg), "--output", str(tmp_path / "a"), *flags]) == 0
    assert "optimizer state" in capsys.readouterr().out
    plan = PrunePlan.load(tmp_path / "a")
    assert plan.info["tp"] == 2 and plan.target.num_layers == 3
    assert cli_main(["prune", "--input", str(mg), "--output", str(tmp_path / "b"), "--plan",
                     str(tmp_path / "a" / "prune_plan.json"), "--no-progress"]) == 0
    assert_same_tensors(mg_shards(tmp_path / "a"), mg_shards(tmp_path / "b"))


# ---- bad input --------------------------------------------------------------------------------


@pytest.fixture
def tp2(tiny_hf, tmp_path) -> Path:
    return ops.hf_to_megatron(tiny_hf("llama-gqa"), tmp_path / "mg", tp=2, progress=False)


def refuse(argv: list[str], out: Path, capsys, *needles: str) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


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


def test_refuses_balance_target_not_divisible_by_tp(tp2, tmp_path, capsys):
    refuse(["prune", "--input", str(tp2), "--output", str(tmp_path / "o"), "--ffn-hidden-size", "31"],
           tmp_path / "o", capsys, "--ffn-hidden-size 31", "nearest valid: [30, 32]")
    refuse(["prune", "--input", str(tp2), "--output", str(tmp_path / "o"), "--num-query-groups", "3",
            "--num-attention-heads", "6"], tmp_path / "o", capsys, "--num-query-groups 3", "[2, 4]")


def test_refuses_unbalanced_groups_not_divisible_by_output_tp(tp2, tmp_path, capsys):
    refuse(["prune", "--input", str(tp2), "--output", str(tmp_path / "o"), "--num-query-groups", "3",
            "--num-attention-heads", "6", "--prune-type", "unbalance"], tmp_path / "o", capsys,
           "num_query_groups 3 is not divisible by tensor-parallel size 2", "valid --tp values")


def test_refuses_unbalanced_plan_for_balance(tp2, tmp_path):
    ck = open_megatron(tp2)
    plan = None
    for seed in range(50):  # find a global selection that is not balanced across the two TP slices
        p = small_plan(ck.shape, 1, False, seed=seed)
        try:
            ops.check_balanced(p, 2, ck.padded_vocab)
        except PruneError:
            plan = p
            break
    assert plan is not None
    with pytest.raises(PruneError, match="not balanced for TP=2"):
        ops.apply_plan(open_megatron(tp2), plan, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_refuses_layers_not_divisible_by_pp(tiny_hf, tmp_path, capsys):
    mg = ops.hf_to_megatron(tiny_hf("llama-gqa"), tmp_path / "pp2", tp=1, pp=2, progress=False)
    refuse(["prune", "--input", str(mg), "--output", str(tmp_path / "o"), "--num-layers", "3"], tmp_path / "o",
           capsys, "3 layers, not divisible by the checkpoint's pipeline-parallel size 2", "[2, 4]")


def test_refuses_output_equal_to_input(tp2, capsys):
    before = tree_hash(tp2)
    assert cli_main(["reshard", "--input", str(tp2), "--output", str(tp2), "--tp", "1"]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert tree_hash(tp2) == before


def test_args_carry_use_checkpoint_args_fields(tp2):
    a = open_megatron(tp2).args
    assert isinstance(a, argparse.Namespace)
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads",
                 "num_query_groups", "group_query_attention", "kv_channels", "max_position_embeddings",
                 "position_embedding_type", "add_position_embedding", "use_rotary_position_embeddings",
                 "rotary_base", "rotary_percent", "rotary_interleaved", "add_bias_linear", "add_qkv_bias",
                 "squared_relu", "swiglu", "untie_embeddings_and_output_weights", "apply_layernorm_1p",
                 "normalization", "apply_query_key_layer_scaling", "attention_dropout", "hidden_dropout",
                 "padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "make_vocab_size_divisible_by", "norm_epsilon", "ckpt_format"):
        assert getattr(a, name, None) is not None, name
    assert a.padded_vocab_size == 256 and a.vocab_size == 96 and a.tensor_model_parallel_size == 2


# ---- seed-compatible scripts --------------------------------------------------------------------


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


def test_rope_scaling_llama3_is_carried_and_others_refused():
    assert mcore_args.rope_scaling_args({"rope_theta": 1e4}) == {"use_rope_scaling": False}
    cfg = {"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    assert mcore_args.rope_scaling_args(cfg) == {"use_rope_scaling": True, "rope_scaling_factor": 32.0}
    with pytest.raises(PruneError, match="not supported"):
        mcore_args.rope_scaling_args({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
