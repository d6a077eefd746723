"""Mixture-of-experts models (Qwen3-MoE, Mixtral) on the HF path: shape and config, plans, flags, selection (an
expert the router never picks is pruned first and leaves the logits as they were), output loaded by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compare import prune_cli, safetensors_of, tree_hash
from megatron.prune.cli import main
from megatron.prune.core.plan import LayerPlan, PrunePlan
from megatron.prune.core.shape import hf_config_for_shape, shape_from_hf_config
from megatron.prune.errors import PruneError
from megatron.prune.formats.hf import HFCheckpoint
from tiny import DEAD_EXPERT, MOE_FAMILIES, logits, make_tiny_hf, make_tiny_model, sample_ids, tiny_config

MOE = sorted(MOE_FAMILIES)
DEAD = DEAD_EXPERT  # the expert the router of the moe_tok models never picks


@pytest.fixture(scope="module")
def moe_hf(tmp_path_factory):
    """``moe_hf(family)`` -> a tiny random MoE checkpoint without tokenizer. Read-only."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_hf(tmp_path_factory.mktemp(family) / "model", family)
        return cache[family]

    return get


@pytest.mark.parametrize("family", MOE)
def test_shape_counts_every_parameter_and_round_trips_the_config(family):
    """num_params equals transformers' parameter count; the config written for the shape reads back as it."""
    model = make_tiny_model(family)
    config = {**model.config.to_dict(), "architectures": model.config.architectures}
    shape = shape_from_hf_config(config)
    assert (shape.num_experts, shape.moe_ffn_hidden_size, shape.num_experts_per_tok, shape.ffn_hidden_size) == (
        4, 16, 2, 0)
    assert shape.num_params() == sum(p.numel() for p in model.parameters())
    small = shape.replace(num_experts=3, moe_ffn_hidden_size=8, num_experts_per_tok=1)
    assert shape_from_hf_config(hf_config_for_shape(config, small)) == small


def test_qwen3_moe_hub_config_key_and_mixed_dense_layers():
    """Hub Qwen3-MoE configs name the count num_experts (transformers 5 writes num_local_experts); configs that mix
    dense layers in are refused by key and value."""
    config = tiny_config("qwen3-moe").to_dict()
    config["architectures"] = ["Qwen3MoeForCausalLM"]
    hub = {k: v for k, v in config.items() if k != "num_local_experts"} | {"num_experts": 4}
    assert shape_from_hf_config(hub).num_experts == 4
    assert hf_config_for_shape(hub, shape_from_hf_config(hub).replace(num_experts=2))["num_experts"] == 2
    for bad, said in [({"mlp_only_layers": [1]}, "mlp_only_layers [1]"), ({"decoder_sparse_step": 2},
                                                                          "decoder_sparse_step 2")]:
        with pytest.raises(PruneError,
                           match=r"dense layers mixed in .*" + said.replace("[", r"\[").replace("]", r"\]")):
            shape_from_hf_config({**config, **bad})


