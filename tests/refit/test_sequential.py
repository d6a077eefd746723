"""The whole-model refit: sequential calibration on the pruned model's own inputs, one original layer in memory at a
time, the HF path equal to the Megatron path tensor for tensor, and the CLI's refusals before anything is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from compare import assert_same_tensors, calib_loss, hf_tensors, prune_cli
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


def test_refit_is_the_default_with_activation_and_recorded_in_the_plan(refit_pair, tok_model):
    plan = PrunePlan.load(refit_pair / "refit")
    info = plan.info["reconstruct"]
    assert info["method"] == "least-squares" and info["samples"] == 4 and info["calib"] == "builtin:calib"
    assert info["error_refit"] < info["error_sliced"]
    loss = info["calibration_loss"]  # what the original and the written pruned model give on the calibration windows
    assert loss["original"] == pytest.approx(calib_loss(tok_model), abs=2e-5)
    assert loss["pruned_refit"] == pytest.approx(calib_loss(refit_pair / "refit"), abs=2e-5)
    plain = PrunePlan.load(refit_pair / "plain")
    assert "reconstruct" not in plain.info and plain == plan  # same selection, only the weights differ
    refit, sliced = hf_tensors(refit_pair / "refit"), hf_tensors(refit_pair / "plain")
    changed = {k for k in refit if not torch.equal(refit[k], sliced[k])}
    roles = {k.split(".")[0] for k in changed}
    assert roles == {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}, roles
    assert not any(k.startswith(("embed", "input_norm", "post_norm", "final_norm")) for k in changed)


@pytest.fixture(scope="module")
def tied_tok_model(real_model, tmp_path_factory):
    """A tiny random LLaMA with tied embeddings and the real model's tokenizer."""
    import shutil

    from compare import TOKENIZER_FILES
    from tiny import make_tiny_model

    folder = tmp_path_factory.mktemp("tied") / "model"
    make_tiny_model("llama-tied", vocab_size=49152).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (real_model / name).is_file():
            shutil.copy(real_model / name, folder / name)
    return folder


def test_a_tied_head_refits_the_final_norm_gain_on_both_paths(tied_tok_model, tmp_path):
    """With tied embeddings the head is the embedding, so the refit fits the final norm's gain instead (its logit
    error falls, the calibration loss too); the Megatron path (TP=2, PP=2) writes the same tensors."""
    shape = ["--hidden-size", "36", "--num-attention-heads", "4", "--num-query-groups", "2", "--ffn-hidden-size", "48",
             *SHAPE[6:]]
    assert prune_cli(tied_tok_model, tmp_path / "refit", *shape) == 0
    assert prune_cli(tied_tok_model, tmp_path / "plain", *shape, "--reconstruct", "none") == 0
    head = PrunePlan.load(tmp_path / "refit").info["reconstruct"]["head_refit"]
    assert head["role"] == "final_norm" and head["error_refit"] < head["error_sliced"]
    refit, plain = hf_tensors(tmp_path / "refit"), hf_tensors(tmp_path / "plain")
    assert not torch.equal(refit["final_norm.None"], plain["final_norm.None"])
    assert torch.equal(refit["embed.None"], plain["embed.None"]) and not any(k.startswith("lm_head") for k in refit)
    assert _calib_ppl(tmp_path / "refit") < _calib_ppl(tmp_path / "plain")
    assert main(["convert", "hf-to-megatron", "--input", str(tied_tok_model), "--output", str(tmp_path / "mg"),
                 "--tp", "2", "--pp", "2", "--no-progress"]) == 0
    assert main(["prune", "--input", str(tmp_path / "mg"), "--output", str(tmp_path / "mg_out"), "--plan",
                 str(tmp_path / "refit" / "prune_plan.json"), "--prune-type", "unbalance", *SHAPE[8:],
                 "--no-progress"]) == 0
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg_out"), "--output",
                 str(tmp_path / "back"), "--no-progress"]) == 0
    assert_same_tensors(refit, hf_tensors(tmp_path / "back"))


