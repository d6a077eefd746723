"""Mixture-of-experts models (Qwen3-MoE, Mixtral) in the Megatron format: megatron-core's SequentialMLP names
(``mlp.router.weight``, ``mlp.experts.local_experts.E.linear_fc1/2.weight``, local spec, torch format), HF ->
Megatron -> HF bit-exact at TP 1/2, PP 1/2 and EP 1/2, pruning a Megatron checkpoint equal to pruning
its HF model, expert-parallel shards (Megatron-LM's mp_rank_TT[_PPP]_EEE), and megatron-core GPTModel loading them
strictly with transformers' logits (TP 1 and 2, EP 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compare import assert_same_tensors, mg_shards, safetensors_of
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.select import make_plan
from megatron.prune.errors import PruneError
from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.hf import apply_plan as apply_hf_plan
from megatron.prune.formats.mcore import ops
from megatron.prune.scoring.methods import random_scores
from procs import run_on_ranks, run_on_two_ranks
from tiny import MOE_FAMILIES, make_tiny_hf

MOE = sorted(MOE_FAMILIES)
WORKER = Path(__file__).with_name("megatron_parity_worker.py")


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    models = {f: make_tiny_hf(root / f, f) for f in MOE}
    # Qwen3-MoE without norm_topk_prob: megatron-core's pre-softmax router (top-k of the softmax, not renormalised)
    models["qwen3-moe-raw"] = make_tiny_hf(root / "qwen3-moe-raw", "qwen3-moe", norm_topk_prob=False)
    return models


def small_plan(shape):
    target = shape.replace(hidden_size=40, num_experts=3, moe_ffn_hidden_size=8, num_experts_per_tok=2, num_layers=2)
    return make_plan(shape, target, random_scores(shape, 5), tp=2)


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (1, 2)])
def test_hf_megatron_hf_is_bit_exact(moe_models, tmp_path, family, tp, pp):
    hf = moe_models[family]
    mg = ops.hf_to_megatron(hf, tmp_path / "mg", tp=tp, pp=pp, progress=False)
    names = mg_shards(mg)
    assert any(n.endswith("decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight") for n in names)
    assert any(n.endswith("decoder.layers.0.mlp.router.weight") for n in names)
    assert not any(".mlp.linear_fc1." in n for n in names)
    back = ops.megatron_to_hf(mg, tmp_path / "back", progress=False)
    assert_same_tensors(safetensors_of(hf), safetensors_of(back))
    args = open_megatron(mg).args
    assert (args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk) == (4, 16, 2)
    assert json.loads((back / "config.json").read_text())["architectures"] == \
        json.loads((hf / "config.json").read_text())["architectures"]


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("prune_type", ["balance", "unbalance"])
def test_megatron_prune_equals_hf_prune(moe_models, tmp_path, family, prune_type):
    """The same plan (experts, expert width, hidden, layers) applied to the TP=2 PP=2 Megatron checkpoint and to the
    HF model: the exported Megatron result is the HF result, tensor for tensor."""
    hf = moe_models[family]
    plan = small_plan(HFCheckpoint.open(hf).shape)
    ref = apply_hf_plan(hf, tmp_path / "ref", plan, progress=False)
    mg = ops.hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=2, progress=False)
    out = ops.apply_plan(open_megatron(mg), plan, tmp_path / "pruned", prune_type=prune_type, progress=False)
    back = ops.megatron_to_hf(out, tmp_path / "back", progress=False)
    assert_same_tensors(safetensors_of(ref), safetensors_of(back))


def test_moe_megatron_refusals(moe_models, tmp_path):
    """Not written yet: SequentialMLP experts in the Transformer Engine spec (grouped ones are:
    test_mcore_grouped.py) and torch_dist."""
    for kw in (dict(spec="transformer_engine"), dict(ckpt_format="torch_dist")):
        with pytest.raises(PruneError, match="in torch format with SequentialMLP: --transformer-impl local"):
            ops.hf_to_megatron(moe_models["mixtral"], tmp_path / "mg", progress=False, **kw)
        assert not (tmp_path / "mg").exists()


def test_megatron_core_logits_equal_transformers(moe_models, tmp_path):
    """GPTModel (local spec, SequentialMLP, allgather dispatcher) built from the converted and the pruned
    checkpoints' args loads each strictly and gives transformers' logits, at TP=1, TP=2 and EP=2."""
    jobs = []
    for name, hf in moe_models.items():
        for tp in (1, 2):
            mg = ops.hf_to_megatron(hf, tmp_path / f"{name}-tp{tp}", tp=tp, progress=False)
            jobs.append({"name": f"moe-{name}-tp{tp}", "mg": str(mg), "hf": str(hf), "tp": tp})
    for name in MOE:  # expert parallelism: each of the 2 ranks holds (and runs) 2 of the 4 experts
        mg = ops.hf_to_megatron(moe_models[name], tmp_path / f"{name}-ep2", ep=2, progress=False)
        jobs.append({"name": f"moe-{name}-ep2", "mg": str(mg), "hf": str(moe_models[name]), "tp": 1, "ep": 2})
    hf = moe_models["qwen3-moe"]
    plan = small_plan(HFCheckpoint.open(hf).shape)
    ref = apply_hf_plan(hf, tmp_path / "pruned-hf", plan, progress=False)
    out = ops.apply_plan(open_megatron(tmp_path / "qwen3-moe-tp2"), plan, tmp_path / "pruned-tp2", progress=False)
    jobs.append({"name": "moe-pruned-tp2", "mg": str(out), "hf": str(ref), "tp": 2})
    per_rank = run_on_two_ranks(WORKER, jobs, tmp_path, timeout=900)
    for job in jobs:
        for r in per_rank:
            res = r[job["name"]]
            assert res["strict_load"] and res["close"], (job["name"], res)
            assert res["max_abs_diff"] < 1e-4 * max(1.0, res["ref_scale"]), (job["name"], res)


def test_megatron_core_logits_at_tp2_ep2(moe_models, tmp_path):
    """4 ranks, TP=2 x EP=2 (expert tensor parallel = TP, expert data parallel 1): each rank loads its
    mp_rank_TT_000_EEE shard strictly, runs half the experts on half their channels (allgather dispatcher, no
    sequence parallelism: inference needs none), and every rank gives transformers' logits. A grouped-GEMM
    checkpoint resharded to SequentialMLP runs the same way."""
    jobs = [{"name": f"moe-{name}-tp2-ep2", "hf": str(hf), "tp": 2, "ep": 2,
             "mg": str(ops.hf_to_megatron(hf, tmp_path / name, tp=2, ep=2, progress=False))}
            for name, hf in moe_models.items() if name != "qwen3-moe-raw"]
    hf = moe_models["qwen3-moe"]
    grouped = ops.hf_to_megatron(hf, tmp_path / "grouped", tp=1, ep=1, spec="transformer_engine", grouped=True,
                                 progress=False)
    jobs.append({"name": "moe-grouped-tp2-ep2", "hf": str(hf), "tp": 2, "ep": 2,
                 "mg": str(ops.reshard(grouped, tmp_path / "grouped-local", tp=2, ep=2, spec="local",
                                       progress=False))})
    per_rank = run_on_ranks(WORKER, jobs, tmp_path, timeout=600, ranks=4)
    assert len(per_rank) == 4
    for job in jobs:
        for r in per_rank:
            res = r[job["name"]]
            assert res["strict_load"] and res["close"], (job["name"], res)
            assert res["max_abs_diff"] < 1e-4 * max(1.0, res["ref_scale"]), (job["name"], res)
    assert sorted((r[jobs[0]["name"]]["tp_rank"], r[jobs[0]["name"]]["ep_rank"]) for r in per_rank) == \
        [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("family", MOE)
def test_reshard_keeps_every_expert(moe_models, tmp_path, family):
    """TP=1 PP=1 -> TP=2 PP=2 -> TP=1 PP=2: the same weights (exported to HF) and the same args."""
    hf = moe_models[family]
    mg = ops.hf_to_megatron(hf, tmp_path / "mg", progress=False)
    wide = ops.reshard(mg, tmp_path / "wide", tp=2, pp=2, progress=False)
    narrow = ops.reshard(wide, tmp_path / "narrow", tp=1, pp=2, progress=False)
    for out in (wide, narrow):
        back = ops.megatron_to_hf(out, tmp_path / f"{out.name}-hf", progress=False)
        assert_same_tensors(safetensors_of(hf), safetensors_of(back))
    assert open_megatron(narrow).shape == open_megatron(mg).shape == HFCheckpoint.open(hf).shape


@pytest.mark.parametrize("family", MOE)
def test_expert_parallel_shards_round_trip_reshard_and_prune(moe_models, tmp_path, family):
    """EP=2 with TP=2 PP=2: Megatron-LM's mp_rank_TT_PPP_EEE folders, each EP rank holding half the experts numbered
    from 0 (and every other tensor); HF -> Megatron -> HF bit-exact, reshard to EP 1 and back, and pruning keeps the
    EP (the kept experts must split evenly) with the HF path's result."""
    from megatron.prune.formats.mcore.read import load_shard

    hf = moe_models[family]
    full = HFCheckpoint.open(hf)
    mg = ops.hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=2, ep=2, progress=False)
    dirs = sorted(d.name for d in (mg / "iter_0000000").iterdir())
    assert dirs == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    sd = load_shard(mg / "iter_0000000" / "mp_rank_01_000_001" / "model_optim_rng.pt")
    local = {n.split("local_experts.")[1].split(".")[0] for n in sd["model"] if "local_experts" in n}
    assert local == {"0", "1"} and sd["args"].expert_model_parallel_size == 2
    # EP rank 1's local expert 0 is the model's expert 2; TP rank 1 holds the second half of its FFN channels
    assert torch.equal(sd["model"]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"],
                       full.get("expert_down", 0, 2)[:, 8:])
    assert torch.equal(sd["model"]["decoder.layers.0.mlp.router.weight"], full.get("router", 0))
    assert_same_tensors(safetensors_of(hf), safetensors_of(ops.megatron_to_hf(mg, tmp_path / "back", progress=False)))
    one = ops.reshard(mg, tmp_path / "ep1", ep=1, progress=False)
    assert open_megatron(one).ep == 1 and open_megatron(mg).ep == 2
    again = ops.reshard(one, tmp_path / "ep2", tp=1, pp=1, ep=4, progress=False)
    assert_same_tensors(safetensors_of(hf), safetensors_of(ops.megatron_to_hf(again, tmp_path / "back4",
                                                                              progress=False)))
    shape = full.shape
    odd = small_plan(shape)  # 3 experts over 2 EP ranks
    with pytest.raises(PruneError, match="--num-experts 3 is not divisible by the checkpoint's expert-parallel size 2"):
        ops.apply_plan(open_megatron(mg), odd, tmp_path / "odd", progress=False)
    target = shape.replace(hidden_size=40, num_experts=2, moe_ffn_hidden_size=8, num_experts_per_tok=2)
    plan = make_plan(shape, target, random_scores(shape, 5), tp=2)
    ref = apply_hf_plan(hf, tmp_path / "ref", plan, progress=False)
    out = ops.apply_plan(open_megatron(mg), plan, tmp_path / "pruned", progress=False)
    assert open_megatron(out).ep == 2
    assert_same_tensors(safetensors_of(ref), safetensors_of(ops.megatron_to_hf(out, tmp_path / "pb", progress=False)))
    with pytest.raises(PruneError, match="expert-parallel size 3; valid --ep values: \\[1, 2, 4\\]"):
        ops.hf_to_megatron(hf, tmp_path / "ep3", ep=3, progress=False)


