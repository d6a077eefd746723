"""Pre-flight checks of a recovery run: everything megatron-core would refuse late, or train on silently wrong."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from argparse import Namespace

import pytest

from megatron.prune.errors import PruneError
from megatron.prune.training import checkpoints
from megatron.prune.training import teacher as teacher_mod
from tests.training.recovery_harness import ROOT, case_result, ok, parse_losses


def test_tensorboard_dir_without_tensorboard_is_refused(monkeypatch):
    """Without the package the stock loop would only warn and write nothing."""
    from megatron.prune.training.checks import check_tensorboard

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    check_tensorboard(Namespace(tensorboard_dir=None))
    with pytest.raises(PruneError, match="--tensorboard-dir tb: .*pip install tensorboard"):
        check_tensorboard(Namespace(tensorboard_dir="tb"))


def test_checkpoint_args_the_stock_loader_leaves_out():
    from megatron.prune.training.checks import adopt_checkpoint_args, check_checkpoint_shape

    ckpt = Namespace(norm_epsilon=1e-6, use_rope_scaling=True, rope_scaling_factor=32.0, padded_vocab_size=384,
                     qk_layernorm=True)
    flags = Namespace(norm_epsilon=1e-5, use_rope_scaling=False, rope_scaling_factor=8.0, padded_vocab_size=384,
                      qk_layernorm=False, load="ck")
    with pytest.raises(PruneError) as e:  # without --use-checkpoint-args: refused, each difference named
        check_checkpoint_shape(ckpt, flags, "--load")
    assert "use_rope_scaling: checkpoint True vs flags False" in str(e.value)
    assert "rope_scaling_factor: checkpoint 32.0 vs flags 8.0" in str(e.value) and "norm_epsilon" in str(e.value)
    assert "qk_layernorm: checkpoint True vs flags False" in str(e.value)  # a Qwen3 checkpoint without --qk-layernorm
    adopt_checkpoint_args(ckpt, flags)
    check_checkpoint_shape(ckpt, flags, "--load")
    assert (flags.norm_epsilon, flags.use_rope_scaling, flags.rope_scaling_factor) == (1e-6, True, 32.0)
    assert flags.qk_layernorm and "qk_layernorm" in teacher_mod.TEACHER_SHAPE_FIELDS  # the teacher takes its own


def test_layer_spec_mismatch_is_refused(monkeypatch):
    from megatron.prune.training import checks
    from megatron.prune.training import model as model_mod

    run = Namespace(transformer_impl="transformer_engine")  # selected, but TE is not installed here
    assert model_mod.layer_spec_name(run) == "local"
    checks.check_layer_spec(Namespace(transformer_impl="local"), run, "--load", "ck")
    checks.check_layer_spec(Namespace(), run, "--load", "ck")  # args that do not say: the load hook decides
    with pytest.raises(PruneError, match="reshard --input ck --output ck-local --transformer-impl local$"):
        checks.check_layer_spec(Namespace(transformer_impl="transformer_engine"), run, "--load", "ck")
    monkeypatch.setattr(model_mod, "have_transformer_engine", lambda: True)  # a GPU machine with TE
    with pytest.raises(PruneError, match="--transformer-impl transformer_engine, or pass --transformer-impl local"):
        checks.check_layer_spec(Namespace(transformer_impl="local"), run, "--load", "ck/")


def test_flags_megatron_refuses_late_are_refused_before_start_up(inputs, monkeypatch, tmp_path):
    """Before Megatron starts: batch sizes that do not divide, two schedules, KD flags without a teacher or out
    of range, --save without --save-interval, --min-lr above --lr (the last two bare assertions), W&B with an
    empty run name, no folder for its files or no package, a sequence longer than the checkpoint's positions, a
    torch_dist checkpoint read as torch, and a moved checkpoint whose args name a tokenizer that is gone; an explicit
    --tokenizer-model is kept."""
    from megatron.prune.training import checks

    def flags_first(argv: list[str]) -> None:
        checks.check_flags_first(checks.preflight_flags(argv))

    def paths_first(argv: list[str]) -> None:
        checks.check_paths_first(checks.preflight_flags(argv))

    monkeypatch.setenv("WORLD_SIZE", "4")
    tp2 = ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2"]  # 4 processes: data-parallel 2
    with pytest.raises(PruneError, match=r"--global-batch-size 6 .* multiple of --micro-batch-size 2 .* "
                                         r"data-parallel size 2"):
        flags_first([*tp2, "--global-batch-size", "6"])
    flags_first([*tp2, "--global-batch-size", "6", "--global-batch-size", "8"])  # the last one wins
    bad = {("--micro-batch-size", "3", "--global-batch-size", "8"): "must be a multiple of --micro-batch-size 3",
           ("--train-iters", "10", "--train-samples", "40"): "TRAIN_SAMPLES=N instead of TRAIN_ITERS",
           ("--kd-alpha", "0.5"): "--kd-alpha: only used with --kd-teacher-load",
           ("--kd-teacher-load", "t", "--kd-alpha", "1.5"): r"--kd-alpha 1.5: must be in \[0, 1\]",
           ("--kd-teacher-load", "t", "--kd-temperature", "0"): "--kd-temperature 0.0: must be > 0",
           ("--save", "out"): r"--save out needs --save-interval N > 0",
           ("--save", "out", "--save-interval", "0"): r"--save out needs --save-interval N > 0",
           ("--lr", "1e-4", "--min-lr", "1e-3"): r"--min-lr 0.001 \(MIN_LR\) is above --lr 0.0001 \(LR\)",
           ("--wandb-project", "p", "--save", "out", "--save-interval", "1", "--wandb-exp-name", ""):
               "--wandb-project p: --wandb-exp-name is empty",
           ("--wandb-project", "p"): r"--wandb-project p: W&B writes its files to SAVE/wandb; pass --save"}
    for argv, message in bad.items():
        with pytest.raises(PruneError, match=message):
            flags_first(list(argv))
    wandb = ["--wandb-project", "p", "--wandb-save-dir", "wb"]  # W&B names the run
    flags_first(wandb)
    find_spec = importlib.util.find_spec
    with monkeypatch.context() as m, pytest.raises(PruneError, match="--wandb-project p: W&B logging needs the "
                                                                      "wandb package"):
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
        flags_first(wandb)

    pruned = str(inputs["pruned"][1])
    max_pos = checkpoints.checkpoint_args(checkpoints.find_checkpoint(pruned, "--load")).max_position_embeddings
    with pytest.raises(PruneError, match=f"--seq-length {max_pos + 1}: longer than the checkpoint's "
                                         f"max_position_embeddings {max_pos}"):
        paths_first(["--load", pruned, "--use-checkpoint-args", "--seq-length", str(max_pos + 1)])
    paths_first(["--load", pruned, "--use-checkpoint-args", "--seq-length", str(max_pos + 1),
                              "--max-position-embeddings", str(max_pos + 1)])
    dist = tmp_path / "dist"
    (dist / "iter_0000003").mkdir(parents=True)
    (dist / "latest_checkpointed_iteration.txt").write_text("3")
    (dist / "iter_0000003" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    with pytest.raises(PruneError, match="a torch_dist checkpoint, but --ckpt-format is torch"):
        paths_first(["--load", str(dist), "--ckpt-format", "torch_dist", "--ckpt-format", "torch"])
    assert checkpoints.checkpoint_format(dist) == "torch_dist" and checkpoints.checkpoint_format(pruned) == "torch"
    assert checkpoints.checkpoint_format(tmp_path) == "none"

    vp = inputs["vocab_pruned"]  # moved after conversion: its args name <made>/hf_meta, now gone
    with pytest.raises(PruneError, match=f"its args name the tokenizer {vp['made'] / 'hf_meta'}, which does not "
                                         "exist here"):
        paths_first(["--load", str(vp["mg"]), "--use-checkpoint-args"])
    argv = ["--load", str(vp["mg"]), "--use-checkpoint-args", "--tokenizer-model", vp["TOKENIZER"]]
    kept = checks.keep_own_tokenizer(argv)
    assert kept == [*argv, "--no-use-tokenizer-model-from-checkpoint-args"]
    paths_first(kept)
    assert checks.keep_own_tokenizer(kept) == kept and checks.keep_own_tokenizer(argv[:3]) == argv[:3]


def test_schedules_megatron_fails_on_late_are_refused():
    """Evaluation without validation data (crashed after the last step, before the final save), WSD without
    its decay length (a bare assertion); a missing --eval-interval becomes the run's length."""
    from megatron.prune.training import checks

    def args(**kw) -> Namespace:
        base = dict(eval_interval=5, train_iters=20, train_samples=None, global_batch_size=4, eval_iters=0,
                    split="100,0,0", valid_data_path=None, mock_data=False, lr_decay_style="cosine",
                    lr_wsd_decay_iters=None, lr_wsd_decay_samples=None)
        return Namespace(**{**base, **kw})

    for ok_args in (args(), args(eval_iters=2, split="98,2,0"), args(eval_iters=2, valid_data_path=["v"]),
                    args(lr_decay_style="WSD", lr_wsd_decay_iters=4)):
        checks.check_schedule(ok_args)
    with pytest.raises(PruneError, match=r"--eval-iters 2 \(EVAL_ITERS\) but no validation data: --split 100,0,0"):
        checks.check_schedule(args(eval_iters=2))
    with pytest.raises(PruneError, match="WSD needs the length of its decay phase: --lr-wsd-decay-iters"):
        checks.check_schedule(args(lr_decay_style="WSD"))
    for kw, interval in (({}, 20), ({"train_iters": None, "train_samples": 30}, 8)):
        a = args(eval_interval=None, **kw)
        checks.check_schedule(a)
        assert a.eval_interval == interval