@pytest.mark.parametrize("tied", [False, True])
def test_refit_in_row_blocks_equals_the_whole_solve(refit_pair, tok_model, tied_tok_model, tmp_path, monkeypatch,
                                                     tied):
    """Every refit solves (and scores) its output rows a block at a time against one factorisation, and the output
    head (untied) or its Gram matrix (tied) is read a block of vocabulary rows at a time, so neither a 70B layer's
    gate_up nor a 128k x 8k head is ever whole in float64: ragged blocks of 13 rows give what one block gives."""
    from megatron.prune.refit import solve

    shape = SHAPE if not tied else ["--hidden-size", "36", "--num-attention-heads", "4", "--num-query-groups", "2",
                                    "--ffn-hidden-size", "48", *SHAPE[6:]]
    model = tied_tok_model if tied else tok_model
    whole = refit_pair / "refit" if not tied else tmp_path / "whole"
    if tied:
        assert prune_cli(model, whole, *shape) == 0
    monkeypatch.setattr(solve, "ROW_BLOCK", 13)
    assert prune_cli(model, tmp_path / "blocks", *shape) == 0
    a, b = hf_tensors(whole), hf_tensors(tmp_path / "blocks")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    info = [PrunePlan.load(f).info["reconstruct"] for f in (whole, tmp_path / "blocks")]
    assert info[0]["head_refit"]["error_refit"] == pytest.approx(info[1]["head_refit"]["error_refit"], rel=1e-5)
    assert info[0]["error_refit"] == pytest.approx(info[1]["error_refit"], rel=1e-5)


def _calib_ppl(folder: Path) -> float:
    from megatron.prune.perplexity import perplexity
    from megatron.prune.runtime import load_hf, tokenize
    from megatron.prune.text import builtin_text

    model, tok = load_hf(folder)
    return perplexity(model, tokenize(tok, builtin_text("calib"), 2048), 32, progress=False).perplexity


def test_refit_lowers_the_calibration_loss(refit_pair, tok_model):
    assert _calib_ppl(refit_pair / "refit") < _calib_ppl(refit_pair / "plain")


def test_layers_are_refit_on_the_pruned_models_own_inputs(tok_model, tmp_path, monkeypatch):
    """Sequential calibration: the inputs each refit layer saw are the inputs of that layer in the written pruned
    model, run as a stock HF model on the same calibration windows."""
    from transformers import AutoModelForCausalLM

    from megatron.prune.refit import layer as refit_layer_mod
    from megatron.prune.refit import sequential
    from megatron.prune.runtime import load_tokenizer, tokenize
    from megatron.prune.scoring.methods import calibration_windows
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


def test_a_plan_replays_the_refit_it_records(refit_pair, tok_model, calib_file, tmp_path, capsys):
    """--plan refits with the calibration and refit settings the plan records where a flag is not typed, so it gives
    the weights that run wrote bit for bit (it refit on the defaults: other weights); a typed flag wins; a selection
    flag beside --plan, or a recorded --calib file that is gone, is refused before anything is written."""
    import shutil

    plan = refit_pair / "refit" / "prune_plan.json"
    out = tmp_path / "again"
    capsys.readouterr()
    assert main(["prune", "--input", str(tok_model), "--output", str(out), "--plan", str(plan), "--no-progress"]) == 0
    assert ("--plan: refit as the plan records it: --samples 4, --seq-len 32, --batch-size 2, --dtype float32, "
            "--damping 0.01\n") in capsys.readouterr().out
    assert_same_tensors(hf_tensors(refit_pair / "refit"), hf_tensors(out))
    assert main(["prune", "--input", str(tok_model), "--output", str(tmp_path / "more"), "--plan", str(plan),
                 "--samples", "8", "--no-progress"]) == 0
    assert "--plan: refit as the plan records it: --seq-len 32, --batch-size 2," in capsys.readouterr().out
    assert PrunePlan.load(tmp_path / "more").info["reconstruct"]["samples"] == 8
    assert hf_tensors(tmp_path / "more")["down.0"].ne(hf_tensors(out)["down.0"]).any()
    for flags, says in ((["--method", "random"], "--method random: --plan fixes the kept units"),
                        (["--scores", str(plan)], f"--scores {plan}: --plan fixes the kept units")):
        assert main(["prune", "--input", str(tok_model), "--output", str(tmp_path / "no"), "--plan", str(plan),
                     *flags, "--no-progress"]) == 2
        assert says in capsys.readouterr().err
    text = tmp_path / "calib.jsonl"
    shutil.copy(calib_file, text)
    assert prune_cli(tok_model, tmp_path / "own", *SHAPE, "--calib", str(text)) == 0
    text.unlink()
    assert main(["prune", "--input", str(tok_model), "--output", str(tmp_path / "no"), "--plan",
                 str(tmp_path / "own" / "prune_plan.json"), "--no-progress"]) == 2
    assert f"was refit on --calib {text}, and {text} is not here: pass --calib" in capsys.readouterr().err
    assert not (tmp_path / "no").exists() and not list(tmp_path.glob(".no.partial-*"))


