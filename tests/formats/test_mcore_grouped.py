"""Grouped-GEMM experts in the Megatron format: megatron-core 0.19.2's TEGroupedMLP (transformer_engine spec,
``moe_grouped_gemm=True``), whose torch-format state dict holds ``mlp.experts.linear_fc1.weightE`` [2*f/tp, h]
(per TP rank ``[gate_r; up_r]``) and ``mlp.experts.linear_fc2.weightE`` [h, f/tp] for each local expert E, a separate
``pre_mlp_layernorm.weight`` and one ``_extra_state`` per grouped linear. Transformer Engine is not installed here, so
the names and shapes below are written from a reading of megatron-core's ``TEGroupedMLP.__init__`` /
``sharded_state_dict`` and ``TEColumnParallelGroupedLinear`` / ``TERowParallelGroupedLinear`` (the legacy GroupedMLP
with ``weight1`` / ``weight2`` no longer exists in 0.19.2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from compare import assert_same_tensors, mg_shards, safetensors_of
from megatron.prune.core.select import make_plan
from megatron.prune.errors import PruneError
from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.mcore import ops
from megatron.prune.formats.mcore.read import load_shard
from megatron.prune.scoring.methods import random_scores
from tiny import make_tiny_hf

# tiny Qwen3-MoE (tests/tiny.py): hidden 48, 4 experts of width 16, 4 layers, 8 heads of 16 over 4 groups
GROUPED_LAYER = {  # name -> (shape at TP=1, shape at TP=2), layer 0, EP=1, from megatron-core's TEGroupedMLP
    **{f"decoder.layers.0.mlp.experts.linear_fc1.weight{e}": ((32, 48), (16, 48)) for e in range(4)},
    **{f"decoder.layers.0.mlp.experts.linear_fc2.weight{e}": ((48, 16), (48, 8)) for e in range(4)},
    "decoder.layers.0.mlp.router.weight": ((4, 48), (4, 48)),
    "decoder.layers.0.pre_mlp_layernorm.weight": ((48,), (48,)),
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": ((48,), (48,)),
    "decoder.layers.0.self_attention.linear_qkv.weight": ((256, 48), (128, 48)),
    "decoder.layers.0.self_attention.linear_proj.weight": ((48, 128), (48, 64)),
    "decoder.layers.0.self_attention.q_layernorm.weight": ((16,), (16,)),
    "decoder.layers.0.self_attention.k_layernorm.weight": ((16,), (16,)),
}
GROUPED_EXTRA = {f"decoder.layers.0.{m}._extra_state" for m in (
    "self_attention.linear_qkv", "self_attention.linear_proj", "self_attention.core_attention",
    "mlp.experts.linear_fc1", "mlp.experts.linear_fc2")}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grouped")
    return {f: make_tiny_hf(root / f, f) for f in ("qwen3-moe", "mixtral")}


def layer0(folder: Path, shard: str) -> dict[str, object]:
    """Layer 0's entries of one shard's state dict."""
    model = load_shard(folder / "iter_0000000" / shard / "model_optim_rng.pt")["model"]
    return {n: v for n, v in model.items() if n.startswith("decoder.layers.0.")}


def test_grouped_names_and_shapes_are_te_grouped_mlps(models, tmp_path):
    """Layer 0 of a TP=1 and a TP=2 grouped checkpoint holds exactly TEGroupedMLP's keys and shapes; weightE of TP
    rank r is [gate_r; up_r] of expert E, the SequentialMLP checkpoint's local_experts.E tensor bit for bit."""
    if importlib.util.find_spec("transformer_engine"):
        pytest.skip("Transformer Engine is installed: compare with TEGroupedMLP.state_dict() instead")
    hf = models["qwen3-moe"]
    full = HFCheckpoint.open(hf)
    for tp, col in ((1, 0), (2, 1)):
        mg = ops.hf_to_megatron(hf, tmp_path / f"g{tp}", tp=tp, spec="transformer_engine", grouped=True,
                                progress=False)
        seq = ops.hf_to_megatron(hf, tmp_path / f"s{tp}", tp=tp, progress=False)
        assert open_megatron(mg).args.moe_grouped_gemm is True and open_megatron(mg).grouped
        assert open_megatron(mg).args.transformer_impl == "transformer_engine"
        sd = layer0(mg, f"mp_rank_{tp - 1:02d}")
        assert {n for n, v in sd.items() if v is None} == GROUPED_EXTRA
        assert {n: tuple(v.shape) for n, v in sd.items() if v is not None} == \
            {n: shapes[col] for n, shapes in GROUPED_LAYER.items()}
        s = layer0(seq, f"mp_rank_{tp - 1:02d}")
        for e in range(4):
            assert torch.equal(sd[f"decoder.layers.0.mlp.experts.linear_fc1.weight{e}"],
                               s[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight"])
            assert torch.equal(sd[f"decoder.layers.0.mlp.experts.linear_fc2.weight{e}"],
                               s[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc2.weight"])
    # TP rank 1 of expert 3: the second halves of gate and of up, stacked
    gate, up = full.get("expert_gate", 0, 3), full.get("expert_up", 0, 3)
    assert torch.equal(sd["decoder.layers.0.mlp.experts.linear_fc1.weight3"], torch.cat([gate[8:], up[8:]]))


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 2)])
def test_grouped_round_trip_and_reshard(models, tmp_path, family, tp, ep):
    """HF -> grouped Megatron (TP, EP) -> HF is bit-exact; reshard to another TP/PP/EP keeps the grouped layout and
    the weights; reshard --transformer-impl local turns it into SequentialMLP names, the same weights."""
    hf = models[family]
    mg = ops.hf_to_megatron(hf, tmp_path / "mg", tp=tp, ep=ep, spec="transformer_engine", grouped=True,
                            progress=False)
    names = mg_shards(mg)
    assert any(n.endswith("decoder.layers.3.mlp.experts.linear_fc2.weight1") for n in names)
    assert not any("local_experts" in n for n in names)
    assert_same_tensors(safetensors_of(hf), safetensors_of(ops.megatron_to_hf(mg, tmp_path / "back",
                                                                              progress=False)))
    other = ops.reshard(mg, tmp_path / "re", tp=3 - tp, pp=2, ep=3 - ep, progress=False)
    assert open_megatron(other).grouped and (open_megatron(other).tp, open_megatron(other).ep) == (3 - tp, 3 - ep)
    local = ops.reshard(other, tmp_path / "local", spec="local", progress=False)
    assert not open_megatron(local).grouped and open_megatron(local).args.moe_grouped_gemm is False
    assert any("local_experts" in n for n in mg_shards(local))
    for out in (other, local):
        back = ops.megatron_to_hf(out, tmp_path / f"{out.name}-hf", progress=False)
        assert_same_tensors(safetensors_of(hf), safetensors_of(back))


@pytest.mark.parametrize("prune_type", ["balance", "unbalance"])
def test_grouped_prune_equals_sequential_prune(models, tmp_path, prune_type):
    """One plan applied to the grouped and to the SequentialMLP checkpoint (TP=2, EP=2): the grouped output keeps the
    grouped layout and, resharded to SequentialMLP, equals the SequentialMLP output tensor for tensor."""
    hf = models["qwen3-moe"]
    shape = HFCheckpoint.open(hf).shape
    target = shape.replace(hidden_size=40, num_experts=2, moe_ffn_hidden_size=8, num_layers=2)
    plan = make_plan(shape, target, random_scores(shape, 7), tp=2)
    grouped = ops.hf_to_megatron(hf, tmp_path / "g", tp=2, ep=2, spec="transformer_engine", grouped=True,
                                 progress=False)
    seq = ops.hf_to_megatron(hf, tmp_path / "s", tp=2, ep=2, progress=False)
    pg = ops.apply_plan(open_megatron(grouped), plan, tmp_path / "pg", prune_type=prune_type, progress=False)
    ps = ops.apply_plan(open_megatron(seq), plan, tmp_path / "ps", prune_type=prune_type, progress=False)
    assert open_megatron(pg).grouped and open_megatron(pg).ep == 2
    as_seq = ops.reshard(pg, tmp_path / "pg-seq", spec="local", progress=False)
    a, b = mg_shards(as_seq), mg_shards(ps)
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name] is None and b[name] is None) or torch.equal(a[name], b[name]), name


