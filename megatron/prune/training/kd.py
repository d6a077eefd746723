"""Knowledge distillation on vocab-parallel logits: a per-token KL(teacher || student) that is exact
under tensor parallelism (each TP rank holds a slice of the vocabulary), plus teacher checks, loading, and
the pipeline plumbing that runs the teacher stage by stage beside the student at PP > 1.

The KL is computed from shard-local sums all-reduced over the TP group; its gradient w.r.t. the
student's local logits is ``(softmax(s/T) - softmax(t/T)) / T`` on the same shard, written by hand so
no autograd-through-collectives is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..megatron_ckpt import find_iteration_dir
from ..megatron_dist import is_torch_dist
from ..shape import PruneError


def _log_softmax_parallel_(x: torch.Tensor, group: Any) -> torch.Tensor:
    """log-softmax over a vocab split across ``group`` (last dim is this rank's shard), in place on ``x``:
    vocab-sized logits are the largest tensors of a step, so no extra copy is made."""
    m = x.max(dim=-1, keepdim=True).values
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    x.sub_(m)
    z = torch.exp(x).sum(dim=-1, keepdim=True)
    if group is not None:
        dist.all_reduce(z, group=group)
    return x.sub_(torch.log(z))


class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL(p_teacher || q_student) at temperature T over vocab-parallel logits."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, group: Any):
        dtype = torch.promote_types(student.dtype, torch.float32)  # bf16 logits: KL in fp32
        log_q = _log_softmax_parallel_(student.to(dtype) / temperature, group)  # `/` makes the working copy
        log_p = _log_softmax_parallel_(teacher.to(dtype) / temperature, group)
        p = log_p.exp()
        kl = (p * log_p.sub_(log_q)).sum(dim=-1)
        if group is not None:
            dist.all_reduce(kl, group=group)
        # KL >= 0, but rounding gives ~-1e-7 for near-equal logits, and Megatron's log leaves out a negative
        # average (the KD loss of a student that matches its teacher would go unreported); the gradient stays q - p
        kl.clamp_(min=0.0)
        # backward needs only q - p: keep that one vocab-sized tensor (not log q and p)
        ctx.save_for_backward(log_q.exp_().sub_(p))
        ctx.temperature = temperature
        ctx.dtype = student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        (q_minus_p,) = ctx.saved_tensors
        grad = q_minus_p * (grad_kl.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.dtype), None, None, None


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0, group: Any = None) -> torch.Tensor:
    """``[..., v/tp]`` student and teacher logit shards → ``[...]`` KL(teacher || student) per token.

    ``group`` is the tensor-parallel group (None: the logits hold the whole vocabulary).
    """
    if student_logits.shape != teacher_logits.shape:
        raise PruneError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(student_logits.shape)}")
    if temperature <= 0:
        raise PruneError(f"--kd-temperature {temperature}: must be > 0")
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), float(temperature), group)


def distill_losses(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                   temperature: float, group: Any) -> torch.Tensor:
    """``[2, b, s]``: per-token LM loss and KL(teacher || student) from vocab-parallel logits. At ``alpha == 1``
    the LM loss is only reported, so it is computed without autograd and keeps no softmax for backward."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1.0):
        # Megatron's cross-entropy overwrites its input in place (minus max, then exp), and ``.float()`` of
        # fp32 logits is the same tensor: hand it a copy so the KL below sees the real logits.
        lm = vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), labels)
    return torch.stack([lm, vocab_parallel_kl(logits, teacher_logits, temperature, group)])


# ---------------------------------------------------------------------------------------------
# Megatron checkpoints (stock layouts: torch `mp_rank_TT[_PPP]/model_optim_rng.pt`, torch_dist)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointRef:
    """One iteration folder of a Megatron checkpoint directory."""

    root: Path
    folder: Path  # iter_XXXXXXX or release
    torch_dist: bool


