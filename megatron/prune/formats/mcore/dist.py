"""Megatron ``torch_dist`` checkpoints (megatron.core.dist_checkpointing): read as a TensorSource, written
from a torch-format checkpoint with megatron-core's own saver.

In this format every tensor is stored once, globally: per-layer parameters are stacked on a leading layer
axis (``decoder.layers.self_attention.linear_qkv.weight`` is ``[L, ng*(np/ng+2)*hn, h]``), ``linear_qkv``
is the global per-group interleave, ``linear_fc1`` the global ``[gate; up]``, and both layer specs use the
Transformer Engine names for the norms. Tensors are read one parameter at a time with
``torch.distributed.checkpoint`` (no process group needed); ``args`` come from the common state.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from tqdm import tqdm

from megatron.prune.core.roles import has_role, stored_role
from megatron.prune.errors import PruneError
from megatron.prune.formats.mcore.args import hf_config_from_args, meta_config_and_shape
from megatron.prune.formats.mcore.read import CheckpointHeader
from megatron.prune.formats.source import check_finite
from megatron.prune.formats.mcore.schema import (CHECKPOINT_VERSION, EXTRA_STATE, PARAM_BY_KEY, PARAM_OF_ROLE,
                                                 PARAMS, Param, check_tp_pp, dist_name, params_for, stored_shape,
                                                 unfuse)

METADATA_FILE = "metadata.json"
SKIPPED = ("optimizer.", "rng_state", "rerun_state_machine", "common_state")  # not carried over


def is_torch_dist(iter_dir: Path) -> bool:
    meta = Path(iter_dir) / METADATA_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("sharded_backend") == "torch_dist"
    except (OSError, json.JSONDecodeError):
        return False


@dataclass
class TorchDistCheckpoint(CheckpointHeader):
    """A torch_dist checkpoint opened lazily; ``get`` returns full logical tensors like MegatronCheckpoint's."""

    metadata: Any
    _cache: tuple[str | None, torch.Tensor | None] = field(default=(None, None), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    ep: int = 1  # torch_dist checkpoints of mixture-of-experts models are refused, so no experts to split

    @classmethod
    def open(cls, folder: Path, iter_dir: Path) -> "TorchDistCheckpoint":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from megatron.core.dist_checkpointing import load_common_state_dict

        try:
            metadata = dcp.FileSystemReader(str(iter_dir)).read_metadata()
            check_storage_files(iter_dir, metadata)  # the common state is read from them too
            common = load_common_state_dict(str(iter_dir))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - unreadable input is a user error
            if isinstance(e, PruneError):
                raise
            raise PruneError(f"cannot read torch_dist checkpoint {iter_dir}: {first_line(e)}") from None
        args = common.get("args")
        if args is None:
            raise PruneError(f"{iter_dir}: the common state has no 'args'; not a Megatron-LM checkpoint")
        hf_config, shape = meta_config_and_shape(folder, args)
        if shape.is_moe:
            raise PruneError(f"{folder}: a torch_dist checkpoint of a mixture-of-experts model ({shape.num_experts} "
                             "experts); only torch-format MoE checkpoints are read so far")
        tp = int(getattr(args, "tensor_model_parallel_size", 1))
        pp = int(getattr(args, "pipeline_model_parallel_size", 1))
        spec = getattr(args, "transformer_impl", "local")
        embed = metadata.state_dict_metadata.get(dist_name(PARAM_BY_KEY["embed"]))
        if embed is None:
            raise PruneError(f"{iter_dir}: no {dist_name(PARAM_BY_KEY['embed'])} in the checkpoint")
        padded = int(getattr(args, "padded_vocab_size", None) or embed.size[0])
        ckpt = cls(folder, iter_dir, args, shape, tp, pp, "transformer_engine" if spec == "transformer_engine" else
                   "local", padded, embed.properties.dtype,
                   hf_config or hf_config_from_args(args, shape, embed.properties.dtype),
                   metadata)
        check_tp_pp(shape, tp, pp, what="checkpoint: ")
        ckpt._check_names()
        return ckpt

    def _check_names(self) -> None:
        want = {dist_name(p): p for p in PARAMS if self._holds(p)}
        keys = {k.split("/shard_")[0] for k in self.metadata.state_dict_metadata}
        unknown = sorted(k for k in keys - set(want) if not k.endswith("._extra_state") and not k.startswith(SKIPPED))
        if unknown:
            raise PruneError(f"{self.iter_dir}: unknown tensor(s) {unknown[:6]} for a LLaMA-family GPTModel")
        missing = sorted(set(want) - keys)
        if missing:
            raise PruneError(f"{self.iter_dir}: missing tensor(s) {missing[:6]}")
        for name, p in want.items():
            size = tuple(self.metadata.state_dict_metadata[name].size)
            if size != self._global_shape(p):
                raise PruneError(f"{self.iter_dir}: {name} has shape {size}, args imply {self._global_shape(p)}")

    def _holds(self, p: Param) -> bool:
        return has_role(self.shape, p.roles[0])

    def _global_shape(self, p: Param) -> tuple[int, ...]:
        one = stored_shape(p, self.shape, self.padded_vocab)
        return (self.shape.num_layers, *one) if p.per_layer else one

    def _load(self, name: str, layer: int | None = None) -> torch.Tensor:
        """One global tensor, or one layer of a per-layer one (only that layer's bytes are read); the last one read
        stays cached, so q, k and v (gate, up) of a layer come from one read."""
        if self._cache[0] != (name, layer):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.api import CheckpointException

            self._cache = (None, None)
            md = self.metadata.state_dict_metadata[name]
            size = tuple(md.size) if layer is None else (1, *md.size[1:])
            sd = {name: torch.empty(size, dtype=md.properties.dtype)}
            try:
                dcp.load(sd, storage_reader=dcp.FileSystemReader(str(self.iter_dir)), no_dist=True,
                         planner=None if layer is None else _layer_planner(name, layer))
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - a damaged file (DCP wraps what it met)
                raise PruneError(f"cannot read {name} from torch_dist checkpoint {self.iter_dir}: "
                                 f"{first_line(e)} (truncated or corrupt .distcp file?)") from None
            where = f"{self.iter_dir}: {name}" + ("" if layer is None else f" (layer {layer})")
            self._cache = ((name, layer), check_finite(sd[name] if layer is None else sd[name][0], where))
        return self._cache[1]

    def release(self) -> None:
        """Drop the cached tensor."""
        self._cache = (None, None)

    def get(self, role: str, layer: int | None = None) -> torch.Tensor:
        with self._lock:  # the writer's threads share the one cached tensor
            return self._get(role, layer)

    def _get(self, role: str, layer: int | None) -> torch.Tensor:
        param = PARAM_OF_ROLE[stored_role(role, self.shape)]
        t = self._load(dist_name(param), layer if param.per_layer else None)
        s = self.shape
        part = unfuse(param, t, s.num_query_groups, s.num_attention_heads, s.head_dim)
        out = part["embed" if param.key == "embed" else role].to(self.dtype)
        return out[: s.vocab_size].contiguous() if role in ("embed", "lm_head") else out.contiguous()


def first_line(e: BaseException) -> str:
    """What went wrong, in one line: a DCP CheckpointException (a BaseException holding each rank's error and its
    traceback) by the first rank's error; any other error by the first line of its message."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def check_storage_files(iter_dir: Path, metadata: Any) -> None:
    """Every ``.distcp`` file the metadata reads from is there and long enough: a missing or truncated one is
    refused now, by name, not as a reader's traceback halfway through the work."""
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        if hasattr(info, "relative_path"):  # a file-system storage record
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        path = Path(iter_dir) / name
        if not path.is_file():
            raise PruneError(f"torch_dist checkpoint {iter_dir}: {name} is missing (its metadata reads from it)")
        if path.stat().st_size < size:
            raise PruneError(f"torch_dist checkpoint {iter_dir}: {name} is truncated ({path.stat().st_size} bytes, "
                             f"its metadata reads up to byte {size})")


def model_tensors(iter_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every model tensor of a torch_dist iteration folder, whatever model it holds (optimizer and
    RNG state skipped), a stacked per-layer tensor one layer at a time (named ``NAME[layer]``): a scan of the whole
    checkpoint that holds one layer's tensor at a time."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(iter_dir)).read_metadata()
    check_storage_files(iter_dir, metadata)
    for name, md in sorted(metadata.state_dict_metadata.items()):
        if not isinstance(md, TensorStorageMetadata) or name.startswith(SKIPPED):
            continue
        stacked = name.startswith("decoder.layers.") and len(md.size) > 1
        for layer in range(md.size[0]) if stacked else [None]:
            size = tuple(md.size) if layer is None else (1, *md.size[1:])
            sd = {name: torch.empty(size, dtype=md.properties.dtype)}
            dcp.load(sd, storage_reader=dcp.FileSystemReader(str(iter_dir)), no_dist=True,
                     planner=None if layer is None else _layer_planner(name, layer))
            yield (name, sd[name]) if layer is None else (f"{name}[{layer}]", sd[name][0])


def _layer_planner(name: str, layer: int):
    """A DCP load planner that reads only index ``layer`` of the stacked tensor ``name`` into a ``[1, ...]`` tensor:
    stock planners read the whole (all-layers) tensor, so reading layer by layer would cost L times the checkpoint."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, LoadPlan
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class LayerPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            md = self.metadata.state_dict_metadata[name]
            chunk = ChunkStorageMetadata(offsets=torch.Size([layer] + [0] * (len(md.size) - 1)),
                                         sizes=torch.Size([1, *md.size[1:]]))
            return LoadPlan(create_read_items_for_chunk_list(name, md, [chunk]))

        def lookup_tensor(self, index):  # the destination holds just the chunk asked for
            return self.state_dict[index.fqn]

    return LayerPlanner()


# ---- writing -------------------------------------------------------------------------------------


def dist_extra_state_names(spec: str) -> list[str]:
    """Per-layer ``_extra_state`` keys megatron-core's sharded state dict has (GPTModel drops the output layer's)."""
    return [t.replace("decoder.layers.{}.", "decoder.layers.") for t in EXTRA_STATE[spec] if "{}" in t]


def sharded_state_dict(ckpt: Any, shard: Mapping[str, Any], tp_rank: int, pp_rank: int) -> dict[str, Any]:
    """megatron-core's sharded state dict for one torch-format shard, built the way its layers build theirs:
    per-layer tensors get a leading layer axis, TP-split tensors their rank's offset on the split axis,
    ``linear_fc1`` two pieces (gate and up parts of ``[gate; up]``), replicated tensors only from TP rank 0
    (the main replica), ``_extra_state`` one ShardedObject per layer."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    s, tp = ckpt.shape, ckpt.tp
    L = s.num_layers
    out: dict[str, Any] = {}

    def add(param: Param, t: torch.Tensor, layer: int | None, tag: str) -> None:
        pre = () if layer is None else ((0, layer, L),)
        n = len(pre)
        key = dist_name(param)
        if param.tp_axis is None:
            if tp_rank == 0:
                out[tag] = ShardedTensor.from_rank_offsets(key, t, *pre, replica_id=0, prepend_axis_num=n)
        elif param.key == "fc1":  # swiglu: rank r holds chunks r (gate) and tp + r (up) of 2*tp
            gate, up = t.chunk(2, dim=0)
            out[tag + ".gate"] = ShardedTensor.from_rank_offsets(key, gate, *pre, (n, tp_rank, 2 * tp),
                                                                 replica_id=0, prepend_axis_num=n)
            out[tag + ".up"] = ShardedTensor.from_rank_offsets(key, up, *pre, (n, tp + tp_rank, 2 * tp),
                                                               replica_id=0, prepend_axis_num=n)
        else:
            out[tag] = ShardedTensor.from_rank_offsets(key, t, *pre, (n + param.tp_axis, tp_rank, tp),
                                                       replica_id=0, prepend_axis_num=n)

    first, last = pp_rank == 0, pp_rank == ckpt.pp - 1
    model_params, layer_params = params_for(s, first, last)
    for p in model_params:
        if not has_role(s, p.roles[0]):
            continue  # a tied output layer is the embedding (megatron-core saves it once)
        add(p, shard[p.name(ckpt.spec)], None, f"{tp_rank}:{p.name(ckpt.spec)}")
    for i in range(ckpt.layers_per_stage):
        g = pp_rank * ckpt.layers_per_stage + i
        for p in layer_params:
            add(p, shard[p.name(ckpt.spec, i)], g, f"{tp_rank}:{p.name(ckpt.spec, g)}")
        if tp_rank == 0:
            for key in dist_extra_state_names(ckpt.spec):
                out[f"{key}.{g}"] = ShardedObject(key, None, (L,), (g,), replica_id=0)
    return out


@contextmanager
def single_process_group(scratch: Path) -> Iterator[None]:
    """A one-process gloo group for megatron-core's saver (a file store: no port, no network)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise PruneError("writing torch_dist here needs a single process; run it outside torchrun")
        yield
        return
    dist.init_process_group("gloo", store=dist.FileStore(str(scratch / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def torch_to_dist(folder: Path, progress: bool = True) -> None:
    """Rewrite the torch-format checkpoint in ``folder`` as torch_dist, in place, with megatron-core's own saver.

    The saver assumes CUDA in places, so it runs in a child process that installs the CPU shims
    (:mod:`megatron.prune.cpu`) without leaking them into this one.
    """
    cmd = ([sys.executable, "-m", "megatron.prune.formats.mcore.dist", str(folder)]
           + ([] if progress else ["--no-progress"]))
    proc = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise PruneError(f"writing torch_dist failed: {proc.stderr.strip()[-2000:]}")


def _torch_to_dist_here(folder: Path, progress: bool) -> None:
    """The body of :func:`torch_to_dist`. The torch shards are memory-mapped (file pages, not anonymous
    memory) and removed once the torch_dist iteration folder is complete."""
    from megatron.core import dist_checkpointing

    from megatron.prune.cpu import apply_cpu_shims
    from megatron.prune.formats.mcore.read import MegatronCheckpoint, find_iteration_dir, load_shard

    apply_cpu_shims()  # no-op with a GPU
    ckpt = MegatronCheckpoint.open(folder, find_iteration_dir(folder))
    args = argparse.Namespace(**vars(ckpt.args))
    args.ckpt_format = "torch_dist"
    state: dict[str, Any] = {}
    for (t, p), path in tqdm(sorted(ckpt.files.items()), desc="collecting shards", unit="shard",
                             disable=not progress):
        state.update(sharded_state_dict(ckpt, load_shard(path)["model"], t, p))
    target = ckpt.iter_dir.with_name(ckpt.iter_dir.name + ".dist")
    target.mkdir()
    with tempfile.TemporaryDirectory(prefix="mp-dist-") as scratch, single_process_group(Path(scratch)):
        dist_checkpointing.save({"model": state, "args": args, "checkpoint_version": CHECKPOINT_VERSION,
                                 "iteration": 0}, str(target))
    del state
    ckpt.release()
    shutil.rmtree(ckpt.iter_dir)
    target.rename(ckpt.iter_dir)


if __name__ == "__main__":
    _torch_to_dist_here(Path(sys.argv[1]), "--no-progress" not in sys.argv[2:])