def test_unsupported_parallelism_is_refused(monkeypatch):
    """get_batch gives every rank whole sequences: CP > 1 would not split them (and needs TE attention). Sequence
    parallelism needs TE's norms: the local spec's torch RMSNorm asserts it away once the model is built."""
    from megatron.prune.training import checks
    from megatron.prune.training import model as model_mod

    local = Namespace(context_parallel_size=1, sequence_parallel=False, transformer_impl="local")
    checks.check_parallelism(local)
    with pytest.raises(PruneError, match="--context-parallel-size 2: pretrain_llama.py supports only 1"):
        checks.check_parallelism(Namespace(**{**vars(local), "context_parallel_size": 2}))
    sp = Namespace(**{**vars(local), "sequence_parallel": True})
    with pytest.raises(PruneError, match="--sequence-parallel: this run builds megatron-core's local layer spec"):
        checks.check_parallelism(sp)
    monkeypatch.setattr(model_mod, "have_transformer_engine", lambda: True)  # a GPU machine with TE
    checks.check_parallelism(Namespace(**{**vars(sp), "transformer_impl": "transformer_engine"}))


def test_tensor_parallel_size_must_split_the_checkpoints_sizes():
    """TP=3 on a checkpoint of 4 query groups trained into a broadcast error in every rank; refused by the sizes
    that do not split, with the TP sizes that do."""
    from megatron.prune.training import checks

    model = Namespace(tensor_model_parallel_size=2, num_attention_heads=8, num_query_groups=4,
                      group_query_attention=True, ffn_hidden_size=48, num_experts=None, load="ck")
    checks.check_tensor_parallel(model)
    with pytest.raises(PruneError, match=r"^--tensor-model-parallel-size 3 \(TP\): the model of --load ck has 4 query "
                                         r"groups, 8 attention heads, not divisible by it; valid TP sizes: 1, 2, 4$"):
        checks.check_tensor_parallel(Namespace(**{**vars(model), "tensor_model_parallel_size": 3}))
    with pytest.raises(PruneError, match="has 36 FFN channels, not divisible by it; valid TP sizes: 1, 2, 4$"):
        checks.check_tensor_parallel(Namespace(**{**vars(model), "tensor_model_parallel_size": 8,
                                                  "num_attention_heads": 16, "num_query_groups": 8,
                                                  "ffn_hidden_size": 36}))


