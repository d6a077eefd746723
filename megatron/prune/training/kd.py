"""Knowledge distillation on vocab-parallel logits: a per-token KL(teacher || student) that is exact under tensor
parallelism (each TP rank holds a slice of the vocabulary).

The KL is computed from shard-local sums all-reduced over the TP group; its gradient w.r.t. the student's local
logits is ``(softmax(s/T) - softmax(t/T)) / T`` on the same shard, written by hand so no
autograd-through-collectives is needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron.prune.errors import PruneError


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