def test_ep_flags_of_convert_and_reshard(moe_models, tmp_path, capsys):
    """`convert hf-to-megatron --ep 2`, `reshard --ep 1`, the way back to HF bit-exact; --ep refused where it cannot
    apply (megatron-to-hf, a dense model, experts that do not split evenly), before anything is written."""
    from megatron.prune.cli import main

    hf = moe_models["qwen3-moe"]
    assert main(["convert", "hf-to-megatron", "--input", str(hf), "--output", str(tmp_path / "mg"), "--ep", "2",
                 "--tp", "2", "--transformer-impl", "local", "--no-progress"]) == 0
    assert "(TP=2, PP=1, EP=2, local spec" in capsys.readouterr().out
    assert main(["reshard", "--input", str(tmp_path / "mg"), "--output", str(tmp_path / "ep1"), "--ep", "1",
                 "--no-progress"]) == 0
    assert open_megatron(tmp_path / "ep1").ep == 1
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "ep1"), "--output", str(tmp_path / "back"),
                 "--no-progress"]) == 0
    assert_same_tensors(safetensors_of(hf), safetensors_of(tmp_path / "back"))
    capsys.readouterr()
    for argv, said in [(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg"), "--ep", "2"],
                        "--ep 2: only for hf-to-megatron"),
                       (["convert", "hf-to-megatron", "--input", str(hf), "--ep", "3"],
                        "num_experts 4 is not divisible by expert-parallel size 3; valid --ep values: [1, 2, 4]"),
                       (["reshard", "--input", str(tmp_path / "mg"), "--ep", "0"], "--ep 0")]:
        assert main([*argv, "--output", str(tmp_path / "bad"), "--no-progress"]) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_ep_on_a_dense_model_refused(tiny_hf, tmp_path, capsys):
    from megatron.prune.cli import main

    assert main(["convert", "hf-to-megatron", "--input", str(tiny_hf("llama-gqa")), "--output", str(tmp_path / "mg"),
                 "--ep", "2", "--no-progress"]) == 2
    assert "--ep 2: the model is dense (no experts to split)" in capsys.readouterr().err
    assert not (tmp_path / "mg").exists()


