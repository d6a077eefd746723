"""Everything that can be wrong with a recovery run's inputs, checked before the stock loop starts: flags (read before
Megatron's own start-up, which prints ~900 lines and builds the model before it reports most mistakes), data,
checkpoints, the teacher. Megatron-core 0.19.2 trains on, silently wrong, in several of these cases."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Sequence

from megatron.prune.cpu import shims_active
from megatron.prune.data import MEGATRON_TOKENIZER_TYPES, check_token_ids, validate_dataset_prefix
from megatron.prune.errors import PruneError
from megatron.prune.formats.folder import is_megatron_dir
from megatron.prune.formats.mcore.schema import META_DIR
from megatron.prune.training.checkpoints import (check_weights, checkpoint_args, checkpoint_state, find_checkpoint,
                                                  never_trained)
from megatron.prune.training.datasets import check_dataset_files, read_sequence_counts
from megatron.prune.training.model import layer_spec_name
from megatron.prune.training.moe_checks import check_expert_parallel, check_moe, check_moe_flags_first, check_moe_shape
from megatron.prune.training.parallel_checks import (add_pipeline_flags, check_parallelism, check_pipeline_parallel,
                                                      check_tensor_parallel)
from megatron.prune.training.teacher import check_teacher

# Megatron args that the stock --use-checkpoint-args loader leaves out (megatron-core 0.19.2) but that change
# the model's outputs: adopted from the checkpoint by adopt_checkpoint_args.
UNLOADED_MODEL_ARGS: tuple[str, ...] = ("norm_epsilon", "use_rope_scaling", "rope_scaling_factor",
                                        "rotary_seq_len_interpolation_factor", "qk_layernorm")


# Model args a checkpoint must agree with (checked before training).
MODEL_ARGS: tuple[str, ...] = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "swiglu", "normalization", "untie_embeddings_and_output_weights",
    "position_embedding_type", "padded_vocab_size", "rotary_base", *UNLOADED_MODEL_ARGS,
)


def data_prefixes(args: Any) -> list[str]:
    """Every dataset prefix the run reads, parsed as the dataset provider parses them (--data-path, the per-split
    paths, or the files of --data-args-path / --per-split-data-args-path), weights skipped."""
    from megatron.training.utils.common_utils import get_blend_and_blend_per_split

    for flag in ("data_args_path", "per_split_data_args_path"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.isfile(path):
            raise PruneError(f"--{flag.replace('_', '-')} {path}: no such file")
    if getattr(args, "data_args_path", None) and getattr(args, "data_path", None):
        raise PruneError(f"--data-args-path {args.data_args_path} and --data-path: give one")
    split_file = getattr(args, "per_split_data_args_path", None)
    if split_file:
        missing = sorted({"train", "valid", "test"} - set(json.loads(Path(split_file).read_text())))
        if missing:
            raise PruneError(f"--per-split-data-args-path {split_file}: no {', '.join(missing)} entry (it needs "
                             'train, valid and test: {"train": "PREFIX ...", "valid": ..., "test": ...})')
    blend, per_split = get_blend_and_blend_per_split(args)
    names = list(blend[0]) if blend else []
    for split in per_split or []:
        names += list(split[0]) if split else []
    return names


def check_checkpoint_shape(ckpt_args: Any, args: Any, flag: str) -> None:
    """Clear error when a checkpoint's model shape disagrees with the flags."""
    diffs = [
        f"{name}: checkpoint {getattr(ckpt_args, name)!r} vs flags {getattr(args, name)!r}"
        for name in MODEL_ARGS
        if hasattr(ckpt_args, name) and getattr(ckpt_args, name) != getattr(args, name)
    ]
    if diffs:
        raise PruneError(f"{flag} {args.load}: checkpoint args disagree with the flags ("
                         + "; ".join(diffs) + "). Pass --use-checkpoint-args or fix the flags.")


