"""The Megatron checkpoints a training run reads: the one it resumes or starts from (``--load``) and the distillation
teacher. Stock layouts: torch ``mp_rank_TT[_PPP]/model_optim_rng.pt`` and torch_dist; shards are read by the same
safe, memory-mapped loader as the format adapter's (:func:`megatron.prune.formats.mcore.read.load_shard`)."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron.prune.errors import PruneError
from megatron.prune.formats.mcore.dist import is_torch_dist
from megatron.prune.formats.mcore.read import find_iteration_dir, load_shard
from megatron.prune.formats.mcore.schema import MODEL_FILE, shard_dir_name


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


def _rank_file(ref: CheckpointRef, tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0,
               ep_size: int = 1) -> Path:
    return ref.folder / shard_dir_name(tp_rank, pp_rank, pp_size, ep_rank, ep_size) / MODEL_FILE


def checkpoint_state(ref: CheckpointRef) -> dict[str, Any]:
    """Rank 0's checkpoint dict (torch: memory-mapped; torch_dist: the common state): ``args``, ``iteration``,
    and ``optimizer`` where the checkpoint holds training state."""
    if ref.torch_dist:
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing.serialization import load_common_state_dict
        from torch.distributed.checkpoint.api import CheckpointException

        from megatron.prune.formats.mcore.dist import check_storage_files, first_line

        try:
            check_storage_files(ref.folder, dcp.FileSystemReader(str(ref.folder)).read_metadata())
            state = load_common_state_dict(str(ref.folder))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's own is a BaseException
            if isinstance(e, PruneError):
                raise
            raise PruneError(f"checkpoint {ref.folder}: cannot read it ({first_line(e)})") from None
    else:
        files = sorted(ref.folder.glob(f"mp_rank_00*/{MODEL_FILE}"))
        if not files:
            raise PruneError(f"checkpoint {ref.folder}: no mp_rank_00*/model_optim_rng.pt")
        state = load_shard(files[0])
    if "args" not in state:
        raise PruneError(f"checkpoint {ref.folder}: no 'args' saved; cannot check its shape")
    return state


def checkpoint_args(ref: CheckpointRef) -> Any:
    """The megatron ``args`` Namespace stored in a checkpoint (rank 0's copy)."""
    return checkpoint_state(ref)["args"]


def saved_expert_parallel(args: Any) -> int:
    """The expert-parallel size a checkpoint's args record (1 for a dense model or none recorded)."""
    return int(getattr(args, "expert_model_parallel_size", None) or 1) if getattr(args, "num_experts", None) else 1


def saved_layer_spec(root: str | os.PathLike) -> str | None:
    """The layer spec a Megatron checkpoint's args record (``local`` or ``transformer_engine``); None where they say
    none or ``root`` is no Megatron checkpoint."""
    try:
        return getattr(checkpoint_args(find_checkpoint(root, "--load")), "transformer_impl", None)
    except PruneError:
        return None


def never_trained(state: dict[str, Any]) -> bool:
    """A converted or pruned checkpoint: iteration 0 and no optimizer state (nothing to resume)."""
    return int(state.get("iteration", 0) or 0) == 0 and "optimizer" not in state


def load_model_weights(model: torch.nn.Module, ref: CheckpointRef, tp_rank: int, pp_rank: int = 0,
                       pp_size: int = 1, ep_rank: int = 0, ep_size: int = 1) -> None:
    """Load this rank's model weights (no optimizer, no RNG) from a stock Megatron checkpoint (a MoE one's
    expert-parallel shard ``ep_rank`` of ``ep_size``)."""
    if ref.torch_dist:
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ref.folder))
        state = loaded["model"]
    else:
        path = _rank_file(ref, tp_rank, pp_rank, pp_size, ep_rank, ep_size)
        if not path.is_file():
            raise PruneError(f"checkpoint {ref.root}: missing {path}")
        state = load_shard(path)["model"]
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


def check_weights(ref: CheckpointRef, flag: str) -> None:
    """Every shard of the checkpoint there, readable and free of NaN/Inf, before start-up: a missing or truncated
    shard, or NaN weights, would otherwise stop the run after start-up, on each rank, as tracebacks. Reads the
    whole checkpoint (memory-mapped, one shard or layer at a time)."""
    from megatron.prune.formats.mcore.dist import first_line, model_tensors
    from megatron.prune.formats.mcore.read import load_shard
    from megatron.prune.formats.source import check_finite

    if ref.torch_dist:
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            for name, t in model_tensors(ref.folder):
                check_finite(t, f"{flag} {ref.root}: {name}")
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a damaged file; DCP's own is a BaseException
            if isinstance(e, PruneError):
                raise
            raise PruneError(f"{flag} {ref.root}: cannot read the checkpoint ({first_line(e)})") from None
        return
    args = checkpoint_args(ref)
    tp, pp = int(getattr(args, "tensor_model_parallel_size", 1)), int(getattr(args, "pipeline_model_parallel_size", 1))
    ep = saved_expert_parallel(args)
    for t_rank, p_rank, e_rank in itertools.product(range(tp), range(pp), range(ep)):
        path = _rank_file(ref, t_rank, p_rank, pp, e_rank, ep)
        if not path.is_file():
            raise PruneError(f"{flag} {ref.root}: missing shard {path} (its args say TP={tp} PP={pp}"
                             f"{f' EP={ep}' if ep > 1 else ''})")
        state = load_shard(path)  # a truncated or corrupt shard is refused by name here
        # "model", or "model0", "model1", ... with virtual pipeline stages
        for key in [k for k in state if k == "model" or (k.startswith("model") and k[5:].isdigit())]:
            for name, t in state[key].items():
                if isinstance(t, torch.Tensor):
                    check_finite(t, f"{flag} {path}: {name}")
        del state