def test_grouped_cli_and_refusals(models, tiny_hf, tmp_path, capsys):
    """`convert hf-to-megatron --moe-grouped-gemm` writes the transformer_engine spec with moe_grouped_gemm=True;
    grouped experts on the local spec, on a dense model or with torch_dist are refused before anything is
    written."""
    from megatron.prune.cli import main

    hf = models["mixtral"]
    assert main(["convert", "hf-to-megatron", "--input", str(hf), "--output", str(tmp_path / "mg"),
                 "--moe-grouped-gemm", "--no-progress"]) == 0
    assert "transformer_engine spec, grouped-GEMM experts" in capsys.readouterr().out
    assert open_megatron(tmp_path / "mg").args.moe_grouped_gemm is True
    for argv, said in [
        (["--input", str(hf), "--moe-grouped-gemm", "--transformer-impl", "local"],
         "got TEGroupedMLP (grouped GEMM), spec local"),
        (["--input", str(hf), "--moe-grouped-gemm", "--ckpt-format", "torch_dist"], "format torch_dist"),
        (["--input", str(tiny_hf("llama-gqa")), "--moe-grouped-gemm"], "--moe-grouped-gemm: the model is dense"),
    ]:
        assert main(["convert", "hf-to-megatron", *argv, "--output", str(tmp_path / "bad"), "--no-progress"]) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    with pytest.raises(PruneError, match="SequentialMLP: --transformer-impl local"):
        ops.hf_to_megatron(hf, tmp_path / "bad", spec="transformer_engine", progress=False)


def test_args_and_names_that_disagree_are_refused(models, tmp_path):
    """The layout is read from the args: SequentialMLP names under args saying moe_grouped_gemm=True (local spec) are
    refused when the checkpoint is opened, naming the spec grouped GEMM needs."""
    mg = ops.hf_to_megatron(models["mixtral"], tmp_path / "mg", progress=False)
    path = mg / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt"
    shard = torch.load(path, weights_only=False)
    shard["args"].moe_grouped_gemm = True
    torch.save(shard, path)
    with pytest.raises(PruneError, match="args say moe_grouped_gemm=True .TEGroupedMLP .grouped GEMM. experts., which "
                                         "megatron-core builds in the transformer_engine spec only, but its names are "
                                         "local-spec"):
        open_megatron(mg)
