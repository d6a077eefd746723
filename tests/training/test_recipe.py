"""Recovery runs end to end on the stock loop (CPU): training, resume, TP/PP, distillation, data and tokenizers."""

from __future__ import annotations

import json
import re

import pytest
import torch

from megatron.prune.training import checkpoints
from tests.training.recovery_harness import case_result, model_tensors, ok, parse_losses, same_tensors

pytestmark = pytest.mark.slow  # every test here reads the results of the session's training runs


@pytest.mark.parametrize("tp", [1, 2])
def test_pruned_checkpoint_trains_and_resume_matches_continuous_run(runs, tp):
    full, resumed = ok(runs[f"tp{tp}"]), ok(runs[f"tp{tp}_resumed"])
    losses, after = parse_losses(full.stdout), parse_losses(resumed.stdout)
    assert sorted(losses) == list(range(1, 11)), losses
    assert float(losses[10]) < float(losses[1]) - 0.3, losses
    assert sorted(after) == list(range(6, 11)), after
    norms = parse_losses(full.stdout, "grad norm")
    assert parse_losses(resumed.stdout, "grad norm") == {i: norms[i] for i in range(6, 11)}
    assert {i: after[i] for i in (6, 8, 9, 10)} == {i: losses[i] for i in (6, 8, 9, 10)}
    # stock-loop logging quirk: a process's 2nd logged iteration prints the mean of its first two
    assert float(after[7]) == pytest.approx((float(losses[6]) + float(losses[7])) / 2, abs=2e-6)


