"""Reading Megatron-LM ``torch``-format checkpoints: shards (memory-mapped, safely unpickled), iteration folders, and
:class:`MegatronCheckpoint`, a TensorSource of the model's full logical tensors."""

from __future__ import annotations

import argparse
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from megatron.prune.core.roles import has_role, stored_role
from megatron.prune.core.shape import ModelShape
from megatron.prune.errors import PruneError
from megatron.prune.formats.safetensors import DTYPE_CODES
from megatron.prune.formats.mcore.args import hf_config_from_args, meta_config_and_shape
from megatron.prune.formats.source import check_finite
from megatron.prune.formats.mcore.schema import (EXPERT_LAYOUT_NAMES, EXTRA_STATE, MODEL_FILE, MOE_SPEC,
                                                 PARAM_BY_KEY, PARAM_OF_ROLE, TRACKER, _SHARD_DIR, Param, check_ep,
                                                 check_tp_pp, expert_shard, extra_state_names, layer_param_names,
                                                 params_for, shard_keys, shard_path_name, stored_shape, unfuse)
from megatron.prune.io.memory import drop_mapped_pages, file_mappings

WORKERS = 4  # most threads computing one output file's tensors (the writer, not compute, soon limits)


def load_shard(path: Path) -> dict[str, Any]:
    """``torch.load`` one shard memory-mapped (only touched tensors are read), with safe unpickling (megatron-core's
    list of safe classes where a trained checkpoint needs them); a legacy (non-zip) file is read whole."""
    from types import SimpleNamespace

    # only the classes not yet allowed: leaving the context removes its classes from the process-wide list, and
    # megatron-core registers some of them at import for its own loads
    allowed = torch.serialization.get_safe_globals()
    extra = [c for c in (argparse.Namespace, SimpleNamespace, Path, type(Path())) if c not in allowed]

    def load(mmap: bool) -> dict[str, Any]:
        try:
            with torch.serialization.safe_globals(extra):
                return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except Exception as e:  # noqa: BLE001 - retry with megatron's list of safe classes
            if "Unsupported global" not in str(e):
                raise
            from megatron.core.safe_globals import register_safe_globals

            register_safe_globals()
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)

    try:
        try:
            return load(mmap=True)
        except RuntimeError as e:  # a legacy (non-zip) file cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return load(mmap=False)
    except Exception as e:  # noqa: BLE001 - any unreadable shard is a user error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # torch's run on for lines
        raise PruneError(f"cannot read Megatron shard {path}: {first} (missing, truncated or corrupt?)") from None


def saved_iterations(folder: Path) -> list[int]:
    """The iterations a checkpoint folder holds (its ``iter_NNNNNNN`` folders), ascending."""
    return sorted(int(p.name[5:]) for p in Path(folder).glob("iter_*") if p.name[5:].isdigit() and p.is_dir())


def find_iteration_dir(folder: Path, iteration: int | None = None) -> Path:
    """The folder of ``iteration``, by default the one the tracker file names (the latest saved)."""
    tracker = folder / TRACKER
    if not tracker.is_file():
        raise PruneError(f"{folder} has no {TRACKER}; is it a Megatron checkpoint?")
    if iteration is not None:
        sub = folder / f"iter_{iteration:07d}"
        if not sub.is_dir():
            saved = ", ".join(map(str, saved_iterations(folder))) or "none"
            raise PruneError(f"{folder}: no iteration {iteration} saved (saved: {saved})")
        return sub
    text = tracker.read_text().strip()
    if text == "release":
        sub = folder / "release"
    else:
        try:
            sub = folder / f"iter_{int(text):07d}"
        except ValueError:
            raise PruneError(f"{tracker} holds {text!r}; expected an iteration number or 'release'") from None
    if not sub.is_dir():
        raise PruneError(f"{tracker} points to {sub.name}, which does not exist")
    return sub


def is_megatron_dir(path: Path) -> bool:
    return (Path(path) / TRACKER).is_file()


