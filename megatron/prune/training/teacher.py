"""The distillation teacher: the unpruned model, frozen, its shape from its own checkpoint and everything else from
the student's flags; the checks that it fits the student (vocabulary, TP/PP), and the pipeline plumbing that runs it
stage by stage beside the student at PP > 1."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from megatron.prune.errors import PruneError
from megatron.prune.training.checkpoints import checkpoint_args, find_checkpoint, load_model_weights
from megatron.prune.training.model import build_gpt


# The student's own pipeline layout does not fit the teacher's depth: the teacher splits its layers evenly.
TEACHER_EVEN_SPLIT: dict[str, Any] = {
    "decoder_first_pipeline_num_layers": None, "decoder_last_pipeline_num_layers": None,
    "pipeline_model_parallel_layout": None, "account_for_embedding_in_pipeline_split": False,
    "account_for_loss_in_pipeline_split": False,
}


def build_teacher(args: Any, pre_process: bool = True, post_process: bool = True) -> torch.nn.Module:
    """The frozen teacher (this pipeline stage's part of it): its shape from its checkpoint, everything else
    from the student's flags."""
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    ref = find_checkpoint(args.kd_teacher_load, "--kd-teacher-load")
    t_args = argparse.Namespace(**vars(args))
    ckpt_args = checkpoint_args(ref)
    for name in TEACHER_SHAPE_FIELDS:
        if hasattr(ckpt_args, name):
            setattr(t_args, name, getattr(ckpt_args, name))
    for name, value in TEACHER_EVEN_SPLIT.items():
        setattr(t_args, name, value)
    teacher = build_gpt(t_args, pre_process, post_process)
    try:
        load_model_weights(teacher, ref, parallel_state.get_tensor_model_parallel_rank(),
                           parallel_state.get_pipeline_model_parallel_rank(), args.pipeline_model_parallel_size,
                           parallel_state.get_expert_model_parallel_rank() if t_args.num_experts else 0,
                           args.expert_model_parallel_size if t_args.num_experts else 1)
    except PruneError as e:
        split = (f" (at PP={args.pipeline_model_parallel_size} the teacher's layers are split evenly over the stages; "
                 "a torch-format teacher saved with another split needs `megatron-prune reshard --pp "
                 f"{args.pipeline_model_parallel_size}`)") if args.pipeline_model_parallel_size > 1 else ""
        raise PruneError(f"--kd-teacher-load {args.kd_teacher_load}: {e}{split}") from None
    teacher.cuda(torch.cuda.current_device())
    if args.fp16 or args.bf16:
        teacher = Float16Module(teacher.config, teacher)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


# Shape fields a teacher takes from its own checkpoint (everything else: the student's flags).
TEACHER_SHAPE_FIELDS: tuple[str, ...] = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "normalization", "norm_epsilon", "swiglu",
    "add_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights", "rotary_base",
    "rotary_percent", "position_embedding_type", "max_position_embeddings", "padded_vocab_size",
    "apply_layernorm_1p", "use_rope_scaling", "rope_scaling_factor", "rotary_seq_len_interpolation_factor",
    "qk_layernorm", "num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax",
    "moe_router_score_function", "moe_shared_expert_intermediate_size", "moe_layer_freq", "moe_grouped_gemm",
)


def check_teacher(teacher_args: Any, student_args: Any, flag: str = "--kd-teacher-load",
                  student_ckpt_args: Any = None, teacher_torch_dist: bool = False) -> None:
    """Teacher and student must share the vocabulary (logits are compared per shard, id by id; the unpadded
    sizes our tools record tell apart vocabularies that pad to the same size), and the teacher must load at
    the student's TP and PP."""
    t_n, s_n = getattr(teacher_args, "vocab_size", None), getattr(student_ckpt_args, "vocab_size", None)
    if isinstance(t_n, int) and isinstance(s_n, int) and t_n != s_n:
        raise PruneError(f"{flag}: the teacher's vocabulary has {t_n} tokens, the student's (--load) {s_n}; "
                         "distillation needs the same vocabulary. For a student with a pruned vocabulary, give the "
                         "teacher the same one: megatron-prune vocab prune --input TEACHER --output TEACHER-vocab "
                         "--like STUDENT_TOKENIZER")
    check_teacher_layout(teacher_args, student_args, flag, teacher_torch_dist)
    t_vocab = getattr(teacher_args, "padded_vocab_size", None)
    if t_vocab != student_args.padded_vocab_size:
        raise PruneError(f"{flag}: teacher padded vocab {t_vocab} != student padded vocab "
                         f"{student_args.padded_vocab_size}; distillation needs the same vocabulary")


def check_teacher_layout(teacher_args: Any, student_args: Any, flag: str, teacher_torch_dist: bool) -> None:
    """A ``torch``-format teacher must have been saved at the student's TP and PP (``torch_dist`` reshards on
    load). At PP > 1 the teacher runs stage by stage beside the student, its own layers split evenly."""
    tp, pp = student_args.tensor_model_parallel_size, student_args.pipeline_model_parallel_size
    saved = {"TP": getattr(teacher_args, "tensor_model_parallel_size", 1),
             "PP": getattr(teacher_args, "pipeline_model_parallel_size", 1)}
    wrong = {k: v for k, v in {"TP": tp, "PP": pp}.items() if saved[k] != v}
    if wrong and not teacher_torch_dist:
        path = getattr(student_args, "kd_teacher_load", None) or "TEACHER"
        was = ", ".join(f"{k}={saved[k]}" for k in wrong)
        runs = ", ".join(f"{k}={v}" for k, v in wrong.items())
        suffix = "-".join(f"{k.lower()}{v}" for k, v in wrong.items())
        opts = " ".join(f"--{k.lower()} {v}" for k, v in wrong.items())
        raise PruneError(f"{flag}: teacher was saved at {was}, the student runs at {runs}; reshard the teacher: "
                         f"megatron-prune reshard --input {path} --output {str(path).rstrip('/')}-{suffix} {opts}")
    if pp == 1:
        return
    if getattr(student_args, "virtual_pipeline_model_parallel_size", None):
        raise PruneError(f"{flag}: distillation with a virtual pipeline (--num-layers-per-virtual-pipeline-stage, "
                         "--num-virtual-stages-per-pipeline-rank) is not supported; use plain PP")
    layers = getattr(teacher_args, "num_layers", None)
    if isinstance(layers, int) and layers % pp:
        raise PruneError(f"{flag}: the teacher's {layers} layers do not split evenly over PP={pp} stages; "
                         f"run at a PP that divides {layers}")


def carry_teacher_between_stages(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Pipeline stages exchange one tensor: let it hold the teacher's hidden states beside the student's,
    ``[s, b, h_student + h_teacher]`` (see :func:`stage_output`). Each stage hands the student its own columns
    and the teacher the rest; shapes are exchanged per message (the width is no longer ``hidden_size``)."""
    width = student.config.hidden_size
    own = student.set_input_tensor

    def set_input_tensor(input_tensor: Any) -> None:
        x = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if x is None:  # first stage
            own(None)
            teacher.set_input_tensor(None)
            return
        own(x[..., :width].contiguous())  # a copy that still routes the gradient back to ``x``
        teacher.set_input_tensor(x[..., width:].contiguous())

    student.set_input_tensor = set_input_tensor
    student.config.variable_seq_lengths = True


def stage_output(hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """What a non-last stage sends on when distilling: student and (gradient-free) teacher hidden states."""
    return torch.cat([hidden, teacher_hidden.detach().to(hidden.dtype)], dim=-1)