@pytest.mark.parametrize("family", MOE)
def test_keep_all_is_bit_identical(moe_hf, tmp_path, family):
    src = moe_hf(family)
    assert prune_cli(src, tmp_path / "out") == 0
    a, b = safetensors_of(src), safetensors_of(tmp_path / "out")
    assert a.keys() == b.keys() and any(".experts.3." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = sample_ids()
    assert torch.equal(logits(src, ids), logits(tmp_path / "out", ids))
    assert PrunePlan.load(tmp_path / "out").is_identity()


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_pruned_moe_loads_with_its_new_config(moe_hf, tmp_path, family, method):
    """Experts, expert width, hidden size and layers pruned together: transformers loads the output, with the
    plan's sizes in its config and as many parameters as the target shape counts; each kept expert holds the slice
    of its source expert."""
    src = moe_hf(family)
    out = tmp_path / "out"
    assert prune_cli(src, out, "--num-experts", "3", "--moe-ffn-hidden-size", "8", "--num-experts-per-tok", "1",
                     "--hidden-size", "40", "--num-layers", "3", "--method", method) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    plan = PrunePlan.load(out)
    t = plan.target
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (3, 1)
    assert "experts_implementation" not in json.loads((out / "config.json").read_text())  # grouped_mm takes 8 and 40
    assert (t.num_experts, t.moe_ffn_hidden_size, t.num_experts_per_tok, t.hidden_size) == (3, 8, 1, 40)
    assert model.model.layers[0].mlp.experts.down_proj.shape == (3, 40, 8)
    assert sum(p.numel() for p in model.parameters()) == t.num_params()
    assert torch.isfinite(model(input_ids=sample_ids()).logits).all()
    s_ck, o_ck = HFCheckpoint.open(src), HFCheckpoint.open(out)
    lp = plan.layers[1]
    for j, e in enumerate(lp.experts):
        want = s_ck.get("expert_down", lp.source_layer, e)[list(plan.hidden)][:, list(lp.expert_ffn[j])]
        assert torch.equal(o_ck.get("expert_down", 1, j), want)
    assert torch.equal(o_ck.get("router", 1),
                       s_ck.get("router", lp.source_layer)[list(lp.experts)][:, list(plan.hidden)])
    if method == "random":  # seeded: the same plan again
        assert prune_cli(src, tmp_path / "again", "--num-experts", "3", "--moe-ffn-hidden-size", "8",
                         "--num-experts-per-tok", "1", "--hidden-size", "40", "--num-layers", "3",
                         "--method", "random") == 0
        assert PrunePlan.load(tmp_path / "again") == plan
    assert prune_cli(src, tmp_path / "replayed", "--plan", str(out / "prune_plan.json")) == 0
    assert safetensors_of(tmp_path / "replayed").keys() == safetensors_of(out).keys()
    for k, v in safetensors_of(out).items():
        assert torch.equal(safetensors_of(tmp_path / "replayed")[k], v), k


@pytest.mark.parametrize("family", MOE)
def test_an_expert_width_grouped_mm_refuses_runs_eagerly_in_transformers(moe_hf, tmp_path, family, capsys):
    """transformers runs experts with torch's grouped_mm, which refuses rows that are not a multiple of 16 bytes (an
    expert width of 15 in float32 or bf16): the output's config asks for its eager experts, so transformers, `eval`
    and a Megatron checkpoint's export all run it."""
    from transformers import AutoModelForCausalLM

    src, out = moe_hf(family), tmp_path / "out"
    assert prune_cli(src, out, "--moe-ffn-hidden-size", "15", "--method", "magnitude") == 0
    assert json.loads((out / "config.json").read_text())["experts_implementation"] == "eager"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config._experts_implementation == "eager"
    assert torch.isfinite(model(input_ids=sample_ids()).logits).all()
    assert main(["convert", "hf-to-megatron", "--input", str(out), "--output", str(tmp_path / "mg"),
                 "--no-progress"]) == 0
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg"), "--output", str(tmp_path / "back"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["experts_implementation"] == "eager"
    torch.testing.assert_close(logits(tmp_path / "back", sample_ids()), logits(out, sample_ids()))


@pytest.mark.parametrize("family", MOE)
def test_never_routed_expert_pruned_first_and_logits_unchanged(moe_tok, tmp_path, family):
    """Activation selection on calibration text: the expert the router never picks has importance 0 and routing
    share 0 and goes first; pruning it leaves the logits as they were (its probability was exactly 0), whole model
    or layer by layer, and eval runs on the output."""
    from megatron.prune.scoring.methods import ScoringOptions, score_model

    src = moe_tok(family)
    opts = dict(samples=4, seq_len=32, progress=False, device="cpu")
    whole = score_model(src, ScoringOptions(**opts, layer_by_layer="never")).scores
    layered = score_model(src, ScoringOptions(**opts, layer_by_layer="always")).scores
    for name in ("experts", "expert_ffn", "routing", "hidden", "heads"):
        assert torch.equal(getattr(whole, name), getattr(layered, name)), name
    assert (whole.experts[:, DEAD] == 0).all() and (whole.routing[:, DEAD] == 0).all()
    assert (whole.experts[:, [e for e in range(4) if e != DEAD]] > 0).all()
    torch.testing.assert_close(whole.routing.sum(1), torch.full((4,), 2.0))  # top-2: two experts per token
    assert (whole.expert_ffn[:, DEAD] == 0).all() and whole.expert_ffn.shape == (4, 4, 16)

    out = tmp_path / "out"
    assert prune_cli(src, out, "--num-experts", "3", "--method", "activation", "--samples", "4",
                     "--seq-len", "32", "--device", "cpu", "--reconstruct", "none") == 0  # the slices alone
    plan = PrunePlan.load(out)
    assert all(lp.experts == (0, 2, 3) for lp in plan.layers)
    ids = sample_ids(vocab=49152)
    torch.testing.assert_close(logits(out, ids), logits(src, ids))
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 3
    for lbl in ("never", "always"):
        assert main(["eval", "--model", str(out), "--max-tokens", "256", "--seq-len", "32", "--device", "cpu",
                     "--layer-by-layer", lbl, "--no-progress"]) == 0


@pytest.mark.parametrize("flags,must_say", [
    (["--num-experts", "5"], "--num-experts 5 is not possible: the source has 4; valid values are 1..4"),
    (["--num-experts", "2", "--num-experts-per-tok", "3"], "--num-experts-per-tok 3"),
    (["--num-experts", "1", "--num-experts-per-tok", "2"], "--num-experts-per-tok 2 is more than the 1 kept "
                                                            "experts; valid: 1..1"),
    (["--moe-ffn-hidden-size", "0"], "--moe-ffn-hidden-size 0 is not possible"),
    (["--ffn-hidden-size", "8"], "has no dense FFN; prune each expert's FFN with --moe-ffn-hidden-size (1..16)"),
    (["--num-experts", "2", "--method", "magnitude", "--reconstruct", "least-squares", "--calib", "x.txt"],
     "has no tokenizer"),
])
def test_bad_moe_flags_refused_before_any_output(moe_hf, tmp_path, capsys, flags, must_say):
    src = moe_hf("mixtral")
    before = tree_hash(src)
    (tmp_path / "x.txt").write_text("some text " * 50)
    flags = [str(tmp_path / f) if f == "x.txt" else f for f in flags]
    assert prune_cli(src, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert must_say in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and tree_hash(src) == before


def test_expert_flags_on_a_dense_model_refused(tiny_hf, tmp_path, capsys):
    assert prune_cli(tiny_hf("llama-gqa"), tmp_path / "out", "--num-experts", "2") == 2
    assert "--num-experts 2: the model is dense (no experts)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_top_k_clamped_to_the_kept_experts_with_one_line(moe_hf, tmp_path, capsys):
    assert prune_cli(moe_hf("qwen3-moe"), tmp_path / "out", "--num-experts", "1", "--method", "random") == 0
    assert "note: top-k clamped to the 1 kept experts: num_experts_per_tok 2 -> 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts_per_tok"] == 1


def test_plan_json_keeps_experts_and_dense_plans_without_them_load(moe_hf):
    shape = HFCheckpoint.open(moe_hf("qwen3-moe")).shape
    target = shape.replace(num_experts=2, moe_ffn_hidden_size=3, num_experts_per_tok=2)
    layers = tuple(LayerPlan(i, (0, 1, 2, 3), tuple(range(8)), (), (1, 3), ((0, 5, 9), (2, 3, 15)))
                   for i in range(4))
    plan = PrunePlan(shape, target, tuple(range(48)), layers).validate()
    assert PrunePlan.from_json(plan.to_json()) == plan
    bad = plan.to_dict()
    bad["layers"][0]["expert_ffn"][1] = [2, 3]
    with pytest.raises(PruneError, match="layer 0 expert 3 ffn: keeps 2 indices but target size is 3"):
        PrunePlan.from_dict(bad)
    dense = PrunePlan.keep_all(shape.replace(num_experts=0, moe_ffn_hidden_size=0, num_experts_per_tok=0,
                                             ffn_hidden_size=8)).to_dict()
    for key in ("num_experts", "moe_ffn_hidden_size", "num_experts_per_tok"):  # as plans were written before
        del dense["source"][key], dense["target"][key]
    assert "experts" not in dense["layers"][0]
    assert PrunePlan.from_dict(dense).source.num_experts == 0


@pytest.mark.parametrize("family", MOE)
def test_seed_prune_config_names_experts_whole_hf_config_or_seed_keys(moe_hf, tmp_path, family):
    """prune_hf/prune_llama.py's JSON: the seed-style keys, or a whole HF config of the smaller MoE model, whose
    intermediate_size is the expert width for Mixtral and describes no layer for Qwen3-MoE."""
    from megatron.prune.seed.prune import prune_config_flags, prune_hf

    src = moe_hf(family)
    source = json.loads((src / "config.json").read_text())
    seed = {"num_experts_remain": 2, "moe_ffn_hidden_size_remain": 8}
    assert prune_config_flags(seed, source)[0] == ["--num-experts", "2", "--moe-ffn-hidden-size", "8"]
    width_key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    whole = {**source, "num_local_experts": 2, width_key: 8, "num_experts_per_tok": 1}
    flags = prune_config_flags(whole, source)[0]
    assert "--ffn-hidden-size" not in flags
    assert {(a, b) for a, b in zip(flags[::2], flags[1::2])} >= {("--num-experts", "2"), ("--moe-ffn-hidden-size",
                                                                 "8"), ("--num-experts-per-tok", "1")}
    (tmp_path / "cfg.json").write_text(json.dumps(whole))
    assert prune_hf(["--model_name_or_path", str(src), "--prune_config_path", str(tmp_path / "cfg.json"),
                     "--output_path", str(tmp_path / "out"), "--no_progress"]) == 0
    assert HFCheckpoint.open(tmp_path / "out").shape == HFCheckpoint.open(src).shape.replace(
        num_experts=2, moe_ffn_hidden_size=8, num_experts_per_tok=1)


def test_plan_show_lists_experts_kept_and_dropped(moe_hf, tmp_path, capsys):
    assert prune_cli(moe_hf("mixtral"), tmp_path / "out", "--num-experts", "2", "--moe-ffn-hidden-size", "4",
                     "--method", "random") == 0
    plan = PrunePlan.load(tmp_path / "out")
    capsys.readouterr()
    assert main(["plan", "show", str(tmp_path / "out"), "--indices"]) == 0
    out = capsys.readouterr().out
    assert "experts 4 -> 2, expert FFN 16 -> 4, top-k 2" in out
    from megatron.prune.commands.plan import ids

    for lp in plan.layers:
        dropped = [e for e in range(4) if e not in lp.experts]
        assert f"experts {ids(lp.experts)} ({ids(dropped)}), 4/16 channels each; expert {lp.experts[0]}: " in out


@pytest.mark.parametrize("family", MOE)
def test_megatron_checkpoint_scores_and_prunes_as_its_hf_model(moe_tok, tmp_path, family, capsys):
    """A TP=2 PP=2 Megatron checkpoint of the model (tokenizer in hf_meta/) scores as its HF model bit for bit, whole
    and layer by layer, and `prune --method activation` picks the same plan and writes the same weights, as does
    `score` then `prune --scores`."""
    from megatron.prune.formats.mcore import ops
    from megatron.prune.scoring.methods import ScoringOptions, score_model

    src = moe_tok(family)
    mg = ops.hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, progress=False)
    opts = dict(samples=4, seq_len=32, progress=False, device="cpu")
    ref = score_model(src, ScoringOptions(**opts, layer_by_layer="never")).scores
    for lbl in ("never", "always"):
        got = score_model(mg, ScoringOptions(**opts, layer_by_layer=lbl)).scores
        for name in ("experts", "expert_ffn", "routing", "hidden", "heads", "groups", "layers"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), (lbl, name)
    flags = ["--num-experts", "3", "--moe-ffn-hidden-size", "8", "--method", "activation", "--samples", "4",
             "--seq-len", "32", "--device", "cpu", "--tp", "2"]  # the HF path selects for the checkpoint's TP too
    assert prune_cli(src, tmp_path / "hf_out", *flags) == 0
    assert prune_cli(mg, tmp_path / "mg_out", *flags) == 0
    plan = PrunePlan.load(tmp_path / "hf_out")
    assert PrunePlan.load(tmp_path / "mg_out") == plan and all(lp.experts == (0, 2, 3) for lp in plan.layers)
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg_out"), "--output",
                 str(tmp_path / "back"), "--no-progress"]) == 0
    a, b = safetensors_of(tmp_path / "hf_out"), safetensors_of(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["score", "--model", str(mg), "--output", str(tmp_path / "s.pt"), *flags[6:-2], "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()  # a line per score the model has: no dense FFN line
    assert [line.split()[0] for line in lines[1:7]] == ["hidden", "heads", "groups", "layers", "experts", "routing"]
    assert prune_cli(src, tmp_path / "scored", *flags[:6], "--scores", str(tmp_path / "s.pt"), "--tp", "2",
                     "--reconstruct", "none") == 0
    assert PrunePlan.load(tmp_path / "scored").layers == plan.layers