@pytest.mark.parametrize("argv,message", [
    (["--method", "magnitude", "--reconstruct", "least-squares"], ("--reconstruct least-squares with --method "
                                                                   "magnitude: the refit needs calibration text")),
    (["--reconstruct", "least-squares", "--damping", "0"], "--damping 0.0: must be > 0"),
    (["--samples", "4000"], "fewer than --samples 4000"),
    (["--samples", "1", "--seq-len", "32"], ("--samples 1 x --seq-len 32 = 32 calibration tokens: the refit of a "
                                             "64-wide input needs at least 64 tokens (e.g. --samples 2)")),
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


def test_qwen3_refit_leaves_qk_norms_whole_and_megatron_path_equals_hf_path(qwen3_tok_model, tmp_path):
    """Qwen3: the refit runs the stock Qwen3 layers (QK-norm inside attention), refits the same linears as for
    LLaMA and lowers the error; q_norm/k_norm read no pruned axis and pass through the writers untouched; the
    balanced TP=2 Megatron path gives the HF path's tensors."""
    from megatron.prune.formats.hf import HFCheckpoint

    flags = [*SHAPE, "--tp", "2"]
    assert prune_cli(qwen3_tok_model, tmp_path / "refit", *flags) == 0
    assert prune_cli(qwen3_tok_model, tmp_path / "plain", *flags, "--reconstruct", "none") == 0
    info = PrunePlan.load(tmp_path / "refit").info["reconstruct"]
    assert info["error_refit"] < info["error_sliced"]
    refit, sliced = hf_tensors(tmp_path / "refit"), hf_tensors(tmp_path / "plain")
    changed = {k.split(".")[0] for k in refit if not torch.equal(refit[k], sliced[k])}
    assert changed == {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}, changed
    src, plan = HFCheckpoint.open(qwen3_tok_model), PrunePlan.load(tmp_path / "refit")
    for i, lp in enumerate(plan.layers):
        for role in ("q_norm", "k_norm"):
            assert torch.equal(refit[f"{role}.{i}"], src.get(role, lp.source_layer))
    assert main(["convert", "hf-to-megatron", "--input", str(qwen3_tok_model), "--output", str(tmp_path / "mg"),
                 "--tp", "2", "--no-progress"]) == 0
    assert prune_cli(tmp_path / "mg", tmp_path / "mg_out", *SHAPE) == 0  # balance, the checkpoint's TP
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg_out"), "--output",
                 str(tmp_path / "back"), "--no-progress"]) == 0
    assert PrunePlan.load(tmp_path / "mg_out") == plan
    assert_same_tensors(refit, hf_tensors(tmp_path / "back"))


def test_calibration_loss_reads_whole_windows_up_to_its_token_budget():
    """The reported loss is the mean over the first windows holding at least ``max_tokens`` predictions, exactly."""
    from megatron.prune.refit.sequential import calibration_loss

    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 11, (6, 9), generator=g)
    hidden = [torch.randn(2, 9, 5, generator=g) for _ in range(3)]  # batches of 2 windows
    head = torch.randn(11, 5, generator=g)
    logits = torch.cat(hidden)[:, :-1] @ head.T
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    per_token = per_token.view(6, 8)
    for budget, rows in ((8, 1), (9, 2), (24, 3), (1000, 6)):
        loss, tokens = calibration_loss(torch.nn.Identity(), head, hidden, windows, 2, budget)
        assert tokens == rows * 8
        assert loss == pytest.approx(float(per_token[:rows].mean()), rel=1e-6)


