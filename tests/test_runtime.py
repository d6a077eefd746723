"""Running a folder as its HF model: a Megatron checkpoint scores and evaluates as the exported model; folders without
one are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from compare import TOKENIZER_FILES
from megatron.prune.cli import main
from megatron.prune.core.plan import PrunePlan
from megatron.prune.formats.mcore.ops import hf_to_megatron

SMALL = ["--samples", "4", "--seq-len", "32", "--no-progress"]


def test_eval_refuses_folders_without_an_hf_model(tok_model, tmp_path, capsys):
    """A config without weights, a folder that is neither format, and a Megatron checkpoint without a tokenizer in
    hf_meta/ (converted elsewhere) are each refused before transformers' own errors."""
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["eval", "--model", str(bare)]) == 2
    assert f"{bare} is not an HF model folder (no config.json) nor a Megatron checkpoint" in capsys.readouterr().err
    shutil.copy(tok_model / "config.json", bare)
    assert main(["eval", "--model", str(bare)]) == 2
    assert f"{bare}: no weights (*.safetensors or pytorch_model*.bin) beside its config.json" in capsys.readouterr().err
    mg = tmp_path / "mg"
    hf_to_megatron(tok_model, mg, progress=False)
    for name in TOKENIZER_FILES:
        (mg / "hf_meta" / name).unlink(missing_ok=True)
    for argv in (["eval", "--model", str(mg)],
                 ["score", "--model", str(mg), "--output", str(tmp_path / "s.pt"), "--layer-by-layer", "always"]):
        assert main(argv) == 2
        assert f"{mg} has no tokenizer in hf_meta/ (a checkpoint converted elsewhere): export it with " \
               f"`megatron-prune convert megatron-to-hf --input {mg} --output {mg}-hf`" in capsys.readouterr().err
    assert main(["prune", "--input", str(mg), "--output", str(tmp_path / "p"), "--num-layers", "3",
                 "--no-progress"]) == 0
    assert "--method auto: random (the input has no tokenizer" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["tok_model", "qwen3_tok_model"])
def test_a_megatron_checkpoint_is_scored_and_evaluated_as_its_hf_model(model, request, tmp_path, capsys):
    """score and eval on a Megatron checkpoint (TP=2 PP=2 torch, and torch_dist) build the HF model in memory: the
    scores and the perplexity equal those of the HF checkpoint bit for bit, and so do the scores and the perplexity of
    each input taken one decoder layer at a time (short last batches); prune --method auto on it scores
    activations and keeps the same layers and units as on the HF input; a layout error comes before scoring.
    LLaMA and Qwen3 (QK-norm) alike."""
    tok_model = request.getfixturevalue(model)
    hf_to_megatron(tok_model, tmp_path / "mg", tp=2, pp=2, progress=False)
    hf_to_megatron(tok_model, tmp_path / "dist", tp=2, progress=False, ckpt_format="torch_dist")
    ppl, scores = {}, {}
    for name, folder in (("hf", tok_model), ("mg", tmp_path / "mg"), ("dist", tmp_path / "dist")):
        for mode in ("never", "always"):  # the whole model in memory, or one decoder layer at a time
            key = name if mode == "never" else f"{name}-layerwise"
            assert main(["score", "--model", str(folder), "--output", str(tmp_path / f"{key}.pt"),
                         "--layer-by-layer", mode, "--batch-size", "3"] + SMALL) == 0
            scores[key] = torch.load(tmp_path / f"{key}.pt", weights_only=True)
            assert scores[key].pop("meta")["layer_by_layer"] is (mode == "always")
        for mode in ("never", "always"):
            assert main(["eval", "--model", str(folder), "--max-tokens", "320", "--seq-len", "64", "--json",
                         "--batch-size", "2", "--no-progress", "--layer-by-layer", mode]) == 0
            out = capsys.readouterr().out
            ppl[f"{name}-{mode}"] = json.loads(next(l for l in out.splitlines() if l.startswith("{")))["perplexity"]
    assert len(set(ppl.values())) == 1 and len(ppl) == 6, ppl
    want = scores["hf"]
    assert sum(isinstance(v, torch.Tensor) for v in want.values()) == 5  # hidden, heads, groups, ffn, layers
    for name in ("mg", "dist", "hf-layerwise", "mg-layerwise", "dist-layerwise"):
        assert set(scores[name]) == set(want) and all(
            torch.equal(v, scores[name][k]) if isinstance(v, torch.Tensor) else v == scores[name][k]
            for k, v in want.items()), name
    assert main(["prune", "--input", str(tmp_path / "mg"), "--output", str(tmp_path / "p"), "--num-layers", "3",
                 "--no-progress"]) == 2  # refused before the (costly) scoring pass, not after it
    out, err = capsys.readouterr()
    assert "--method auto" not in out and "3 layers, not divisible by the checkpoint's pipeline-parallel size 2" in err
    plans = {}
    for name, folder, extra in (("hf", tok_model, []), ("mg", tmp_path / "dist", ["--prune-type", "unbalance"])):
        out = tmp_path / f"pruned-{name}"
        assert main(["prune", "--input", str(folder), "--output", str(out), "--num-layers", "3", "--hidden-size",
                     "40", "--num-attention-heads", "4", "--num-query-groups", "2", "--ffn-hidden-size", "32"]
                    + extra + SMALL) == 0
        assert "--method auto: activation" in capsys.readouterr().out
        plans[name] = {k: v for k, v in PrunePlan.load(out).to_dict().items() if k != "info"}
    assert [lp["source_layer"] for lp in plans["mg"]["layers"]] == [0, 1, 3]
    assert plans["mg"] == plans["hf"]