@dataclass
class CheckpointHeader:
    """What every Megatron checkpoint reader knows once it is open, whatever the on-disk format."""

    folder: Path
    iter_dir: Path
    args: argparse.Namespace
    shape: ModelShape
    tp: int
    pp: int
    spec: str
    padded_vocab: int
    dtype: torch.dtype
    hf_config: dict[str, Any]

    @property
    def grouped(self) -> bool:
        """Whether the experts are in TEGroupedMLP's layout (``weightE``): the saved ``moe_grouped_gemm`` says so."""
        return self.shape.is_moe and bool(getattr(self.args, "moe_grouped_gemm", False))

    def has(self, role: str, layer: int | None = None, expert: int | None = None) -> bool:
        """Which logical tensors exist follows from the shape alone (tied embeddings, q/k/v bias, experts)."""
        return has_role(self.shape, role)

    def dtype_code(self, role: str, layer: int | None = None, expert: int | None = None) -> str:
        """safetensors dtype code of every tensor (one dtype throughout a Megatron checkpoint)."""
        return DTYPE_CODES[self.dtype]

    def release(self) -> None:
        """Drop what is cached (nothing by default)."""


@dataclass
class MegatronCheckpoint(CheckpointHeader):
    """A Megatron-LM torch-format checkpoint, opened lazily: implements the selectors' TensorSource.

    ``get`` returns full logical tensors (TP shards gathered, fused tensors split, vocab padding removed);
    shards are memory-mapped and at most ``tp`` of them are held open at once.
    """

    files: dict[tuple[int, ...], Path]  # (tp, pp), or (tp, pp, ep) with expert parallelism: schema.shard_keys
    ep: int = 1  # expert-parallel size
    _open: "OrderedDict[tuple[int, int], dict[str, Any]]" = field(default_factory=OrderedDict, repr=False)
    _parts: "OrderedDict[tuple, dict[str, torch.Tensor]]" = field(default_factory=OrderedDict, repr=False)
    _maps: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _finite: set[tuple[int, int, str]] = field(default_factory=set, repr=False)  # stored tensors checked finite

    @classmethod
    def open(cls, folder: Path, iter_dir: Path) -> "MegatronCheckpoint":
        """Open and validate every shard (names, shapes, count) of the torch-format iteration folder ``iter_dir``
        before anything is written (:func:`megatron.prune.formats.folder.open_megatron` finds it)."""
        # folder name -> file: which rank a name stands for depends on the args (mp_rank_00_001 is PP or EP rank 1)
        found = {d.name: d / MODEL_FILE for d in sorted(iter_dir.iterdir()) if _SHARD_DIR.match(d.name) and d.is_dir()}
        if not found:
            raise PruneError(f"{iter_dir} holds no mp_rank_* shard folders")
        first = load_shard(found[min(found)])
        args = first.get("args")
        if args is None or "model" not in first:
            raise PruneError(f"{found[min(found)]} has no 'args' or 'model'; not a Megatron-LM checkpoint")
        tp = int(getattr(args, "tensor_model_parallel_size", 1))
        pp = int(getattr(args, "pipeline_model_parallel_size", 1))
        ep = int(getattr(args, "expert_model_parallel_size", 1) or 1)
        expected = {k: iter_dir / shard_path_name(k, pp, ep) / MODEL_FILE for k in shard_keys(tp, pp, ep)}
        if set(found) != {p.parent.name for p in expected.values()}:
            raise PruneError(
                f"{iter_dir}: args say TP={tp} PP={pp}{f' EP={ep}' if ep > 1 else ''} ({len(expected)} shard folders: "
                f"{', '.join(sorted(p.parent.name for p in expected.values()))}) but found "
                f"{', '.join(sorted(p.parent.name for p in found.values()))}")
        missing = [str(p) for p in expected.values() if not p.is_file()]
        if missing:
            raise PruneError(f"missing shard file(s): {', '.join(missing)}")
        hf_config, shape = meta_config_and_shape(folder, args)
        spec = "transformer_engine" if PARAM_BY_KEY["input_norm"].te.format(0) in first["model"] else "local"
        embed = first["model"].get(PARAM_BY_KEY["embed"].name(spec))
        dtype = embed.dtype if isinstance(embed, torch.Tensor) else torch.float32
        padded = int(getattr(args, "padded_vocab_size", None) or shape.vocab_size)
        if not hf_config:
            hf_config = hf_config_from_args(args, shape, dtype)
        ckpt = cls(folder, iter_dir, args, shape, tp, pp, spec, padded, dtype, hf_config, expected, ep=ep)
        check_tp_pp(shape, tp, pp, what="checkpoint: ")
        check_ep(shape, ep, what="checkpoint: ")
        if shape.is_moe and MOE_SPEC[ckpt.grouped] != spec:
            raise PruneError(f"{folder}: args say moe_grouped_gemm={ckpt.grouped} ({EXPERT_LAYOUT_NAMES[ckpt.grouped]} "
                             f"experts), which megatron-core builds in the {MOE_SPEC[ckpt.grouped]} spec only, but its "
                             f"names are {spec}-spec")
        for key in tqdm(sorted(expected), desc="checking shards", unit="shard", disable=len(expected) < 16):
            ckpt._check_shard(key, first["model"] if key == min(expected) else load_shard(expected[key])["model"])
        return ckpt

    # -- layout --------------------------------------------------------------------------------
    @property
    def layers_per_stage(self) -> int:
        return self.shape.num_layers // self.pp

    def local_shape(self, param: Param) -> tuple[int, ...]:
        """The shape of ``param`` in one TP shard."""
        return stored_shape(param, self.shape, self.padded_vocab, self.tp)

    def expected_names(self, pp_rank: int) -> dict[str, Param | None]:
        """Every state-dict key of stage ``pp_rank`` -> its Param (None for ``_extra_state``)."""
        first, last = pp_rank == 0, pp_rank == self.pp - 1
        model, layer = params_for(self.shape, first, last)
        names: dict[str, Param | None] = {p.name(self.spec): p for p in model}
        local, grouped = self.shape.num_experts // self.ep, self.grouped
        for i in range(self.layers_per_stage):
            names.update({n: p for p in layer for n, _ in layer_param_names(p, self.spec, i, local, grouped)})
            names.update(dict.fromkeys(extra_state_names(self.spec, self.shape, i, local, grouped)))
        if last:
            names.update({t: None for t in EXTRA_STATE[self.spec] if "{}" not in t})
        return names

    def _check_shard(self, key: tuple[int, int], sd: Mapping[str, Any]) -> None:
        where = self.files[key]
        want = self.expected_names(key[1])
        unknown = sorted(set(sd) - set(want))
        if unknown:
            experts = f" with {EXPERT_LAYOUT_NAMES[self.grouped]} experts (args: moe_grouped_gemm=" \
                      f"{self.grouped})" if self.shape.is_moe else ""
            raise PruneError(f"{where}: unknown state-dict key(s) {unknown[:6]}{' ...' if len(unknown) > 6 else ''} "
                             f"for a {self.spec}-spec LLaMA-family GPTModel{experts}")
        missing = sorted(n for n, p in want.items() if p is not None and n not in sd)
        if missing:
            raise PruneError(f"{where}: missing state-dict key(s) {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        for name, p in want.items():
            if p is not None and tuple(sd[name].shape) != self.local_shape(p):
                raise PruneError(f"{where}: {name} has shape {tuple(sd[name].shape)}, args imply "
                                 f"{self.local_shape(p)}")

    def _key(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> tuple[int, ...]:
        return (tp_rank, pp_rank) if self.ep == 1 else (tp_rank, pp_rank, ep_rank)

    def _shard(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict[str, Any]:
        key = self._key(tp_rank, pp_rank, ep_rank)
        if key not in self._open:
            while len(self._open) >= self.tp:
                self._maps.pop(self._open.popitem(last=False)[0], None)
            self._open[key] = load_shard(self.files[key])["model"]
            self._maps[key] = file_mappings(self.files[key])
        self._open.move_to_end(key)
        return self._open[key]

    def release(self) -> None:  # type: ignore[override]
        """Drop every open shard (unmaps its pages)."""
        self._open.clear()
        self._parts.clear()
        self._maps.clear()

    def done_reading(self, t: torch.Tensor) -> None:
        """A tensor from :meth:`stored` has been read: its mapped pages leave the resident set (they read back
        the same if touched again), so RSS stays a few tensors however much of a shard has been read."""
        with self._lock:
            maps = [m for ranges in self._maps.values() for m in ranges]
        drop_mapped_pages(t, maps)

    def _where(self, role: str, layer: int | None, expert: int | None = None) -> tuple[Param, int, int, str]:
        """(param, pipeline stage, EP rank, name in that shard) of a logical tensor."""
        param = PARAM_OF_ROLE[stored_role(role, self.shape)]
        if layer is None:
            stage = 0 if param.key == "embed" else self.pp - 1
            return param, stage, 0, param.name(self.spec)
        ep_rank, local = (0, None) if expert is None else expert_shard(expert, self.shape.num_experts, self.ep)
        return (param, layer // self.layers_per_stage, ep_rank,
                param.name(self.spec, layer % self.layers_per_stage, local, self.grouped))

    # -- TensorSource ----------------------------------------------------------------------------

    def stored(self, role: str, layer: int | None, tp_rank: int, expert: int | None = None) -> torch.Tensor:
        """The megatron-core tensor holding ``role`` in TP shard ``tp_rank``, as stored (memory-mapped, fused)."""
        _, stage, ep_rank, name = self._where(role, layer, expert)
        key = self._key(tp_rank, stage, ep_rank)
        with self._lock:
            t, first = self._shard(*key)[name], self._first_read(key, name)
        if first:  # outside the lock: the writer's threads check their tensors at once
            check_finite(t, f"{self.files[key]}: {name}")
        return t

    def _first_read(self, key: tuple[int, ...], name: str) -> bool:
        """Whether this stored tensor of shard ``key`` is read for the first time (then it is checked for NaN/Inf)."""
        first = (key, name) not in self._finite
        self._finite.add((key, name))
        return first

    def _checked(self, key: tuple[int, ...], name: str) -> torch.Tensor:
        """A stored tensor of shard ``key``, checked once for NaN/Inf (:func:`check_finite`)."""
        t = self._shard(*key)[name]
        if self._first_read(key, name):
            check_finite(t, f"{self.files[key]}: {name}")
        return t

    def get_local(self, role: str, layer: int | None, tp_rank: int, expert: int | None = None) -> torch.Tensor:
        """The rank-local logical tensor of ``role`` (vocab still padded for embed/lm_head)."""
        with self._lock:
            return self._get_local(role, layer, tp_rank, expert)

    def _get_local(self, role: str, layer: int | None, tp_rank: int, expert: int | None = None) -> torch.Tensor:
        param, stage, ep_rank, name = self._where(role, layer, expert)
        shard = self._key(tp_rank, stage, ep_rank)
        key = (shard, name)
        if key not in self._parts:  # q, k, v (gate, up) come from one fused tensor: unfuse it once
            s = self.shape
            self._parts[key] = unfuse(param, self._checked(shard, name), s.num_query_groups // self.tp,
                                      s.num_attention_heads // self.tp, s.head_dim)
            while len(self._parts) > WORKERS + 1:  # one per writer thread
                self._parts.popitem(last=False)
        return self._parts[key]["embed" if param.key == "embed" else role]

    def get(self, role: str, layer: int | None = None, expert: int | None = None) -> torch.Tensor:
        param = PARAM_OF_ROLE[role]
        if param.tp_axis is None:  # in the checkpoint's one dtype (a mixed one, from elsewhere, exports whole)
            return self.get_local(role, layer, 0, expert).to(self.dtype)
        t = torch.cat([self.get_local(role, layer, r, expert) for r in range(self.tp)], dim=param.tp_axis)
        t = t.to(self.dtype)
        self._done_with(role, layer, expert)  # ``t`` is a copy: the pages it was read from can leave the resident set
        return t[: self.shape.vocab_size] if role in ("embed", "lm_head") else t

    def _done_with(self, role: str, layer: int | None, expert: int | None = None) -> None:
        """:meth:`done_reading` for every open TP shard's stored tensor of ``role`` (opens nothing)."""
        _, stage, ep_rank, name = self._where(role, layer, expert)
        keys = [self._key(r, stage, ep_rank) for r in range(self.tp)]
        with self._lock:
            stored = [self._open[k][name] for k in keys if k in self._open]
        for t in stored:
            self.done_reading(t)
