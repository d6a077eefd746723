"""What every format adapter provides: a TensorSource (read one logical tensor at a time) and a FormatAdapter (open,
check a target, write a plan's result), with the options a write takes as one typed record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from megatron.prune.core.shape import ModelShape
from megatron.prune.errors import PruneError

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def check_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse a tensor read from a checkpoint that holds NaN or Inf, by name: pruned and written on, the damage would
    reach the output without a word (and activation scores would be NaN). One min/max pass (NaN propagates through
    both; no overflow, unlike a sum), cheaper than a copy; the count is taken only for the message."""
    if not t.is_floating_point() or t.numel() == 0:
        return t
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return t
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    raise PruneError(f"{name} holds {nan} NaN and {inf} Inf value(s): the checkpoint is damaged (a diverged run, a "
                     "bad conversion or a corrupt file)")


class TensorSource(Protocol):
    """Read access to a checkpoint's logical (unsharded, unfused) tensors, one at a time."""

    folder: Path  # the checkpoint folder
    shape: ModelShape
    tp: int  # tensor-parallel size it is stored at (1 for HF)
    ep: int  # expert-parallel size it is stored at (1 for HF and dense models)

    @property
    def hf_config(self) -> dict[str, Any]:
        """The HF config of the model (an HF checkpoint's own; a Megatron checkpoint's hf_meta/ or args)."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype a Megatron output records for the model."""
        ...

    def get(self, role: str, layer: int | None = None) -> torch.Tensor: ...

    def has(self, role: str, layer: int | None = None) -> bool: ...

    def dtype_code(self, role: str, layer: int | None = None) -> str:
        """The safetensors dtype code ("F32", "BF16", ...) of a tensor, without reading it."""
        ...

    def release(self) -> None:
        """Let go of what is held open (memory-mapped shards, cached tensors)."""
        ...


class TensorOverrides(Protocol):
    """Tensors of the pruned model that replace the plan's slices (refitted weights), by role, *output* layer and
    *output* expert (its position among the layer's kept experts), already in the target shape and the source's
    dtype."""

    def has(self, role: str, layer: int | None = None, expert: int | None = None) -> bool: ...

    def get(self, role: str, layer: int | None = None, expert: int | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class WriteOptions:
    """How an adapter writes a plan's result; each adapter reads the fields that concern it."""

    overwrite: bool = False
    progress: bool = True
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES  # HF output: split safetensors files above this size
    prune_type: str = "balance"  # Megatron: prune each TP shard on its own (balance) or select globally
    tp: int | None = None  # Megatron output TP (unbalance only); None: the input's
    pp: int | None = None  # Megatron output PP; None: the input's
    ckpt_format: str = "torch"  # Megatron output format


@dataclass(frozen=True)
class FormatAdapter:
    """One checkpoint format: open a folder as a TensorSource, refuse a target it cannot write (before any selection
    work), write a plan's result atomically (with :class:`TensorOverrides` in place of some slices)."""

    name: str
    open: Callable[[Path], Any]  # -> TensorSource
    check_target: Callable[[Any, ModelShape, WriteOptions], None]
    write: Callable[..., Path]  # (source, plan, output, options, overrides=None) -> output