def adopt_checkpoint_args(ckpt_args: Any, args: Any) -> None:
    """With --use-checkpoint-args also take what the stock loader leaves out (eps, RoPE scaling, QK-norm, vocab
    sizes)."""
    for name in UNLOADED_MODEL_ARGS:
        if hasattr(ckpt_args, name) and getattr(ckpt_args, name) != getattr(args, name, None):
            setattr(args, name, getattr(ckpt_args, name))
            if os.environ.get("RANK", "0") == "0":  # worded like the stock loader's own lines
                print(f"Setting {name} to {getattr(args, name)} from checkpoint", flush=True)
    if getattr(args, "vocab_size", None) is None and isinstance(getattr(ckpt_args, "vocab_size", None), int):
        args.vocab_size = ckpt_args.vocab_size  # saved with the run's args: tells apart vocabularies padded alike
    padded = getattr(ckpt_args, "padded_vocab_size", None)
    if padded is not None and padded != args.padded_vocab_size:
        from megatron.training import get_tokenizer

        if padded < get_tokenizer().vocab_size:
            raise PruneError(f"--load {args.load}: checkpoint vocab {padded} is smaller than the "
                             f"tokenizer's {get_tokenizer().vocab_size}")
        args.padded_vocab_size = padded


def check_layer_spec(ckpt_args: Any, args: Any, flag: str, path: str) -> None:
    """Refuse a checkpoint written for the other layer spec: its norm weights have other names, and the stock
    loader, after a failed strict load, loads what fits and goes on (megatron-core 0.19.2)."""
    saved, built = getattr(ckpt_args, "transformer_impl", None), layer_spec_name(args)
    if saved not in ("local", "transformer_engine") or saved == built:
        return
    grouped = " (its grouped-GEMM experts become SequentialMLP ones)" \
        if built == "local" and getattr(ckpt_args, "moe_grouped_gemm", False) else ""
    fixes = [f"convert it: megatron-prune reshard --input {path} --output {str(path).rstrip('/')}-{built} "
             f"--transformer-impl {built}{grouped}"]
    if saved == "local":
        fixes.append("or pass --transformer-impl local")
    raise PruneError(f"{flag} {path}: the checkpoint has {saved}-spec parameter names, but this run builds the "
                     f"{built} spec; " + ", ".join(fixes))


def check_vocabulary(path: str, args: Any, flag: str) -> None:
    """A checkpoint's own tokenizer (its hf_meta/, written by our converter) must be the training tokenizer:
    data ids, embedding rows and (distilling) the teacher's logits follow one numbering. Equal padded vocab sizes
    do not show it: a few pruned tokens leave the padding as it was. Checkpoints without hf_meta/ go unchecked."""
    from megatron.prune.vocab.folder import first_difference, tokenizer_tokens

    def tokens(where: str | Path) -> tuple[str, ...] | None:
        try:
            return tokenizer_tokens(where)
        except PruneError:  # a tokenizer file we do not read (e.g. with id holes): left to Megatron
            return None

    if getattr(args, "tokenizer_type", None) not in MEGATRON_TOKENIZER_TYPES or not args.tokenizer_model:
        return
    theirs = tokens(Path(path) / META_DIR)
    ours = tokens(args.tokenizer_model) if theirs is not None else None
    if theirs is None or ours is None or theirs == ours:
        return
    where = first_difference(theirs, ours)
    msg = (f"{flag} {path}: the checkpoint's tokenizer ({META_DIR}/, {len(theirs)} tokens) is not the training "
           f"tokenizer (--tokenizer-model {args.tokenizer_model}, {len(ours)} tokens; {where})")
    if flag == "--kd-teacher-load":
        raise PruneError(f"{msg}; distillation compares logits token id by token id. For a student with a pruned "
                         "vocabulary, give the teacher the same one: megatron-prune vocab prune --input "
                         f"{path} --output {str(path).rstrip('/')}-vocab --like {args.tokenizer_model}")
    raise PruneError(f"{msg}; the embedding rows follow the checkpoint's tokenizer: tokenize the data with it and "
                     f"pass it as --tokenizer-model (TOKENIZER={Path(path) / META_DIR})")


# Megatron's flag that keeps --tokenizer-model under --use-checkpoint-args (megatron-core 0.19.2), and its alias.
TOKENIZER_FROM_FLAGS: tuple[str, ...] = ("--no-use-tokenizer-model-from-checkpoint-args",
                                         "--disable-use-tokenizer-model-from-checkpoint-args")


# Tokenizer types whose --tokenizer-model is a file or folder (megatron-core 0.19.2).
PATH_TOKENIZERS: tuple[str, ...] = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                    "Llama2Tokenizer", "TikTokenizer")