def checkpoint_format(root: str | os.PathLike) -> str:
    """``torch_dist`` or ``torch`` for a Megatron checkpoint folder, ``none`` for anything else (for scripts)."""
    try:
        return "torch_dist" if find_checkpoint(root, "--load").torch_dist else "torch"
    except PruneError:  # not a checkpoint (find_iteration_dir turns a bad tracker into a PruneError too)
        return "none"


def find_checkpoint(root: str | os.PathLike, flag: str) -> CheckpointRef:
    """The latest iteration of the checkpoint at ``root`` (its tracker file); clear error naming ``flag``."""
    root = Path(root)
    try:
        folder = find_iteration_dir(root)
    except PruneError as e:
        raise PruneError(f"{flag} {e}") from None
    return CheckpointRef(root, folder, is_torch_dist(folder))


def _rank_file(ref: CheckpointRef, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    sub = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp_size > 1 else "")
    return ref.folder / sub / "model_optim_rng.pt"


def load_torch_shard(path: Path) -> dict[str, Any]:
    """One ``model_optim_rng.pt``, memory-mapped: only the tensors used are read, so reading a 70B shard's
    ``args`` costs milliseconds rather than the whole file in RAM. Legacy (non-zip) files are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_state(ref: CheckpointRef) -> dict[str, Any]:
    """Rank 0's checkpoint dict (torch: memory-mapped; torch_dist: the common state): ``args``, ``iteration``,
    and ``optimizer`` where the checkpoint holds training state."""
    if ref.torch_dist:
        from megatron.core.dist_checkpointing.serialization import load_common_state_dict

        state = load_common_state_dict(str(ref.folder))
    else:
        files = sorted(ref.folder.glob("mp_rank_00*/model_optim_rng.pt"))
        if not files:
            raise PruneError(f"checkpoint {ref.folder}: no mp_rank_00*/model_optim_rng.pt")
        state = load_torch_shard(files[0])
    if "args" not in state:
        raise PruneError(f"checkpoint {ref.folder}: no 'args' saved; cannot check its shape")
    return state


def checkpoint_args(ref: CheckpointRef) -> Any:
    """The megatron ``args`` Namespace stored in a checkpoint (rank 0's copy)."""
    return checkpoint_state(ref)["args"]


def never_trained(state: dict[str, Any]) -> bool:
    """A converted or pruned checkpoint: iteration 0 and no optimizer state (nothing to resume)."""
    return int(state.get("iteration", 0) or 0) == 0 and "optimizer" not in state


# Shape fields a teacher takes from its own checkpoint (everything else: the student's flags).
TEACHER_SHAPE_FIELDS: tuple[str, ...] = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "normalization", "norm_epsilon", "swiglu",
    "add_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights", "rotary_base",
    "rotary_percent", "position_embedding_type", "max_position_embeddings", "padded_vocab_size",
    "apply_layernorm_1p", "use_rope_scaling", "rope_scaling_factor", "rotary_seq_len_interpolation_factor",
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


def load_model_weights(model: torch.nn.Module, ref: CheckpointRef, tp_rank: int, pp_rank: int = 0,
                       pp_size: int = 1) -> None:
    """Load this rank's model weights (no optimizer, no RNG) from a stock Megatron checkpoint."""
    if ref.torch_dist:
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ref.folder))
        state = loaded["model"]
    else:
        path = _rank_file(ref, tp_rank, pp_rank, pp_size)
        if not path.is_file():
            raise PruneError(f"checkpoint {ref.root}: missing {path}")
        state = load_torch_shard(path)["model"]
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    misfit = load_misfit(model.load_state_dict(state, strict=False))
    if misfit:
        raise PruneError(f"checkpoint {ref.root}: {misfit}")


def load_misfit(incompatible: Any) -> str | None:
    """What a ``load_state_dict`` result says does not fit, TE's ``_extra_state`` aside (its metadata may
    differ); None when everything fits."""
    missing = [k for k in incompatible.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in incompatible.unexpected_keys if not k.endswith("_extra_state")]
    if not (missing or unexpected):
        return None
    return (f"the checkpoint does not fit the model: {len(missing)} missing {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}")
