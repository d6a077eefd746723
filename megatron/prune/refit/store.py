"""Refitted tensors of the pruned model, kept on disk until the format adapter writes them.

One safetensors file per output layer (and one for the model-level tensors) in a scratch folder beside the output,
so a refit of a 70B model holds one layer in memory, and the writers read each tensor when they come to it
(:class:`megatron.prune.formats.source.TensorOverrides`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MODEL_LEVEL = "model"


def key(role: str, expert: int | None = None) -> str:
    """The name a tensor is stored under: its role, and ``role.k`` for kept expert k's."""
    return role if expert is None else f"{role}.{expert}"


class RefitStore:
    """Tensors by (role, output layer, output expert) in ``folder``; ``layer`` None for model-level tensors (final
    norm, lm_head); ``expert`` the position among the layer's kept experts for per-expert tensors. :meth:`put` takes
    them by :func:`key`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._roles: dict[int | None, set[str]] = {}

    def _file(self, layer: int | None) -> Path:
        return self.folder / f"{MODEL_LEVEL if layer is None else f'layer_{layer:05d}'}.safetensors"

    def put(self, layer: int | None, tensors: dict[str, torch.Tensor]) -> None:
        """Store the refitted tensors of one output layer (or the model-level ones), replacing what was there."""
        if not tensors:
            return
        save_file({role: t.contiguous() for role, t in tensors.items()}, str(self._file(layer)))
        self._roles[layer] = set(tensors)

    def has(self, role: str, layer: int | None = None, expert: int | None = None) -> bool:
        return key(role, expert) in self._roles.get(layer, ())

    def get(self, role: str, layer: int | None = None, expert: int | None = None) -> torch.Tensor:
        if not self.has(role, layer, expert):
            raise KeyError(f"no refitted {key(role, expert)} for layer {layer}")
        with safe_open(str(self._file(layer)), framework="pt") as f:
            return f.get_tensor(key(role, expert))

    def roles(self) -> dict[int | None, set[str]]:
        """What was refitted, by output layer."""
        return {k: set(v) for k, v in self._roles.items()}
