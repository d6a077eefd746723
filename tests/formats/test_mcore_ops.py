"""Convert, reshard and prune Megatron checkpoints: bit-exact round trips, HF path == Megatron path, refusals."""

from __future__ import annotations

import pytest
import torch

from compare import assert_same_tensors, hf_tensors, mg_shards, refuse, tree_hash
from megatron.prune.cli import main as cli_main
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.select import make_plan
from megatron.prune.errors import PruneError
from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.hf import apply_plan as apply_hf_plan
from megatron.prune.formats.mcore import ops
from megatron.prune.scoring.methods import magnitude_scores, random_scores

ROUND_TRIPS = [("llama-gqa", tp, pp) for tp in (1, 2, 4) for pp in (1, 2)] + \
              [("qwen2-bias", tp, pp) for tp in (1, 2, 4) for pp in (1, 2)] + \
              [("llama-tied", tp, pp) for tp in (1, 2) for pp in (1, 2)] + \
              [("qwen3", tp, pp) for tp in (1, 2) for pp in (1, 2)]


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
    assert a.qk_layernorm == (family == "qwen3")
    assert a.norm_epsilon == src.config["rms_norm_eps"] and a.normalization == "RMSNorm" and a.swiglu
    back = ops.megatron_to_hf(mg, tmp_path / "hf", progress=False)
    assert_same_tensors(hf_tensors(hf), hf_tensors(back))
    assert HFCheckpoint.open(back).config["architectures"] == src.config["architectures"]


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


def small_plan(shape, tp: int, balance: bool, seed: int = 3, **target) -> PrunePlan:
    t = dict(hidden_size=40, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=32, num_layers=3)
    t.update(target)
    return make_plan(shape, shape.replace(**t), random_scores(shape, seed), tp=tp, balance=balance)


@pytest.mark.parametrize("family,pp,spec", [("llama-gqa", 1, "local"), ("qwen2-bias", 2, "transformer_engine"),
                                            ("llama-tied", 1, "local"), ("qwen3", 1, "local"),
                                            ("qwen3", 2, "transformer_engine")])
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


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3"])
def test_unbalanced_prune_changes_tp_and_equals_pruning_hf(tiny_hf, tmp_path, family):
    hf = tiny_hf(family)
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


@pytest.mark.slow
def test_real_model_tp3_round_trip_and_balanced_prune(real_model, tmp_path):
    mg = ops.hf_to_megatron(real_model, tmp_path / "mg", tp=3, progress=False)
    ck = open_megatron(mg)
    assert (ck.tp, ck.padded_vocab, ck.shape) == (3, 49152, HFCheckpoint.open(real_model).shape)
    assert (mg / "hf_meta" / "tokenizer.json").is_file() and ck.args.tokenizer_type == "HuggingFaceTokenizer"
    back = ops.megatron_to_hf(mg, tmp_path / "back", progress=False)
    assert_same_tensors(hf_tensors(real_model), hf_tensors(back))
    assert (back / "tokenizer.json").is_file()

    s = ck.shape
    target = s.replace(hidden_size=480, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=1152,
                       num_layers=s.num_layers - 3)
    plan = make_plan(s, target, magnitude_scores(ck), tp=3, balance=True)
    pruned = ops.apply_plan(open_megatron(mg), plan, tmp_path / "pruned", progress=False)
    ref = apply_hf_plan(real_model, tmp_path / "ref", plan, progress=False)
    assert_same_tensors(hf_tensors(ref), hf_tensors(ops.megatron_to_hf(pruned, tmp_path / "pruned_hf", progress=False)))


def test_qwen3_megatron_names_in_both_specs(tiny_hf, tmp_path):
    """QK-norm weights are megatron-core's ``self_attention.{q,k}_layernorm.weight`` (the local and the TE spec build
    the same module there), replicated: every TP rank holds the whole ``[head_dim]`` weight."""
    hf = tiny_hf("qwen3")
    want = HFCheckpoint.open(hf)
    for spec in ("local", "transformer_engine"):
        mg = ops.hf_to_megatron(hf, tmp_path / spec, tp=2, spec=spec, progress=False)
        for (tp_rank, _), sd in ops.iter_state_dicts(mg):
            for role, name in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
                assert torch.equal(sd["model"][f"decoder.layers.1.self_attention.{name}.weight"], want.get(role, 1))