def test_tensorboard_dir_gets_the_logged_losses(runs, inputs):
    """--tensorboard-dir writes each iteration's LM loss. At --log-interval 1 the stock log line for iteration 2
    is the mean of iterations 1 and 2 (megatron-core 0.19.2 prints iteration 1 alone, then counts it again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    printed = {k: float(v) for k, v in parse_losses(ok(runs["tp1"]).stdout).items()}
    events = EventAccumulator(str(inputs["dir"] / "tb1"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("lm loss")}
    assert sorted(tb) == sorted(printed) == list(range(1, 11))
    tb[2] = (tb[1] + tb[2]) / 2
    assert tb == pytest.approx(printed, rel=1e-6)
    tags = set(events.Tags()["scalars"])
    assert {"grad-norm", "learning-rate"} <= tags and "kd loss" not in tags  # no teacher in this run


def test_pruned_checkpoint_is_the_same_model_at_tp1_and_tp2(runs):
    """One plan, TP=1 and TP=2 shards: the same first loss; and far above a fresh init's ln(V), so the
    pruned weights (large, random) were loaded rather than initialised."""
    one, two = (float(parse_losses(ok(runs[k]).stdout)[1]) for k in ("tp1", "tp2"))
    assert one == pytest.approx(two, abs=1e-4)
    assert one > torch.log(torch.tensor(384.0)).item() + 1.0, one


def test_resumed_weights_equal_continuous_weights_torch_format(runs, inputs):
    ok(runs["tp1_resumed"])
    d = inputs["dir"]
    assert same_tensors(model_tensors(d / "s1" / "iter_0000010"), model_tensors(d / "s1_resumed" / "iter_0000010"))
    state = torch.load(d / "s1" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert state["args"].num_layers == 3 and state["args"].hidden_size == 40 and state["iteration"] == 10
    assert (d / "s1" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert (d / "s2" / "iter_0000010" / "metadata.json").is_file()  # TP=2 run saved torch_dist


def test_converted_tp1_checkpoint_loads_with_finetune(runs, inputs):
    """hf_to_megatron's TP=1 checkpoint, --use-checkpoint-args --finetune, LR 0: the loop saves it back
    unchanged (so the stock loader filled every tensor)."""
    ok(runs["driver"])
    case = next(c for c in runs["cases"] if c["name"] == "converted_tp1")
    r = ok(case_result(case))
    assert sorted(parse_losses(r.stdout)) == [1, 2]
    conv, out = inputs["conv"][1], inputs["dir"] / "conv_tp1_out"
    assert same_tensors(model_tensors(next(conv.glob("iter_*")) if not (conv / "release").is_dir()
                                      else conv / "release"), model_tensors(out / "iter_0000002"))
    # hf_meta (HF config) travelled from LOAD to SAVE, so the export has the source's exact config
    from megatron.prune.formats.mcore.ops import megatron_to_hf

    assert (out / "hf_meta" / "config.json").read_text() == (conv / "hf_meta" / "config.json").read_text()
    back = megatron_to_hf(out, inputs["dir"] / "conv_tp1_back", progress=False)
    assert json.loads((back / "config.json").read_text())["rms_norm_eps"] == 1e-5


def test_sentencepiece_tokenizer_trains(runs):
    """A SentencePiece .model (LLaMA-2 style; check_model.sh picks SentencePieceTokenizer for it): data made
    with it passes the token-id check against the SentencePiece vocabulary and trains."""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "spm")))
    assert sorted(parse_losses(r.stdout)) == [1] and 4.0 < float(parse_losses(r.stdout)[1]) < 8.0


def test_never_trained_checkpoint_starts_without_finetune(runs, inputs):
    """LOAD == SAVE on a converted checkpoint (check_model.sh then omits --finetune): it starts as with --finetune,
    the same model (the converted run's first loss), instead of the stock loop stopping for missing optimizer
    state. A checkpoint with training state is resumed as before."""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "in_place")))
    first = ok(case_result(next(c for c in runs["cases"] if c["name"] == "converted_tp1")))
    assert "has never been trained (iteration 0, no optimizer state): starting it as with --finetune" in r.stdout
    assert parse_losses(r.stdout) == {1: parse_losses(first.stdout)[1]}
    assert (inputs["dir"] / "in_place" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert checkpoints.never_trained({"iteration": 0, "args": None})
    assert not checkpoints.never_trained({"iteration": 0, "args": None, "optimizer": {}})  # saved at iteration 0
    assert not checkpoints.never_trained({"iteration": 5, "args": None})  # trained, saved with --no-save-optim


def test_kd_teacher_equal_to_student_gives_zero_kd_loss_and_gradient_at_tp2(runs, inputs):
    r = ok(runs["kd"])
    kd_losses, norms = parse_losses(r.stdout, "kd loss"), parse_losses(r.stdout, "grad norm")
    assert sorted(kd_losses) == [1, 2] and all(float(v) == 0.0 for v in kd_losses.values()), kd_losses
    assert all(float(v) == 0.0 for v in norms.values()), norms
    assert float(parse_losses(r.stdout)[1]) > 6.0  # the LM loss is still reported (and not zero)
    valid = re.search(r"validation loss at iteration 2 \| lm loss value: ([0-9.E+\-]+) \| .*"
                      r"\| kd loss value: ([0-9.E+\-]+) \|", r.stdout)
    assert valid and float(valid.group(1)) > 6.0 and float(valid.group(2)) == 0.0, r.stdout[-3000:]
    conv = inputs["conv"][2]
    src = next(conv.glob("iter_*")) if not (conv / "release").is_dir() else conv / "release"
    assert same_tensors(model_tensors(src), model_tensors(inputs["dir"] / "kd_out" / "iter_0000002"))


def test_bf16_kd_run_as_on_a_gpu(runs, inputs):
    """--bf16 (the GPU default) with a teacher == student, alpha 1: the KD loss and its gradient are 0, the LM
    loss is the fp32 run's to bf16 precision, the saved weights are the checkpoint's in bf16, and export says bf16."""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "kd_bf16")))
    fp32 = ok(case_result(next(c for c in runs["cases"] if c["name"] == "converted_tp1")))
    assert {k: float(v) for k, v in parse_losses(r.stdout, "kd loss").items()} == {1: 0.0, 2: 0.0}
    assert all(float(v) == 0.0 for v in parse_losses(r.stdout, "grad norm").values())
    bf16_loss, fp32_loss = float(parse_losses(r.stdout)[1]), float(parse_losses(fp32.stdout)[1])
    assert bf16_loss != fp32_loss and bf16_loss == pytest.approx(fp32_loss, rel=1e-2)
    conv = inputs["conv"][1]
    src = model_tensors(next(conv.glob("iter_*")) if not (conv / "release").is_dir() else conv / "release")
    saved = model_tensors(inputs["dir"] / "kd_bf16_out" / "iter_0000002")
    assert all(saved[k].dtype == torch.bfloat16 for k in saved)
    assert same_tensors({k: v.to(torch.bfloat16) for k, v in src.items()}, saved)
    # exported as bf16, and its config says so (the source's says float32): transformers loads what was written
    from megatron.prune.formats.mcore.ops import megatron_to_hf

    assert json.loads((conv / "hf_meta" / "config.json").read_text())["dtype"] == "float32"
    back = megatron_to_hf(inputs["dir"] / "kd_bf16_out", inputs["dir"] / "kd_bf16_hf", progress=False)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


def test_vocabulary_pruned_student_distils_from_the_teacher_given_its_vocabulary(runs, inputs):
    """The unpruned teacher pads to the student's size yet numbers tokens otherwise: refused (above). Given the
    student's vocabulary with `vocab prune --like`, it is the same model as the student (both are the source with
    the same rows kept, one pruned as HF, the other as Megatron): the KD loss is exactly 0. The student was moved
    after conversion: with check_model.sh's --no-use-tokenizer-model-from-checkpoint-args it trains all the same."""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "kd_vocab_like")))
    assert {k: float(v) for k, v in parse_losses(r.stdout, "kd loss").items()} == {1: 0.0}
    vp = inputs["vocab_pruned"]
    assert checkpoints.checkpoint_args(
        checkpoints.find_checkpoint(vp["teacher_full"], "teacher")).padded_vocab_size == \
        checkpoints.checkpoint_args(checkpoints.find_checkpoint(vp["mg"], "student")).padded_vocab_size == 384