def test_pipeline_size_must_split_the_layers(inputs, tmp_path):
    """PP=2 on a checkpoint pruned to 3 layers: Megatron's bare assertion named neither number; check_model.sh's
    pre-flight refuses it in one line with the layer count and the PP sizes that do, before torchrun. A --num-layers
    flag is checked alike; an uneven split (--decoder-first-pipeline-num-layers) is Megatron's to check."""
    from megatron.prune.training import checks
    from tests.procs import free_port

    pruned = str(inputs["pruned"][1])
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port()),
           "LOAD": pruned, "SAVE": str(tmp_path / "save"), "DATA": inputs["DATA"], "TOKENIZER": inputs["TOKENIZER"],
           "PP": "2", "TRAIN_ITERS": "2", "SEQ_LEN": "16", "MICRO_BATCH": "1", "GLOBAL_BATCH": "2"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "check_model.sh")], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert (r.returncode, r.stderr) == (2, f"pretrain_llama.py: error: --pipeline-model-parallel-size 2 (PP): the "
                                           f"model of --load {pruned} has 3 layers, not divisible by it; valid PP "
                                           "sizes: 1, 3\n")
    assert not (tmp_path / "save").exists()
    flags = ["--pipeline-model-parallel-size", "3", "--num-layers", "4"]
    with pytest.raises(PruneError, match=r"^--pipeline-model-parallel-size 3 \(PP\): the model \(--num-layers 4\) "
                                         r"has 4 layers, not divisible by it; valid PP sizes: 1, 2, 4$"):
        checks.check_flags_first(checks.preflight_flags(flags))
    checks.check_flags_first(checks.preflight_flags([*flags, "--decoder-first-pipeline-num-layers", "2"]))
    checks.check_flags_first(checks.preflight_flags([*flags, "--pipeline-model-parallel-size", "2"]))
    checks.check_paths_first(checks.preflight_flags(["--load", pruned, "--use-checkpoint-args",
                                                     "--pipeline-model-parallel-size", "3"]))