def test_balanced_prune_keeps_as_many_experts_on_each_ep_rank(moe_models, tmp_path, capsys):
    """`prune` of an EP=2 TP=2 checkpoint (balanced, the default): each EP rank keeps as many experts and each TP
    slice of a kept expert as many channels; an expert count the EP ranks cannot share is refused before scoring."""
    from megatron.prune.cli import main

    mg = ops.hf_to_megatron(moe_models["mixtral"], tmp_path / "mg", tp=2, ep=2, progress=False)
    assert main(["prune", "--input", str(mg), "--output", str(tmp_path / "out"), "--num-experts", "2",
                 "--moe-ffn-hidden-size", "8", "--method", "random", "--seed", "3", "--no-progress"]) == 0
    plan = PrunePlan.load(tmp_path / "out")
    assert plan.info["ep"] == 2 and plan.info["tp"] == 2
    for lp in plan.layers:
        assert [e // 2 for e in lp.experts] == [0, 1]  # one expert from each EP rank's half
        assert all(sum(c < 8 for c in ffn) == 4 for ffn in lp.expert_ffn)  # 4 channels from each TP half
    assert open_megatron(tmp_path / "out").ep == 2
    capsys.readouterr()
    assert main(["prune", "--input", str(mg), "--output", str(tmp_path / "bad"), "--num-experts", "3",
                 "--method", "random", "--no-progress"]) == 2
    assert "--num-experts 3 is not divisible by the expert-parallel size 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