def test_tied_checkpoint_at_pp2_is_the_same_model_as_at_pp1(runs):
    """Converted at PP=1 and PP=2 (the last stage's own copy of the tied embedding): loaded strictly, the same
    first loss on the same batch."""
    ok(runs["driver"])
    pp1 = ok(case_result(next(c for c in runs["cases"] if c["name"] == "tied_pp1")))
    assert parse_losses(ok(runs["pp2"]).stdout) == parse_losses(pp1.stdout)
    assert len(parse_losses(pp1.stdout)) == 1


def test_kd_at_pp2_equals_kd_at_pp1(runs):
    """Distillation across two pipeline stages (a 3-layer student of width 40 split 1 + 2, its 4-layer teacher of
    width 48 split 2 + 2): the LM and KD losses and the grad norms of both iterations are those of the same run at
    PP=1, so the teacher's hidden states reach the last stage and the student's gradient flows back through the
    shared tensor."""
    ok(runs["driver"])
    pp1 = ok(case_result(next(c for c in runs["cases"] if c["name"] == "kd_tied_pp1"))).stdout
    pp2 = ok(runs["kd_pp2"]).stdout
    for key in ("lm loss", "kd loss", "grad norm"):
        assert parse_losses(pp2, key) == parse_losses(pp1, key), key
    assert sorted(parse_losses(pp1, "kd loss")) == [1, 2] and float(parse_losses(pp1, "kd loss")[1]) > 0.1


def test_torch_dist_teacher_loads_at_the_students_tp(runs):
    """A torch_dist teacher saved at TP=2 distils a TP=1 student (megatron-core reshards it on load): the same
    weights, so the KD loss is 0. (A torch-format teacher at another TP or PP is refused: the teacher_tp case and
    test_teacher_layout_checks.)"""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "kd_dist_teacher")))
    assert {k: float(v) for k, v in parse_losses(r.stdout, "kd loss").items()} == {1: 0.0}


def test_reset_attention_mask_keeps_documents_apart(runs):
    """Every 32-token sample of the repeated-document corpus is two whole 16-token documents: with
    --reset-attention-mask --reset-position-ids its loss is exactly that of the 16-token samples, one document
    each. (The dataset's masks used to be dropped, so the second document attended to the first.)"""
    ok(runs["driver"])
    one, two = (parse_losses(ok(case_result(next(c for c in runs["cases"] if c["name"] == n))).stdout)
                for n in ("one_document", "two_documents_masked"))
    assert one == two and len(one) == 1, (one, two)