def test_a_keep_all_plan_with_the_refit_writes_the_input_bit_for_bit(tok_model, tmp_path):
    """Nothing pruned, refit asked for explicitly: the output tensors are the input's, bit for bit (no refit runs);
    so is a saved keep-all plan applied with --reconstruct least-squares."""
    assert prune_cli(tok_model, tmp_path / "same", "--samples", "4", "--seq-len", "32", "--reconstruct",
                     "least-squares") == 0
    assert_same_tensors(hf_tensors(tok_model), hf_tensors(tmp_path / "same"))
    assert prune_cli(tok_model, tmp_path / "again", "--plan", str(tmp_path / "same" / "prune_plan.json"),
                     "--samples", "4", "--seq-len", "32", "--reconstruct", "least-squares") == 0
    assert_same_tensors(hf_tensors(tok_model), hf_tensors(tmp_path / "again"))


PER_LAYER = ["--num-attention-heads", "4", "--num-query-groups", "2", "--ffn-hidden-size", "48", "--tp", "2",
             "--samples", "4", "--seq-len", "32", "--batch-size", "2"]


def test_per_layer_pruning_selects_inside_the_refit_as_score_then_prune_would(tok_model, tmp_path, monkeypatch,
                                                                              capsys):
    """Heads, groups and FFN channels only (hidden and layers kept): the refit's own run of each original layer gives
    the activation statistics, so no scoring pass runs, and the plan and every tensor equal those of `score` then
    `prune --scores` (TP-balanced over 2 slices)."""
    from megatron.prune.scoring import methods

    assert main(["score", "--model", str(tok_model), "--output", str(tmp_path / "scores.pt"), "--no-progress",
                 *PER_LAYER[8:]]) == 0
    assert prune_cli(tok_model, tmp_path / "scored", *PER_LAYER, "--scores", str(tmp_path / "scores.pt")) == 0

    def no_scoring_pass(*args, **kwargs):
        raise AssertionError("a separate scoring pass ran")

    monkeypatch.setattr(methods, "score_model", no_scoring_pass)
    assert prune_cli(tok_model, tmp_path / "fused", *PER_LAYER) == 0
    fused, scored = (PrunePlan.load(tmp_path / d / "prune_plan.json") for d in ("fused", "scored"))
    assert fused.layers == scored.layers
    assert fused.info["selection"].startswith("in the refit")
    assert fused.info["method"] == scored.info["method"] == "activation"
    assert main(["plan", "show", str(tmp_path / "fused")]) == 0
    assert "scored in the refit's pass" in capsys.readouterr().out
    assert any(lp.ffn != tuple(range(48)) for lp in fused.layers)  # chosen, not the placeholder's first units
    assert_same_tensors(hf_tensors(tmp_path / "fused"), hf_tensors(tmp_path / "scored"))
    # the Megatron TP=2 checkpoint (balanced over its own TP) chooses and refits the same, read through its HF view
    assert main(["convert", "hf-to-megatron", "--input", str(tok_model), "--output", str(tmp_path / "mg"), "--tp",
                 "2", "--no-progress"]) == 0
    assert prune_cli(tmp_path / "mg", tmp_path / "mg_out", *PER_LAYER[:6], *PER_LAYER[8:]) == 0
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg_out"), "--output",
                 str(tmp_path / "back"), "--no-progress"]) == 0
    assert PrunePlan.load(tmp_path / "mg_out").layers == fused.layers
    assert_same_tensors(hf_tensors(tmp_path / "fused"), hf_tensors(tmp_path / "back"))


def test_refit_options_outside_their_choices_are_refused(tok_model):
    """The refit's groups, head and depth (API choices; the CLI sets them) are checked with the rest, by name."""
    from megatron.prune.errors import PruneError
    from megatron.prune.formats.hf import HFCheckpoint
    from megatron.prune.refit.run import check_reconstruct
    from megatron.prune.refit.sequential import RefitOptions
    from megatron.prune.scoring.methods import ScoringOptions

    src = HFCheckpoint.open(tok_model)
    for options, says in ((RefitOptions(groups=("qkv", "x")), "refit groups ['x']"),
                          (RefitOptions(head="y"), "head 'y'"), (RefitOptions(depth="z"), "depth 'z'")):
        with pytest.raises(PruneError, match=re.escape(says) + ".*the depth from residual, none"):
            check_reconstruct(src, "least-squares", "activation", None, options, src.shape, ScoringOptions())
    check_reconstruct(src, "least-squares", "activation", None, RefitOptions(), src.shape, ScoringOptions())
