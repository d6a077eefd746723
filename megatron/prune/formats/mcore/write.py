"""Writing Megatron-LM ``torch``-format checkpoints: the output layout, the stored tensors of each output shard (from
the plan applied to whole logical tensors, or, for balanced pruning, gathered straight from the input shard), and the
threaded shard writer that streams each tensor into its file as it is computed."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from megatron.prune.core.plan import PLAN_FILE, PrunePlan
from megatron.prune.core.roles import NORM_ROLES, ROLE_AXES
from megatron.prune.core.shape import ModelShape, hf_config_for_shape
from megatron.prune.core.slicing import AxisIndex, int_view_dtype, layer_index, model_index, slice_role, tp_slice_index
from megatron.prune.formats.mcore.read import WORKERS, MegatronCheckpoint
from megatron.prune.formats.mcore.schema import (CHECKPOINT_VERSION, EXTRA_STATE, META_DIR, MODEL_FILE, MOE_PARAMS,
                                                 PARAM_OF_ROLE, TRACKER, Param, extra_state_names, fuse,
                                                 layer_param_names, model_role, pad_vocab, params_for, rank_index,
                                                 shard_keys, shard_path_name, tp_units, unfuse)
from megatron.prune.formats.source import TensorOverrides
from megatron.prune.io.atomic import copy_side_files
from megatron.prune.io.memory import BufferPool, ordered_map
from megatron.prune.io.torch_stream import TorchStreamWriter

# (role, layer, r[, expert]) -> rank-local pruned logical tensor for output rank r (expert: its output number)
RoleFn = Callable[..., torch.Tensor]


# (param, layer, r[, expert]) -> output rank r's stored megatron-core tensor of param (layer None: a model-level
# param; expert: the output expert of a per-expert param)
ParamFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """How an output checkpoint is split and named."""

    shape: ModelShape
    tp: int
    pp: int
    spec: str
    padded_vocab: int
    ep: int = 1  # expert-parallel size: each EP rank's shards hold num_experts / ep of the experts
    grouped: bool = False  # experts named as TEGroupedMLP's (grouped GEMM) instead of SequentialMLP's

    @property
    def layers_per_stage(self) -> int:
        return self.shape.num_layers // self.pp

    @property
    def local_experts(self) -> int:
        return self.shape.num_experts // self.ep


def global_roles(src: Any, plan: PrunePlan, layout: Layout, overrides: TensorOverrides | None = None) -> RoleFn:
    """Gather the full logical tensor, apply the plan (or take its override), pad the vocab, take output rank r's
    TP slice."""
    units = tp_units(plan.target, layout.padded_vocab)
    hn = src.shape.head_dim

    def get(role: str, layer: int | None, r: int, expert: int | None = None) -> torch.Tensor:
        if overrides is not None and overrides.has(role, layer, expert):
            t = overrides.get(role, layer, expert)
        elif layer is None:
            t = slice_role(role, src.get(role), model_index(plan), hn, plan.norm_scale)
        else:
            lp = plan.layers[layer]
            where = () if expert is None else (lp.experts[expert],)  # the source expert it comes from
            t = slice_role(role, src.get(role, lp.source_layer, *where), layer_index(plan, lp, expert), hn,
                           plan.norm_scale)
        if layer is None and "vocab" in ROLE_AXES[role]:
            t = pad_vocab(t, layout.padded_vocab)
        return slice_role(role, t, rank_index(units, layout.tp, r), hn)

    return get


def fused_params(roles: RoleFn, layout: Layout) -> ParamFn:
    """Stored tensors from rank-local logical tensors: fuse q/k/v and gate/up per output rank."""
    ng_local = layout.shape.num_query_groups // layout.tp

    def get(param: Param, layer: int | None, r: int, expert: int | None = None) -> torch.Tensor:
        if layer is None:
            return roles(model_role(param, layout.shape), None, r)
        where = () if expert is None else (expert,)
        return fuse(param, {role: roles(role, layer, r, *where) for role in param.roles}, ng_local)

    return get


def global_params(src: Any, plan: PrunePlan, layout: Layout, overrides: TensorOverrides | None = None) -> ParamFn:
    """:func:`global_roles`, fused: any TP/PP in, any TP/PP out."""
    return fused_params(global_roles(src, plan, layout, overrides), layout)


_GATHER_BLOCK_BYTES = 512 * 1024  # rows gathered per step: a quarter of a 2 MiB L2 (measured best)


GATHER_BUFFERS = BufferPool()  # shared by balanced pruning (takes) and write_shard (gives back)


def _check_range(index: np.ndarray, n: int) -> None:
    """``np.take(mode="wrap")`` (its fastest mode; the same as the others for in-range indices) does not raise on
    an index out of range: raise as index_select would."""
    if index.size and not 0 <= index.min() <= index.max() < n:
        raise IndexError(f"index out of range for an axis of size {n}")


@dataclass(frozen=True)
class Gather:
    """The rows, then the columns, of a stored tensor that an output tensor keeps (None: the whole axis)."""

    rows: torch.Tensor | None
    cols: torch.Tensor | None

    def __call__(self, t: torch.Tensor, pool: BufferPool | None = None) -> torch.Tensor:
        """Bit-exact gather through numpy on a same-size integer view: numpy's take beats index_select on both
        axes. Rows are taken a few at a time and their columns gathered straight into the output while the rows
        are still in cache, so memory is read and written about once. The output comes from ``pool`` if given."""
        if self.rows is None and self.cols is None:
            return t
        if int_view_dtype(t) is None:
            out = t if self.rows is None else t.index_select(0, self.rows)
            return out if self.cols is None else out.index_select(1, self.cols)
        a = t.view(int_view_dtype(t)).numpy()
        rows = None if self.rows is None else self.rows.numpy()
        cols = None if self.cols is None else self.cols.numpy()
        for index, n in ((rows, a.shape[0]), (cols, a.shape[1] if a.ndim > 1 else 0)):
            if index is not None:
                _check_range(index, n)
        shape = (a.shape[0] if rows is None else len(rows), *(() if a.ndim == 1 else
                                                              (a.shape[1] if cols is None else len(cols),)))
        out = pool.empty(shape, a.dtype) if pool is not None else np.empty(shape, dtype=a.dtype)
        if cols is None:
            np.take(a, rows, axis=0, out=out, mode="wrap")  # "raise" would buffer ``out``
            return torch.from_numpy(out).view(t.dtype)
        step = max(1, _GATHER_BLOCK_BYTES // max(1, a.shape[1] * a.itemsize))
        block = None if rows is None else np.empty((min(step, len(rows)), a.shape[1]), dtype=a.dtype)
        for i in range(0, out.shape[0], step):
            if rows is None:
                src = a[i:i + step]
            else:
                src = block[: len(rows[i:i + step])]
                np.take(a, rows[i:i + step], axis=0, out=src, mode="wrap")
            np.take(src, cols, axis=1, out=out[i:i + step], mode="wrap")
        return torch.from_numpy(out).view(t.dtype)


def _kept_positions(param: Param, index: AxisIndex, size: tuple[int, ...], dim: int, ng: tuple[int, int],
                    np_src: int, hn: int) -> torch.Tensor | None:
    """Which positions along ``dim`` of a stored tensor unfuse -> slice_role -> fuse keeps, found by running
    exactly those functions on position numbers; None when every position is kept in place."""
    n = size[dim]
    pos = torch.arange(n).reshape([n if d == dim else 1 for d in range(len(size))])
    parts = unfuse(param, pos, ng[0], np_src, hn) if dim == 0 else {param.roles[0]: pos}
    kept = {}
    for role, part in parts.items():
        other = [a for d, a in enumerate(ROLE_AXES[role]) if d != dim]  # slice only along ``dim``
        kept[role] = slice_role(role, part, dataclasses.replace(index, **dict.fromkeys(other)), hn)
    out = (fuse(param, kept, ng[1]) if dim == 0 else kept[param.roles[0]]).reshape(-1)
    return None if out.numel() == n and torch.equal(out, torch.arange(n)) else out


def param_gather(param: Param, index: AxisIndex, size: tuple[int, ...], ng: tuple[int, int], np_src: int,
                 hn: int) -> Gather:
    """One row gather and one column gather equal to unfusing a stored tensor of ``param`` (``size``), slicing
    each logical part with ``index`` and re-fusing: gathers commute, so the result is bit-identical, with
    two copies instead of up to seven. ``ng`` is (source, output) query groups of the rank. Fused parts share
    their column axis (hidden), so the columns come from the first part."""
    cols = _kept_positions(param, index, size, 1, ng, np_src, hn) if len(size) == 2 else None
    return Gather(_kept_positions(param, index, size, 0, ng, np_src, hn), cols)


def balanced_params(src: MegatronCheckpoint, plan: PrunePlan, layout: Layout,
                    overrides: TensorOverrides | None = None) -> ParamFn:
    """Prune TP shard r on its own (same TP): the plan's kept indices inside rank r's slice, re-based, taken
    from each stored tensor by one row and one column gather (:func:`param_gather`). A parameter with an override
    (a refitted tensor mixes the source's TP slices) is taken from it, as :func:`global_params` does."""
    s, t = src.shape, layout.shape
    units = tp_units(s, src.padded_vocab)
    hn = s.head_dim
    ng = (s.num_query_groups // src.tp, t.num_query_groups // layout.tp)
    fallback = global_params(src, plan, layout, overrides)
    local_vocab = plan.vocab is None and layout.padded_vocab == src.padded_vocab

    @functools.lru_cache(maxsize=None)
    def index(layer: int | None, r: int) -> AxisIndex:
        if layer is None:
            return AxisIndex(hidden=plan.hidden)  # vocab kept whole: padding rows stay as they are
        return tp_slice_index(layer_index(plan, plan.layers[layer]), units, src.tp, r)

    def get(param: Param, layer: int | None, r: int, expert: int | None = None) -> torch.Tensor:
        if param.key in MOE_PARAMS:  # experts are taken whole-tensor (global) so far
            return fallback(param, layer, r, *(() if expert is None else (expert,)))
        if layer is None and "vocab" in ROLE_AXES[param.roles[0]] and not local_vocab:
            return fallback(param, layer, r)
        if overrides is not None and any(overrides.has(role, layer) for role in param.roles):
            return fallback(param, layer, r)
        role = model_role(param, t) if layer is None else param.roles[0]
        stored = src.stored(role, None if layer is None else plan.layers[layer].source_layer, r)
        if role in NORM_ROLES:  # not a pure gather: the plan may rescale norms
            return slice_role(role, stored, index(layer, r), hn, plan.norm_scale)
        holder = PARAM_OF_ROLE[role]
        gather = param_gather(holder, index(layer, r), tuple(stored.shape), ng, s.num_attention_heads // src.tp, hn)
        out = gather(stored, GATHER_BUFFERS)
        if out is not stored:
            src.done_reading(stored)
        return out

    return get


def shard_jobs(layout: Layout, params: ParamFn, tp_rank: int, pp_rank: int, ep_rank: int = 0
               ) -> tuple[list[tuple[str, Callable[[], torch.Tensor]]], list[str]]:
    """Output shard (tp_rank, pp_rank, ep_rank) as (name, compute) pairs in state-dict order, and its
    ``_extra_state`` names (stored as None, as megatron-core saves them for the local spec)."""
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    model_params, layer_params = params_for(layout.shape, first, last)
    jobs: list[tuple[str, Callable[[], torch.Tensor]]] = []
    for p in model_params:
        jobs.append((p.name(layout.spec), lambda p=p: params(p, None, tp_rank)))
    for i in range(layout.layers_per_stage):
        layer = pp_rank * layout.layers_per_stage + i
        for p in layer_params:
            for name, e in layer_param_names(p, layout.spec, i, layout.local_experts, layout.grouped):
                where = () if e is None else (ep_rank * layout.local_experts + e,)  # the model's expert number
                jobs.append((name, lambda p=p, layer=layer, where=where: params(p, layer, tp_rank, *where)))
    extra = [n for i in range(layout.layers_per_stage)
             for n in extra_state_names(layout.spec, layout.shape, i, layout.local_experts, layout.grouped)]
    if last:
        extra += [t for t in EXTRA_STATE[layout.spec] if "{}" not in t]
    return jobs, extra


class Stopped(Exception):
    """Another shard's writer failed (or the run was interrupted): this one stops too."""


def write_shard(path: Path, layout: Layout, params: ParamFn, key: tuple[int, ...], args: argparse.Namespace,
                workers: int = WORKERS, stop: threading.Event | None = None) -> None:
    """Write output shard (tp_rank, pp_rank) as a Megatron-LM ``model_optim_rng.pt``.

    ``workers`` threads compute the tensors while this thread streams each finished one into the file
    (:class:`TorchStreamWriter`), so compute and writing overlap and only a few tensors are in memory at once.
    Once ``stop`` is set the shard is abandoned (:class:`Stopped`) at the next tensor.
    """
    jobs, extra = shard_jobs(layout, params, *key)
    model: dict[str, Any] = {}
    with TorchStreamWriter(path) as out:
        tensors = ordered_map(lambda job: job[1](), jobs, workers, ahead=2 * workers)
        for (name, _), tensor in zip(jobs, tensors):
            if stop is not None and stop.is_set():
                raise Stopped(f"{path}: stopped")
            model[name] = out.tensor(tensor)
            GATHER_BUFFERS.give_back(tensor)
            del tensor
        model.update(dict.fromkeys(extra))
        out.finish({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0, "model": model})


def write_checkpoint(out: Path, layout: Layout, params: ParamFn, args: argparse.Namespace,
                     release: Callable[[], None] = lambda: None, progress: bool = True,
                     files_at_once: int | None = None) -> None:
    """Write every shard of ``layout`` into ``out`` (an existing empty folder).

    The TP (and EP) shards of one pipeline stage are written at once (at most ``files_at_once``, default one per CPU):
    each streams a few tensors at a time, so memory stays small, and writes to separate files run in parallel
    where one file's writes would queue on its lock. ``release`` runs after each stage.
    """
    iter_dir = out / "iter_0000000"
    cpus = os.cpu_count() or 1
    per_stage = layout.tp * layout.ep
    at_once = max(1, min(files_at_once or cpus, per_stage))
    workers = max(1, min(WORKERS, cpus // at_once))

    stop = threading.Event()  # set on any failure or Ctrl-C: the other shards' writers give up at once

    def write(key: tuple[int, ...]) -> None:
        path = iter_dir / shard_path_name(key, layout.pp, layout.ep) / MODEL_FILE
        path.parent.mkdir(parents=True)
        write_shard(path, layout, params, key, args, workers, stop)

    keys = shard_keys(layout.tp, layout.pp, layout.ep)  # stage by stage
    with tqdm(total=len(keys), desc="writing shards", unit="shard", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=at_once) as pool:
        try:
            for p in range(layout.pp):
                stage = keys[p * per_stage:(p + 1) * per_stage]
                for t0 in range(0, per_stage, at_once):
                    futures = [pool.submit(write, key) for key in stage[t0:t0 + at_once]]
                    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                    for f in done:
                        if f.exception() is not None:
                            raise f.exception()
                    bar.update(len(futures))
                release()
        except BaseException:
            stop.set()
            raise
    GATHER_BUFFERS.clear()
    (out / TRACKER).write_text("0")


def write_meta(out: Path, side_files_from: Path | None, hf_config: Mapping[str, Any], shape: ModelShape) -> Path:
    """``hf_meta/``: the HF config for ``shape`` plus the tokenizer and other side files."""
    meta = out / META_DIR
    meta.mkdir()
    if side_files_from is not None and side_files_from.is_dir():
        copy_side_files(side_files_from, meta, skip={"config.json", "model.safetensors.index.json", PLAN_FILE},
                        skip_suffixes=(".safetensors", ".bin", ".pt", ".pth", ".gguf"))
    (meta / "config.json").write_text(json.dumps(hf_config_for_shape(dict(hf_config), shape), indent=2,
                                                 sort_keys=True))
    return meta
