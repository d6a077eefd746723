"""Format adapters behind one interface, so ``prune`` does not care what it reads or writes.

Each adapter detects its checkpoints, opens them as a :class:`~megatron.prune.selectors.TensorSource`,
checks format-specific limits on a target shape, and writes a plan's result atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .plan import PrunePlan
from .shape import ModelShape, PruneError


@dataclass(frozen=True)
class FormatAdapter:
    name: str
    detect: Callable[[Path], bool]
    open: Callable[[Path], Any]  # -> TensorSource with .shape
    check_target: Callable[..., None]  # (source, target shape, CLI options): refuse before any selection work
    write: Callable[..., Path]  # (source, plan, output, overwrite=..., **options) -> output


def _hf_adapter() -> FormatAdapter:
    from . import hf

    def write(src: "hf.HFCheckpoint", plan: PrunePlan, output: Path, overwrite: bool = False,
              max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, progress: bool = True, **_: Any) -> Path:
        return hf.prune_hf(src.folder, output, plan, overwrite, max_shard_bytes, progress)

    return FormatAdapter("hf", lambda p: (p / "config.json").is_file(), hf.HFCheckpoint.open,
                         lambda src, target, args=None: hf.check_hf_target(target), write)


def _megatron_adapter() -> FormatAdapter:
    from .megatron_ckpt import format_adapter

    return format_adapter()


# name -> factory; factories import lazily so the CLI starts fast.
ADAPTERS: dict[str, Callable[[], FormatAdapter]] = {"hf": _hf_adapter, "megatron": _megatron_adapter}


def detect_format(path: Path) -> FormatAdapter:
    path = Path(path)
    if not path.exists():
        raise PruneError(f"input {path} does not exist")
    if not path.is_dir():
        raise PruneError(f"input {path} is not a folder")
    for factory in ADAPTERS.values():
        adapter = factory()
        if adapter.detect(path):
            return adapter
    raise PruneError(f"input {path} is not a checkpoint folder of a known format ({', '.join(ADAPTERS)}): "
                     "expected config.json (HF) or latest_checkpointed_iteration.txt (Megatron)")
