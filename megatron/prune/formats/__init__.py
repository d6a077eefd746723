"""Format adapters behind one interface, so ``prune`` does not care what it reads or writes.

:mod:`.folder` tells what a folder holds (:func:`~.folder.open_model`); each adapter opens its checkpoints as a
:class:`~.source.TensorSource`, checks format-specific limits on a target shape, and writes a plan's result
atomically. HF safetensors: :mod:`.hf` (with :mod:`.safetensors`); Megatron: :mod:`.mcore` (schema, args, read,
write, dist, ops).
"""

from __future__ import annotations

from typing import Callable

from megatron.prune.formats.source import FormatAdapter


def _hf() -> FormatAdapter:
    from megatron.prune.formats.hf import format_adapter

    return format_adapter()


def _megatron() -> FormatAdapter:
    from megatron.prune.formats.mcore.ops import format_adapter

    return format_adapter()


# folder kind -> adapter factory; factories import lazily so the CLI starts fast.
ADAPTERS: dict[str, Callable[[], FormatAdapter]] = {"hf": _hf, "megatron": _megatron}
