"""The scoring methods through the CLI: score then prune, the auto rule, calibration windows, refusals."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron.prune.cli import main
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.shape import ModelShape
from megatron.prune.errors import PruneError
from megatron.prune.scoring import methods, stats
from megatron.prune.scoring.methods import load_scores

SMALL = ["--samples", "4", "--seq-len", "32", "--no-progress"]


def test_calibration_windows_spread_and_errors():
    ids = torch.arange(100)
    w = methods.calibration_windows(ids, 3, 10)
    assert w[:, 0].tolist() == [0, 40, 90] and w.shape == (3, 10)
    with pytest.raises(PruneError, match="at most 10"):
        methods.calibration_windows(ids, 11, 10)
    with pytest.raises(PruneError, match="mean-l2"):
        stats.aggregator("median")


def test_score_then_prune_with_scores_and_auto_layers(tok_model, calib_file, tmp_path, capsys):
    scores = tmp_path / "scores.pt"
    assert main(["score", "--model", str(tok_model), "--output", str(scores), "--calib", str(calib_file)] + SMALL) == 0
    out = capsys.readouterr().out
    assert "scored 128 tokens" in out and "first dropped): layers 2" in out
    meta = torch.load(scores, weights_only=True)["meta"]
    assert meta["tokens"] == 128 and meta["aggregation"] == "rms"

    pruned = tmp_path / "pruned"
    assert main(["prune", "--input", str(tok_model), "--output", str(pruned), "--method", "activation",
                 "--scores", str(scores), "--drop-layers", "auto", "--num-layers", "3", "--hidden-size", "40",
                 "--no-progress"]) == 0
    plan = PrunePlan.load(pruned)
    assert [lp.source_layer for lp in plan.layers] == [0, 1, 3]
    assert plan.info["method"] == "activation" and plan.info["layer_rule"] == "block-influence"
    assert plan.norm_scale == pytest.approx(math.sqrt(48 / 40)) and plan.info["norm_rescale"] == "sqrt"
    src, dst = load_file(tok_model / "model.safetensors"), load_file(pruned / "model.safetensors")
    kept = torch.tensor(plan.hidden)
    torch.testing.assert_close(dst["model.layers.2.input_layernorm.weight"],
                               src["model.layers.3.input_layernorm.weight"][kept] * plan.norm_scale)
    # kept hidden channels are the top-40 of the saved scores
    hidden = load_scores(scores, ModelShape.from_dict(meta["shape"])).hidden
    assert set(plan.hidden) == set(torch.argsort(-hidden, stable=True)[:40].tolist())

    # scoring on the fly with the same calibration settings gives the same plan
    again = tmp_path / "again"
    assert main(["prune", "--input", str(tok_model), "--output", str(again), "--method", "activation",
                 "--calib", str(calib_file), "--drop-layers", "auto", "--num-layers", "3", "--hidden-size", "40"]
                + SMALL) == 0
    assert PrunePlan.load(again) == plan


def test_norm_rescale_off(tok_model, tmp_path):
    out = tmp_path / "p"
    assert main(["prune", "--input", str(tok_model), "--output", str(out), "--method", "magnitude",
                 "--hidden-size", "40", "--norm-rescale", "none", "--no-progress"]) == 0
    assert PrunePlan.load(out).norm_scale == 1.0


def test_gqa_drop_groups_flag(tok_model, tmp_path):
    out = tmp_path / "p"
    assert main(["prune", "--input", str(tok_model), "--output", str(out), "--method", "magnitude",
                 "--num-attention-heads", "4", "--gqa", "drop-groups", "--no-progress"]) == 0
    t = PrunePlan.load(out).target
    assert (t.num_attention_heads, t.num_query_groups) == (4, 2)


@pytest.mark.parametrize("argv, message", [
    (["prune", "--method", "activation", "--drop-layers", "auto"], "needs --num-layers"),
    (["prune", "--method", "random", "--drop-layers", "auto", "--num-layers", "3"], "use --method activation"),
    (["score", "--samples", "100000"], "fewer than --samples 100000"),
])
def test_bad_input_is_refused_before_writing(tok_model, tmp_path, capsys, argv, message):
    out = tmp_path / ("out.pt" if argv[0] == "score" else "out")
    flag = "--model" if argv[0] == "score" else "--input"
    assert main(argv[:1] + [flag, str(tok_model), "--output", str(out), "--no-progress"] + argv[1:]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_scores_of_another_model_and_existing_output_are_refused(tok_model, tiny_hf, tmp_path, capsys):
    scores = tmp_path / "s.pt"
    assert main(["score", "--model", str(tok_model), "--output", str(scores)] + SMALL) == 0
    assert main(["score", "--model", str(tok_model), "--output", str(scores)] + SMALL) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prune", "--input", str(tiny_hf("mistral")), "--output", str(tmp_path / "o"), "--method",
                 "activation", "--scores", str(scores), "--no-progress"]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["prune", "--input", str(tiny_hf("mistral")), "--output", str(tmp_path / "o"), "--method",
                 "activation", "--no-progress"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


@pytest.mark.slow
def test_activation_beats_random_on_the_real_model(real_model, tmp_path):
    from megatron.prune.perplexity import perplexity
    from megatron.prune.runtime import load_hf, tokenize
    from megatron.prune.text import builtin_text

    shape = ["--hidden-size", "468", "--ffn-hidden-size", "1024", "--no-progress"]
    ppl = {}
    for method, extra in (("activation", ["--samples", "8", "--seq-len", "128"]), ("random", ["--seed", "1"])):
        out = tmp_path / method
        assert main(["prune", "--input", str(real_model), "--output", str(out), "--method", method]
                    + shape + extra) == 0
        model, tok = load_hf(out)
        ids = tokenize(tok, builtin_text("eval"), 2048)
        ppl[method] = perplexity(model, ids, seq_len=512, progress=False).perplexity
        del model
        shutil.rmtree(out)
    assert ppl["activation"] <= 0.3 * ppl["random"], ppl


def test_method_auto_is_activation_where_it_can_score(tok_model, tiny_hf, tmp_path, capsys):
    assert main(["prune", "--input", str(tok_model), "--output", str(tmp_path / "a"), "--num-layers", "3"]
                + SMALL) == 0
    assert "--method auto: activation" in capsys.readouterr().out
    plan = PrunePlan.load(tmp_path / "a")
    assert plan.info["method"] == "activation" and [lp.source_layer for lp in plan.layers] == [0, 1, 3]
    assert main(["prune", "--input", str(tiny_hf("mistral")), "--output", str(tmp_path / "b"), "--num-layers", "3",
                 "--no-progress"]) == 0
    assert "falling back to random" in capsys.readouterr().out
    assert PrunePlan.load(tmp_path / "b").info["method"] == "random"