def test_document_masking_needs_attention_that_applies_the_mask(monkeypatch):
    """Only megatron-core's unfused local attention applies the dataset's per-document mask: TE's causal attention
    and the fused causal softmax would ignore it (and train across documents), so those are refused."""
    from megatron.prune.training import checks
    from megatron.prune.training import model as model_mod

    local = Namespace(reset_attention_mask=True, masked_softmax_fusion=False, transformer_impl="local",
                      dataloader_inter_document_masking=False, window_size=None, bf16=True, fp16=False)
    checks.check_document_masking(local)
    with pytest.raises(PruneError, match="--reset-attention-mask: the fused causal softmax kernel ignores the "
                                         "per-document mask .* add --no-masked-softmax-fusion"):
        checks.check_document_masking(Namespace(**{**vars(local), "masked_softmax_fusion": True}))
    # in fp32 the fused kernel never runs
    checks.check_document_masking(Namespace(**{**vars(local), "masked_softmax_fusion": True, "bf16": False}))
    with pytest.raises(PruneError, match="--window-size 64: megatron-core's local attention replaces the "
                                         "per-document mask"):
        checks.check_document_masking(Namespace(**{**vars(local), "window_size": 64}))
    monkeypatch.setattr(model_mod, "have_transformer_engine", lambda: True)
    te = Namespace(**{**vars(local), "transformer_impl": "transformer_engine"})
    with pytest.raises(PruneError, match="Transformer Engine's causal attention ignores the per-document mask"):
        checks.check_document_masking(te)
    checks.check_document_masking(Namespace(**{**vars(te), "reset_attention_mask": False}))
    with pytest.raises(PruneError, match="--dataloader-inter-document-masking: pretrain_llama.py does not build"):
        checks.check_document_masking(Namespace(**{**vars(te), "dataloader_inter_document_masking": True}))


