"""The prune plan: JSON round trip and re-application, the RMSNorm rescale it records, and a plan for another model
refused."""

from __future__ import annotations

import math

import pytest

from compare import prune_cli, shape_of
from megatron.prune.cli import main
from megatron.prune.core import plan as plan_mod
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.select import make_plan
from megatron.prune.errors import PruneError
from megatron.prune.scoring import stats
from tiny import make_tiny_model, sample_ids


def test_same_seed_same_bytes_and_plan_reapplies(tiny_hf, tmp_path):
    src = tiny_hf("mistral")
    flags = ["--hidden-size", "40", "--num-attention-heads", "4", "--ffn-hidden-size", "48", "--num-layers", "3",
             "--seed", "7"]
    assert prune_cli(src, tmp_path / "a", *flags) == 0
    assert prune_cli(src, tmp_path / "b", *flags) == 0
    assert prune_cli(src, tmp_path / "c", "--plan", str(tmp_path / "a" / "prune_plan.json")) == 0
    assert prune_cli(src, tmp_path / "d", *flags[:-1], "8") == 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "c" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "d" / "model.safetensors").read_bytes()  # another seed, another choice
    pa = PrunePlan.load(tmp_path / "a")
    assert PrunePlan.from_json(pa.to_json()) == pa
    assert pa == PrunePlan.load(tmp_path / "c")


def test_norm_rescale_records_sqrt_factor_and_can_be_switched_off():
    model = make_tiny_model("llama-gqa")
    shape = shape_of(model)
    scores = stats.collect_scores(model, shape, sample_ids(), progress=False)
    plan = make_plan(shape, shape.replace(hidden_size=32), scores)
    scaled = plan_mod.norm_rescale(plan, "sqrt")
    assert scaled.norm_scale == pytest.approx(math.sqrt(48 / 32)) and scaled.info["norm_rescale"] == "sqrt"
    assert plan_mod.norm_rescale(plan, "none").norm_scale == 1.0
    same_width = make_plan(shape, shape.replace(ffn_hidden_size=32), scores)
    assert plan_mod.norm_rescale(same_width, "sqrt").norm_scale == 1.0
    with pytest.raises(PruneError, match="sqrt, none"):
        plan_mod.norm_rescale(plan, "cube")


def test_plan_for_another_model_refused(tiny_hf, tmp_path, capsys):
    assert main(["prune", "--input", str(tiny_hf("mistral")), "--output", str(tmp_path / "a"), "--num-layers", "2",
                 "--no-progress"]) == 0
    rc = main(["prune", "--input", str(tiny_hf("llama-gqa")), "--output", str(tmp_path / "b"), "--plan",
               str(tmp_path / "a" / "prune_plan.json"), "--no-progress"])
    err = capsys.readouterr().err  # the fields that differ, not two whole shapes
    assert rc == 2 and "was made for another model: " in err and "(the plan's source vs the input)" in err
    assert "ModelShape(" not in err and len(err) < 400, err
    assert not (tmp_path / "b").exists()