def test_nan_loss_stops_the_run_even_in_its_first_iteration(runs, inputs):
    """The loss is validated on each rank before the data-parallel reduction, as stock pretrain_gpt.py does, and
    also in a run's first iteration, which megatron-core leaves unchecked: a one-iteration run from NaN weights used
    to finish with exit code 0 and save NaN weights."""
    ok(runs["driver"])
    r = case_result(next(c for c in runs["cases"] if c["name"] == "nan_loss"))
    assert r.returncode != 0, (r.stdout + r.stderr)[-3000:]
    assert "found NaN in local forward loss calculation in the run's first iteration" in r.stderr, r.stderr[-3000:]
    assert not list((inputs["dir"] / "nan_out").glob("iter_*"))  # nothing saved
    assert not (inputs["dir"] / "nan_out" / "hf_meta").exists()  # hf_meta/ comes with the first checkpoint


def test_each_warning_passes_megatron_handler_once(monkeypatch):
    """megatron-core's handler overrides ``filter`` (an added filter alone is never asked): each distinct warning
    still passes once, other records every time."""
    import io
    import logging

    from megatron.training.log_handler import CustomHandler

    from megatron.prune.training.recipe import warn_once_per_rank

    handler = CustomHandler()
    handler.setStream(io.StringIO())
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    warn_once_per_rank()
    log = logging.getLogger("megatron.core.warn_once_test")
    log.setLevel(logging.INFO)
    for _ in range(3):
        log.warning("checkpoints ONLY SUPPORTED for torch_dist")
        log.info("saving checkpoint")
    log.warning("another warning")
    logging.getLogger("torch.distributed.warn_once_test").warning("not megatron's")  # the handler's own filter
    out = handler.stream.getvalue()
    assert out.count("ONLY SUPPORTED") == 1 and out.count("saving checkpoint") == 3, out
    assert "another warning" in out and "not megatron's" not in out, out
    warn_once_per_rank()  # a second run in this process: its own once, not the first run's as well
    for _ in range(2):
        log.warning("checkpoints ONLY SUPPORTED for torch_dist")
    assert handler.stream.getvalue().count("ONLY SUPPORTED") == 2


def test_megatron_warnings_show_once_per_rank(runs):
    """megatron-core logs some warnings at every save (and evaluation); each rank shows each once. The TP=1 run
    saves twice."""
    out = ok(runs["tp1"]).stdout
    assert out.count("saving checkpoint at iteration") == 2
    assert out.count("RerunStateMachine checkpoints ONLY SUPPORTED for checkpoint format torch_dist") == 1


def test_llama3_rope_scaling_is_taken_from_the_checkpoint(runs):
    """The stock --use-checkpoint-args loader leaves RoPE scaling out; the recipe adopts it (factor 32, not the
    default 8), and the model built from those args matches transformers (test_megatron_parity)."""
    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "llama3_rope")))
    assert "Setting use_rope_scaling to True from checkpoint" in r.stdout
    assert "Setting rope_scaling_factor to 32.0 from checkpoint" in r.stdout
    assert sorted(parse_losses(r.stdout)) == [1]


def test_pruned_qwen3_trains_with_qk_layernorm_taken_from_the_checkpoint(runs, inputs, tmp_path):
    """The stock --use-checkpoint-args loader leaves qk_layernorm out (megatron-core 0.19.2); the recipe adopts it,
    so the pruned Qwen3 student and its unpruned teacher are built with QK-norm and load strictly. The QK-norms
    train, and the saved checkpoint exports to a Qwen3 model transformers runs."""
    from transformers import AutoModelForCausalLM

    from megatron.prune.formats.mcore.ops import megatron_to_hf
    from tests.tiny import sample_ids

    ok(runs["driver"])
    r = ok(case_result(next(c for c in runs["cases"] if c["name"] == "qwen3_kd")))
    assert "Setting qk_layernorm to True from checkpoint" in r.stdout
    losses, kd_losses = parse_losses(r.stdout), parse_losses(r.stdout, "kd loss")
    assert sorted(losses) == sorted(kd_losses) == [1, 2] and all(float(v) > 0 for v in kd_losses.values())
    pruned = model_tensors(next(inputs["qwen3"]["pruned"].glob("iter_*")))
    trained = model_tensors(inputs["dir"] / "qwen3_out" / "iter_0000002")
    assert pruned.keys() == trained.keys()
    norms = [k for k in trained if "q_layernorm" in k or "k_layernorm" in k]
    assert len(norms) == 2 * 3 and all(not torch.equal(pruned[k], trained[k]) for k in norms)
    back = megatron_to_hf(inputs["dir"] / "qwen3_out", tmp_path / "hf", progress=False)
    model = AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=sample_ids(300)).logits).all()