def test_flags_stock_pretrain_gpt_honours(tmp_path, inputs):
    """Megatron flags the stock GPT script acts on: the ones this recipe cannot honour are refused (not ignored),
    the rest reach the model, the dataset config and the data checks."""
    from megatron.prune.training import checks, datasets
    from megatron.prune.training import model as model_mod

    base = {name: None for name, _ in checks.UNSUPPORTED_FLAGS.values()}
    checks.check_unsupported_flags(Namespace(**base, transformer_impl="local"))
    for flag, (name, _) in checks.UNSUPPORTED_FLAGS.items():
        with pytest.raises(PruneError, match=f"^{flag} .*: not supported: "):
            checks.check_unsupported_flags(Namespace(**{**base, name: True}, transformer_impl="local"))
    with pytest.raises(PruneError, match="--transformer-impl inference_optimized: for inference only"):
        checks.check_unsupported_flags(Namespace(**base, transformer_impl="inference_optimized"))
    # RoPE position interpolation: adopted from a checkpoint, checked against it, and passed to GPTModel
    assert "rotary_seq_len_interpolation_factor" in checks.UNLOADED_MODEL_ARGS  # the teacher takes its own:
    assert "rotary_seq_len_interpolation_factor" in teacher_mod.TEACHER_SHAPE_FIELDS
    rope = Namespace(padded_vocab_size=384, max_position_embeddings=64, untie_embeddings_and_output_weights=False,
                     position_embedding_type="rope", rotary_percent=1.0, rotary_base=10000,
                     rotary_seq_len_interpolation_factor=4)
    assert model_mod.gpt_model_kwargs(rope)["seq_len_interpolation_factor"] == 4
    # dataset flags reach GPTDatasetConfig
    seqs = tmp_path / "seqs.json"
    seqs.write_text(json.dumps({"a": 3}))
    tuned = datasets.dataset_tuning(Namespace(multiple_validation_sets=True, mid_level_dataset_surplus=0.5,
                                            allow_ambiguous_pad_tokens=True, per_dataset_sequences_path=str(seqs)))
    assert tuned["multiple_validation_sets"] and tuned["allow_ambiguous_pad_tokens"]
    assert tuned["mid_level_dataset_surplus"] == 0.5 and tuned["sequences_per_dataset"] == {"a": 3}
    with pytest.raises(PruneError, match=r"--per-dataset-sequences-path .*nope\.json: No such file"):
        datasets.read_sequence_counts(str(tmp_path / "nope.json"))
    seqs.write_text("[3]")
    with pytest.raises(PruneError, match=r"seqs\.json: must hold a JSON object .*, not list"):
        datasets.read_sequence_counts(str(seqs))
    seqs.write_text("{")
    with pytest.raises(PruneError, match=r"seqs\.json: not JSON"):
        datasets.read_sequence_counts(str(seqs))
    # --data-args-path (a long blend kept in a file) is read as the dataset provider reads it
    blend = tmp_path / "blend.txt"
    blend.write_text(f"0.7 {inputs['DATA']}\n0.3 {inputs['DATA']}_b\n")
    none = dict(data_path=None, train_data_path=None, valid_data_path=None, test_data_path=None,
                per_split_data_args_path=None)
    assert checks.data_prefixes(Namespace(**none, data_args_path=str(blend))) == [inputs["DATA"], inputs["DATA"] + "_b"]
    with pytest.raises(PruneError, match=r"--data-args-path .*nope\.txt: no such file"):
        checks.data_prefixes(Namespace(**none, data_args_path=str(tmp_path / "nope.txt")))
    with pytest.raises(PruneError, match="--data-args-path .* and --data-path: give one"):
        checks.data_prefixes(Namespace(**{**none, "data_path": [inputs["DATA"]]}, data_args_path=str(blend)))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": inputs["DATA"]}))
    with pytest.raises(PruneError, match="split.json: no test, valid entry"):
        checks.data_prefixes(Namespace(**{**none, "per_split_data_args_path": str(split)}, data_args_path=None))
    split.write_text(json.dumps({"train": f"1 {inputs['DATA']}", "valid": inputs["DATA"] + "_v",
                                 "test": inputs["DATA"] + "_t"}))
    assert checks.data_prefixes(Namespace(**{**none, "per_split_data_args_path": str(split)}, data_args_path=None)) \
        == [inputs["DATA"], inputs["DATA"] + "_v", inputs["DATA"] + "_t"]


def test_checkpoint_tokenizer_must_be_the_training_tokenizer(inputs):
    """A checkpoint's hf_meta/ tokenizer against --tokenizer-model: the same vocabulary passes, another is refused
    naming the fix (for a teacher: `vocab prune --like`), no hf_meta/ tokenizer goes unchecked."""
    from megatron.prune.training import checks

    vp = inputs["vocab_pruned"]
    args = Namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=vp["TOKENIZER"])
    checks.check_vocabulary(str(vp["mg"]), args, "--load")
    checks.check_vocabulary(str(vp["teacher_v"]), args, "--kd-teacher-load")
    checks.check_vocabulary(str(inputs["conv"][1]), args, "--kd-teacher-load")  # hf_meta/ without a tokenizer
    with pytest.raises(PruneError, match=r"300 tokens\) is not the training tokenizer .* 290 tokens; 300 vs 290"):
        checks.check_vocabulary(str(vp["teacher_full"]), args, "--kd-teacher-load")
    full = Namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=inputs["TOKENIZER"])
    fix = f"tokenize the data with it and pass it as --tokenizer-model (TOKENIZER={vp['mg']}/hf_meta)"
    with pytest.raises(PruneError, match=re.escape(fix)):
        checks.check_vocabulary(str(vp["mg"]), full, "--load")
    checks.check_vocabulary(str(vp["mg"]), Namespace(tokenizer_type="NullTokenizer", tokenizer_model=None), "--load")


def test_bad_inputs_fail_before_training(runs):
    ok(runs["driver"])
    bad = [c for c in runs["cases"] if c["message"]]
    assert len(bad) == 16  # the dense-checkpoint --num-experts case lives in test_moe_recovery.py
    for case in bad:
        r = case_result(case)
        assert r.returncode == 2 and case["message"] in r.stderr, (case["name"], r.stderr[-3000:])
        assert not parse_losses(r.stdout), f"{case['name']}: training started despite bad input"
