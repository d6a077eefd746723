"""The whole-model refit: sequential calibration on the pruned model's own inputs, one original layer in memory at a
time, the HF path equal to the Megatron path tensor for tensor, and the CLI's refusals before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compare import assert_same_tensors, hf_tensors, prune_cli
from megatron.prune.cli import main
from megatron.prune.core.plan import PrunePlan

SHAPE = ["--hidden-size", "40", "--num-attention-heads", "4", "--ffn-hidden-size", "48", "--num-layers", "2",
         "--samples", "4", "--seq-len", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def refit_pair(tok_model, tmp_path_factory):
    """The tiny model with a tokenizer pruned with activation selection, with and without the refit."""
    d = tmp_path_factory.mktemp("refit")
    assert prune_cli(tok_model, d / "refit", *SHAPE) == 0
    assert prune_cli(tok_model, d / "plain", *SHAPE, "--reconstruct", "none") == 0
    return d


def test_refit_is_the_default_with_activation_and_recorded_in_the_plan(refit_pair):
    plan = PrunePlan.load(refit_pair / "refit")
    info = plan.info["reconstruct"]
    assert info["method"] == "least-squares" and info["samples"] == 4 and info["calib"] == "builtin:calib"
    assert info["error_refit"] < info["error_sliced"]
    plain = PrunePlan.load(refit_pair / "plain")
    assert "reconstruct" not in plain.info and plain == plan  # same selection, only the weights differ
    refit, sliced = hf_tensors(refit_pair / "refit"), hf_tensors(refit_pair / "plain")
    changed = {k for k in refit if not torch.equal(refit[k], sliced[k])}
    roles = {k.split(".")[0] for k in changed}
    assert roles == {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}, roles
    assert not any(k.startswith(("embed", "input_norm", "post_norm", "final_norm")) for k in changed)


def test_refit_lowers_the_calibration_loss(refit_pair, tok_model):
    from megatron.prune.perplexity import perplexity
    from megatron.prune.runtime import load_hf, tokenize
    from megatron.prune.text import builtin_text

    def ppl(folder: Path) -> float:
        model, tok = load_hf(folder)
        return perplexity(model, tokenize(tok, builtin_text("calib"), 2048), 32, progress=False).perplexity

    assert ppl(refit_pair / "refit") < ppl(refit_pair / "plain")


def test_layers_are_refit_on_the_pruned_models_own_inputs(tok_model, tmp_path, monkeypatch):
    """Sequential calibration: the inputs each refit layer saw are the inputs of that layer in the written pruned
    model, run as a stock HF model on the same calibration windows."""
    from transformers import AutoModelForCausalLM

    from megatron.prune.refit import layer as refit_layer_mod
    from megatron.prune.refit import sequential
    from megatron.prune.scoring.methods import calibration_windows
    from megatron.prune.runtime import load_tokenizer, tokenize
    from megatron.prune.text import builtin_text

    seen: list[torch.Tensor] = []
    original = refit_layer_mod.refit_layer

    def record(student, teacher, calls, *args, **kwargs):
        seen.append(torch.cat([c.hidden for c in calls]))
        return original(student, teacher, calls, *args, **kwargs)

    monkeypatch.setattr(sequential, "refit_layer", record)
    assert prune_cli(tok_model, tmp_path / "out", *SHAPE) == 0
    windows = calibration_windows(tokenize(load_tokenizer(tok_model), builtin_text("calib"), None), 4, 32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    inputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: inputs.append(k.get("hidden_states", a[0] if a else None)),
                                             with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        for start in range(0, 4, 2):
            model.model(input_ids=windows[start:start + 2], use_cache=False)
    for h in hooks:
        h.remove()
    per_layer = [torch.cat(inputs[i::2]) for i in range(2)]
    assert len(seen) == 2
    for got, want in zip(seen, per_layer):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_original_layer_in_memory_at_a_time(tok_model, tmp_path, monkeypatch):
    from megatron.prune.scoring import layerwise

    live: set[int] = set()
    peak = [0]
    materialise, release = layerwise.materialise, layerwise.release

    def watch(module, prefix, src, device):
        materialise(module, prefix, src, device)
        if ".layers." in prefix:
            live.add(id(module))
            peak[0] = max(peak[0], len(live))

    def free(module):
        live.discard(id(module))
        release(module)

    monkeypatch.setattr(layerwise, "materialise", watch)
    monkeypatch.setattr(layerwise, "release", free)
    assert prune_cli(tok_model, tmp_path / "out", *SHAPE, "--layer-by-layer", "always") == 0
    assert peak[0] == 1


def test_balanced_megatron_prune_with_refit_equals_the_hf_path(tok_model, tmp_path):
    """Balanced TP=2 selection keeps its per-rank counts; the refit of a row-parallel reader mixes the source's TP
    slices, so that tensor is written from the refitted whole, the others gathered per rank as before."""
    flags = [*SHAPE, "--tp", "2"]
    assert prune_cli(tok_model, tmp_path / "hf_out", *flags) == 0
    assert main(["convert", "hf-to-megatron", "--input", str(tok_model), "--output", str(tmp_path / "mg"), "--tp",
                 "2", "--no-progress"]) == 0
    assert prune_cli(tmp_path / "mg", tmp_path / "mg_out", *SHAPE) == 0  # balance, the checkpoint's TP
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg_out"), "--output",
                 str(tmp_path / "back"), "--no-progress"]) == 0
    assert PrunePlan.load(tmp_path / "mg_out") == PrunePlan.load(tmp_path / "hf_out")
    assert_same_tensors(hf_tensors(tmp_path / "hf_out"), hf_tensors(tmp_path / "back"))


@pytest.mark.parametrize("layout", [("--tp", "2", "--pp", "2"), ("--tp", "2", "--ckpt-format", "torch_dist")])
def test_megatron_path_equals_the_hf_path(tok_model, refit_pair, tmp_path, layout):
    """The same plan and calibration on the Megatron checkpoint of the model (unbalanced: the output TP differs from
    the plan's TP-free selection) gives, exported, the HF path's tensors; the refit reads the Megatron view."""
    tp_pp = [x for x in layout if x != "--ckpt-format" and x != "torch_dist"]
    fmt = ["--ckpt-format", "torch_dist"] if "torch_dist" in layout else []
    assert main(["convert", "hf-to-megatron", "--input", str(tok_model), "--output", str(tmp_path / "mg"), *tp_pp,
                 *fmt, "--no-progress"]) == 0
    assert main(["prune", "--input", str(tmp_path / "mg"), "--output", str(tmp_path / "mg_out"), "--plan",
                 str(refit_pair / "refit" / "prune_plan.json"), "--prune-type", "unbalance", "--reconstruct",
                 "least-squares", "--samples", "4", "--seq-len", "32", "--batch-size", "2", "--no-progress"]) == 0
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg_out"), "--output",
                 str(tmp_path / "back"), "--no-progress"]) == 0
    assert_same_tensors(hf_tensors(refit_pair / "refit"), hf_tensors(tmp_path / "back"))


@pytest.mark.parametrize("argv,message", [
    (["--method", "magnitude", "--reconstruct", "least-squares"], "--reconstruct least-squares with --method "
                                                                  "magnitude: the refit needs calibration text"),
    (["--reconstruct", "least-squares", "--damping", "0"], "--damping 0.0: must be > 0"),
    (["--samples", "4000"], "fewer than --samples 4000"),
])
def test_refusals_come_before_anything_is_written(tok_model, tmp_path, capsys, argv, message):
    code = main(["prune", "--input", str(tok_model), "--output", str(tmp_path / "out"), "--hidden-size", "40",
                 "--no-progress", *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_model_without_a_tokenizer_is_refused(tiny_hf, tmp_path, capsys):
    code = main(["prune", "--input", str(tiny_hf()), "--output", str(tmp_path / "out"), "--hidden-size", "40",
                 "--method", "random", "--reconstruct", "least-squares", "--calib", __file__, "--no-progress"])
    assert code == 2 and "has no tokenizer" in capsys.readouterr().err