def _number(kind: type) -> Any:
    """An argparse type that yields None for a value it cannot read (Megatron's own parser reports those)."""
    def read(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            return None
    return read


def preflight_flags(argv: Sequence[str]) -> argparse.Namespace:
    """The flags checked before Megatron starts (its start-up prints ~900 lines and builds the model before it
    reports most mistakes, some as bare assertions); the last occurrence wins, as in Megatron's parser."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--load", "--save", "--tokenizer-type", "--tokenizer-model", "--num-layers", "--kd-teacher-load",
                 "--ckpt-format", "--train-iters", "--train-samples", "--wandb-project", "--wandb-exp-name",
                 "--wandb-save-dir"):
        p.add_argument(flag)
    p.add_argument("--save-interval", type=_number(int))
    for flag in ("--lr", "--min-lr"):
        p.add_argument(flag, type=_number(float))
    for flag in ("--seq-length", "--max-position-embeddings", "--micro-batch-size", "--global-batch-size"):
        p.add_argument(flag, type=_number(int))
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size"):
        p.add_argument(flag, type=_number(int), default=1)
    for flag in ("--kd-alpha", "--kd-temperature"):
        p.add_argument(flag, type=_number(float))
    p.add_argument("--use-checkpoint-args", action="store_true")
    p.add_argument("--transformer-impl")
    p.add_argument("--moe-grouped-gemm", action="store_true")
    p.add_argument("--moe-aux-loss-coeff", nargs="+", type=_number(float))
    p.add_argument(*TOKENIZER_FROM_FLAGS, dest="own_tokenizer", action="store_true")
    add_pipeline_flags(p)
    return p.parse_known_args(list(argv))[0]


def keep_own_tokenizer(argv: Sequence[str]) -> list[str]:
    """With --use-checkpoint-args Megatron swaps an explicit --tokenizer-model for the path the checkpoint's args
    name (a stale path once the checkpoint has moved, or another tokenizer): the explicit one is kept."""
    ns = preflight_flags(argv)
    if ns.use_checkpoint_args and ns.tokenizer_model and not ns.own_tokenizer:
        return [*argv, TOKENIZER_FROM_FLAGS[0]]
    return list(argv)


def check_paths_first(ns: argparse.Namespace) -> None:
    """Paths that Megatron's own start-up fails on obscurely, checked before it runs: a missing tokenizer folder
    becomes a hub download (a network error, or another model's tokenizer), and a missing --load with
    --use-checkpoint-args ends in "either num-layers or encoder-num-layers should be specified". With
    --use-checkpoint-args and no --tokenizer-model, Megatron takes the tokenizer path the checkpoint's args name,
    which is gone once the checkpoint has moved (a hub lookup of that path again). ``ns``: ``preflight_flags``."""
    if ns.tokenizer_type in PATH_TOKENIZERS and ns.tokenizer_model and not os.path.exists(ns.tokenizer_model):
        raise PruneError(f"--tokenizer-model {ns.tokenizer_model}: no such file or folder; pass the pruned model's "
                         "own tokenizer: its HF folder (or the hf_meta/ folder of its Megatron checkpoint), or a "
                         "SentencePiece .model")
    if ns.load and ns.use_checkpoint_args and ns.num_layers is None and not is_megatron_dir(ns.load):
        raise PruneError(f"--load {ns.load}: not a Megatron checkpoint folder (no latest_checkpointed_iteration.txt); "
                         "--use-checkpoint-args reads the model shape from it")
    if not (ns.load and is_megatron_dir(ns.load)):
        return
    ref = find_checkpoint(ns.load, "--load")
    if ref.torch_dist and ns.ckpt_format == "torch":
        raise PruneError(f"--load {ns.load}: a torch_dist checkpoint, but --ckpt-format is torch (Megatron would "
                         "stop after start-up); pass --ckpt-format torch_dist (CKPT_FORMAT=torch_dist), which also "
                         "saves in that format")
    if not ns.use_checkpoint_args:
        return
    saved = checkpoint_args(ref)
    if ns.num_layers is None:  # a --num-layers flag wins over the checkpoint's (checked by check_flags_first)
        check_pipeline_parallel(ns, getattr(saved, "num_layers", None), f" of --load {ns.load}")
    named = getattr(saved, "tokenizer_model", None)
    if (not ns.own_tokenizer and getattr(saved, "tokenizer_type", None) in PATH_TOKENIZERS and named
            and not os.path.exists(named)):
        raise PruneError(f"--load {ns.load}: its args name the tokenizer {named}, which does not exist here (the "
                         "checkpoint was moved or made elsewhere), and with --use-checkpoint-args Megatron uses that; "
                         "pass the model's tokenizer with --tokenizer-model (TOKENIZER=...)")
    max_pos = getattr(saved, "max_position_embeddings", None)
    if ns.seq_length and ns.max_position_embeddings is None and max_pos and ns.seq_length > max_pos:
        raise PruneError(f"--seq-length {ns.seq_length}: longer than the checkpoint's max_position_embeddings "
                         f"{max_pos}; use --seq-length {max_pos} (SEQ_LEN={max_pos}) or, RoPE allowing it, raise the "
                         f"limit with --max-position-embeddings {ns.seq_length} (quality past the trained length "
                         "is not guaranteed)")


def check_flags_first(ns: argparse.Namespace) -> None:
    """Flag combinations Megatron refuses only after start-up (or never), checked before it runs (``ns``:
    ``preflight_flags``)."""
    model_parallel = ns.tensor_model_parallel_size * ns.pipeline_model_parallel_size * ns.context_parallel_size
    dp = max(1, int(os.environ.get("WORLD_SIZE", "1")) // max(1, model_parallel))
    if ns.micro_batch_size and ns.global_batch_size and ns.global_batch_size % (ns.micro_batch_size * dp):
        raise PruneError(f"--global-batch-size {ns.global_batch_size} (GLOBAL_BATCH) must be a multiple of "
                         f"--micro-batch-size {ns.micro_batch_size} (MICRO_BATCH) x data-parallel size {dp}")
    if ns.save and (ns.save_interval is None or ns.save_interval <= 0):
        raise PruneError(f"--save {ns.save} needs --save-interval N > 0 (SAVE_INTERVAL; check_model.sh defaults it to "
                         "the run's length)")
    if ns.lr is not None and ns.min_lr is not None and ns.min_lr > ns.lr:
        raise PruneError(f"--min-lr {ns.min_lr} (MIN_LR) is above --lr {ns.lr} (LR)")
    if ns.train_iters is not None and ns.train_samples is not None:
        raise PruneError(f"--train-iters {ns.train_iters} and --train-samples {ns.train_samples}: give one "
                         "(with scripts/check_model.sh: TRAIN_SAMPLES=N instead of TRAIN_ITERS)")
    if ns.wandb_project:  # else Megatron's bare ValueError (empty name), TypeError (no folder) or ImportError
        if ns.wandb_exp_name == "":
            raise PruneError(f"--wandb-project {ns.wandb_project}: --wandb-exp-name is empty; name the run, or leave "
                             "the flag out for a name W&B picks")
        if not ns.save and not ns.wandb_save_dir:
            raise PruneError(f"--wandb-project {ns.wandb_project}: W&B writes its files to SAVE/wandb; pass --save "
                             "(SAVE) or --wandb-save-dir DIR")
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise PruneError(f"--wandb-project {ns.wandb_project}: W&B logging needs the wandb package; pip install "
                             "wandb, or drop the flag")
    check_moe_flags_first(ns)
    check_pipeline_parallel(ns, ns.num_layers, f" (--num-layers {ns.num_layers})")
    if ns.kd_teacher_load is None:
        given = [f for f in ("--kd-alpha", "--kd-temperature") if getattr(ns, f[2:].replace("-", "_")) is not None]
        if given:
            raise PruneError(f"{' and '.join(given)}: only used with --kd-teacher-load (KD_TEACHER)")
        return
    if ns.kd_alpha is not None and not 0.0 <= ns.kd_alpha <= 1.0:
        raise PruneError(f"--kd-alpha {ns.kd_alpha}: must be in [0, 1]")
    if ns.kd_temperature is not None and ns.kd_temperature <= 0:
        raise PruneError(f"--kd-temperature {ns.kd_temperature}: must be > 0")


def check_tensorboard(args: Any) -> None:
    """--tensorboard-dir needs the tensorboard package; without it the stock loop only warns and logs nothing."""
    if not getattr(args, "tensorboard_dir", None):
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise PruneError(f"--tensorboard-dir {args.tensorboard_dir}: TensorBoard logging needs the tensorboard "
                         f"package ({e}); pip install tensorboard, or drop the flag") from None


def check_memory_history(args: Any) -> None:
    """--record-memory-history records the CUDA caching allocator, which a CPU run does not use."""
    if getattr(args, "record_memory_history", False) and shims_active():
        raise PruneError("--record-memory-history: records CUDA allocations, and this run has no GPU; drop the flag")


def start_untrained_checkpoint(state: dict[str, Any], args: Any) -> None:
    """Resuming (no --finetune) from a checkpoint that never trained, e.g. LOAD == SAVE on a fresh pruned model:
    start it as --finetune does. The stock loop would stop, looking for optimizer state that was never saved."""
    if args.finetune or args.no_load_optim or not never_trained(state):
        return
    args.finetune = True
    if os.environ.get("RANK", "0") == "0":
        print(f"pretrain_llama.py: --load {args.load} has never been trained (iteration 0, no optimizer state): "
              "starting it as with --finetune", flush=True)


DENSE_LLAMA = ("pretrain_llama.py builds LLaMA-family layers (GQA attention, a SwiGLU MLP or SequentialMLP experts) "
               "and would ignore it")


# Megatron flags stock pretrain_gpt.py acts on but this recipe does not: (arg, what to do instead). Refused rather
# than ignored, since the run would train on as something else than asked for.
UNSUPPORTED_FLAGS: dict[str, tuple[str, str]] = {
    "--mtp-num-layers": ("mtp_num_layers", DENSE_LLAMA),
    "--multi-latent-attention": ("multi_latent_attention", DENSE_LLAMA),
    "--experimental-attention-variant": ("experimental_attention_variant", DENSE_LLAMA),
    "--heterogeneous-layers-config-path": ("heterogeneous_layers_config_path", DENSE_LLAMA),
    "--qk-l2-norm": ("qk_l2_norm", DENSE_LLAMA),
    "--spec": ("spec", "pretrain_llama.py picks megatron-core's local or Transformer Engine spec itself "
                       "(--transformer-impl)"),
    "--sft": ("sft", "pretrain_llama.py trains on indexed pretraining data; tokenize the text with "
                     "`megatron-prune data`"),
    "--fim-data": ("fim_data", "pretrain_llama.py builds plain GPTDataset samples, not fill-in-the-middle ones"),
    "--logits-load-dir": ("logits_load_dir", "distil from the teacher checkpoint itself with --kd-teacher-load "
                                             "(KD_TEACHER)"),
    "--inprocess-restart": ("inprocess_restart", "pretrain_llama.py does not wrap the loop for in-process restarts"),
}


def check_unsupported_flags(args: Any) -> None:
    """Flags the stock GPT script honours and this recipe does not, refused instead of silently ignored (some come
    from a checkpoint's args under --use-checkpoint-args, e.g. a MoE checkpoint's --num-experts)."""
    given = [flag for flag, (name, _) in UNSUPPORTED_FLAGS.items() if getattr(args, name, None) not in (None, False)]
    if getattr(args, "transformer_impl", None) == "inference_optimized":
        raise PruneError("--transformer-impl inference_optimized: for inference only; use local or "
                         "transformer_engine")
    if given:
        raise PruneError(f"{given[0]} {getattr(args, UNSUPPORTED_FLAGS[given[0]][0])!r}: not supported: "
                         f"{UNSUPPORTED_FLAGS[given[0]][1]}")


def check_document_masking(args: Any) -> None:
    """--reset-attention-mask: the dataset builds per-document causal masks and attention gets them, but only
    megatron-core's unfused local attention applies a given mask. Transformer Engine's attention (told "causal")
    and the fused causal softmax kernel ignore it, and the stock loop trains on across documents. Megatron's
    --dataloader-inter-document-masking needs packed-sequence attention, which this recipe does not build."""
    if getattr(args, "dataloader_inter_document_masking", False):
        raise PruneError("--dataloader-inter-document-masking: pretrain_llama.py does not build packed-sequence "
                         "attention, so it would be ignored; use --reset-attention-mask (with --reset-position-ids)")
    if not getattr(args, "reset_attention_mask", False):
        return
    if layer_spec_name(args) != "local":
        raise PruneError("--reset-attention-mask: Transformer Engine's causal attention ignores the per-document "
                         "mask (documents would attend to each other); train with --transformer-impl local "
                         "--no-masked-softmax-fusion, or drop the flag")
    if getattr(args, "window_size", None) is not None:
        raise PruneError(f"--reset-attention-mask with --window-size {args.window_size}: megatron-core's local "
                         "attention replaces the per-document mask with its sliding-window one (documents would "
                         "attend to each other); drop one of the two")
    if getattr(args, "masked_softmax_fusion", False) and (args.bf16 or args.fp16):  # the kernel runs in 16 bits only
        raise PruneError("--reset-attention-mask: the fused causal softmax kernel ignores the per-document mask "
                         "(documents would attend to each other); add --no-masked-softmax-fusion")


def has_validation_data(args: Any) -> bool:
    """Whether the run has a validation split: its own path, mock data, or a --split share for it."""
    if getattr(args, "valid_data_path", None) or getattr(args, "mock_data", False) or not args.split:
        return True
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    weights = parse_and_normalize_split(args.split)
    return len(weights) > 1 and weights[1] > 0


def check_schedule(args: Any) -> None:
    """Schedule settings megatron-core 0.19.2 fails on late: evaluation without validation data crashes after the
    last training step, before the final save; WSD without its decay length is a bare assertion; no
    --eval-interval is a TypeError at the first step (evaluation then runs at the end, as check_model.sh does)."""
    if args.eval_interval is None:
        samples = getattr(args, "train_samples", None)
        args.eval_interval = args.train_iters or (samples and -(-samples // args.global_batch_size)) or 1000
    if args.eval_iters and not getattr(args, "skip_train", False) and not has_validation_data(args):
        raise PruneError(f"--eval-iters {args.eval_iters} (EVAL_ITERS) but no validation data: --split {args.split} "
                         "gives it no share; hold some out (SPLIT=98,2,0), pass --valid-data-path, or set "
                         "--eval-iters 0")
    if args.lr_decay_style == "WSD" and args.lr_wsd_decay_iters is None and args.lr_wsd_decay_samples is None:
        raise PruneError("--lr-decay-style WSD needs the length of its decay phase: --lr-wsd-decay-iters N "
                         "(or --lr-wsd-decay-samples N with --train-samples)")


def validate_inputs(args: Any, scan_weights: bool = True) -> None:
    """Everything that can be wrong with the user's inputs, checked before the loop starts; ``scan_weights`` also
    reads every shard of the checkpoint and the teacher (:func:`check_weights`)."""
    check_tensorboard(args)
    check_memory_history(args)
    check_unsupported_flags(args)
    check_moe(args)
    check_parallelism(args)
    check_document_masking(args)
    check_schedule(args)
    prefixes = data_prefixes(args)
    if not prefixes and not getattr(args, "mock_data", False):
        raise PruneError("no training data: pass --data-path PREFIX (from `megatron-prune data`)")
    for prefix in prefixes:
        validate_dataset_prefix(prefix)
        check_dataset_files(prefix)
    read_sequence_counts(getattr(args, "per_dataset_sequences_path", None))  # now, not once datasets are built
    if prefixes:
        from megatron.training import get_tokenizer

        for prefix in prefixes:
            check_token_ids(prefix, get_tokenizer().vocab_size)
    ckpt_args = None
    if args.load and is_megatron_dir(args.load):
        ref = find_checkpoint(args.load, "--load")
        state = checkpoint_state(ref)
        ckpt_args = state["args"]
        if scan_weights:
            check_weights(ref, "--load")
        if args.use_checkpoint_args:
            adopt_checkpoint_args(ckpt_args, args)
        check_checkpoint_shape(ckpt_args, args, "--load")
        check_moe_shape(ckpt_args, args, "--load")
        check_expert_parallel(ckpt_args, args, "--load", args.load, ref.torch_dist)
        check_layer_spec(ckpt_args, args, "--load", args.load)
        check_vocabulary(args.load, args, "--load")
        start_untrained_checkpoint(state, args)
    elif args.load and args.finetune:
        raise PruneError(f"--load {args.load}: --finetune needs a Megatron checkpoint folder "
                         "(no latest_checkpointed_iteration.txt)")
    check_tensor_parallel(args)  # the checkpoint's sizes taken by now
    if args.kd_teacher_load:
        if args.kd_alpha == 0 and os.environ.get("RANK", "0") == "0":
            print("pretrain_llama.py: --kd-alpha 0: the teacher only reports the KD loss (one forward pass per "
                  "step, no effect on training)", flush=True)
        teacher_ref = find_checkpoint(args.kd_teacher_load, "--kd-teacher-load")
        teacher = checkpoint_args(teacher_ref)
        if scan_weights:
            check_weights(teacher_ref, "--kd-teacher-load")
        check_vocabulary(args.kd_teacher_load, args, "--kd-teacher-load")
        check_teacher(teacher, args, student_ckpt_args=ckpt_args, teacher_torch_dist=teacher_ref.torch_dist)
        check_expert_parallel(teacher, args, "--kd-teacher-load", args.kd_teacher_load, teacher_ref.torch_dist)
        check_layer_spec(teacher, args, "--kd-teacher-load", args.kd_teacher_load)
