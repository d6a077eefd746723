"""The slicing rules, written once for every format.

Each logical parameter of a LLaMA-family model has a *role* whose dimensions are named axes
(``ROLE_AXES``). Pruning a tensor is ``index_select`` along each named axis with the kept indices
for that axis. Format adapters map their parameter names to roles (and unfuse fused tensors such
as Megatron's ``linear_qkv``) and never slice on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from megatron.prune.core.plan import LayerPlan, PrunePlan
from megatron.prune.core.roles import FIXED_AXES, HEAD_AXES, NORM_ROLES, ROLE_AXES

@dataclass(frozen=True)
class AxisIndex:
    """Kept indices per axis for one layer (or the model-level tensors); None keeps the axis whole."""

    hidden: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    groups: tuple[int, ...] | None = None
    ffn: tuple[int, ...] | None = None
    vocab: tuple[int, ...] | None = None
    experts: tuple[int, ...] | None = None
    expert_ffn: tuple[int, ...] | None = None  # of the one expert a tensor belongs to

    def for_axis(self, axis: str) -> tuple[int, ...] | None:
        return getattr(self, axis)


def layer_index(plan: PrunePlan, lp: LayerPlan, expert: int | None = None) -> AxisIndex:
    """Axis indices of a kept layer, in the full (unsharded) source numbering; with ``expert`` (the kept expert's
    position in ``lp.experts``), those of that expert's tensors."""
    ffn = None if expert is None else lp.expert_ffn[expert]
    return AxisIndex(hidden=plan.hidden, heads=lp.heads, groups=lp.query_groups, ffn=lp.ffn,
                     experts=lp.experts or None, expert_ffn=ffn)


def model_index(plan: PrunePlan) -> AxisIndex:
    """Axis indices of the model-level tensors (embeddings, final norm)."""
    return AxisIndex(hidden=plan.hidden, vocab=plan.vocab)


def expand_heads(units: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row indices of whole heads: head i owns rows [i*hn, (i+1)*hn)."""
    u = torch.as_tensor(list(units), dtype=torch.long)
    return (u[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def slice_role(role: str, tensor: torch.Tensor, index: AxisIndex, head_dim: int,
               norm_scale: float = 1.0) -> torch.Tensor:
    """Prune ``tensor`` (of logical role ``role``) to the kept indices; returns a new contiguous tensor. Axes in
    ``FIXED_AXES`` (a QK-norm's ``[hn]``) are kept whole, and only hidden-size norms are rescaled."""
    axes = ROLE_AXES[role]
    if tensor.dim() != len(axes):
        raise ValueError(f"{role}: expected {len(axes)} dims {axes}, got shape {tuple(tensor.shape)}")
    out = tensor
    for dim, axis in enumerate(axes):
        keep = None if axis in FIXED_AXES else index.for_axis(axis)
        if keep is None:
            continue
        rows = expand_heads(keep, head_dim) if axis in HEAD_AXES else torch.as_tensor(list(keep), dtype=torch.long)
        if rows.numel() == out.shape[dim] and torch.equal(rows, torch.arange(out.shape[dim])):
            continue  # keep-all on this axis: no copy, so identity plans stay bit-exact
        out = _take(out, dim, rows)
    if role in NORM_ROLES and norm_scale != 1.0:
        out = out * norm_scale
    return out.contiguous() if out is not tensor else tensor


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_view_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The integer dtype of ``t``'s element size, to gather its bits through numpy (whose take is faster than
    index_select, bf16 included); None where numpy cannot see the tensor (off the CPU, in an autograd graph)."""
    if t.requires_grad or t.device.type != "cpu":
        return None
    return _SAME_SIZE_INT.get(t.dtype.itemsize)


def _take(t: torch.Tensor, dim: int, rows: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, rows)``, bit for bit, on ``t``'s device; numpy's take is ~3x faster for dim > 0 on the
    CPU (bf16 included)."""
    as_int = int_view_dtype(t)
    if dim == 0 or as_int is None:
        return t.index_select(dim, rows.to(t.device))  # a CUDA tensor needs its index on the GPU too
    return torch.from_numpy(t.view(as_int).numpy().take(rows.numpy(), axis=dim)).view(t.dtype)


def shift(index: Sequence[int] | None, lo: int, hi: int) -> tuple[int, ...] | None:
    """Indices inside [lo, hi) re-based to start at 0: the kept part of one tensor-parallel slice."""
    if index is None:
        return None
    a = np.asarray(index, dtype=np.int64)
    return tuple((a[(a >= lo) & (a < hi)] - lo).tolist())


def tp_slice_index(index: AxisIndex, shape_units: Mapping[str, int], tp: int, rank: int) -> AxisIndex:
    """The part of ``index`` that falls in tensor-parallel slice ``rank`` of ``tp``, re-based.

    ``shape_units`` gives the source size of each TP-split axis (heads, groups, ffn, vocab); hidden is
    never split by TP in LLaMA-family layers.
    """
    kw = {}
    for axis in ("heads", "groups", "ffn", "vocab", "expert_ffn"):
        n = shape_units.get(axis)
        keep = index.for_axis(axis)
        if keep is None or n is None:
            kw[axis] = keep
            continue
        per = n // tp
        kw[axis] = shift(keep, rank * per, (rank + 1) * per)
    return AxisIndex(hidden=index.hidden, experts=index.experts, **kw)
