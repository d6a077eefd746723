"""Reading Megatron ``torch_dist`` checkpoints (megatron.core.dist_checkpointing) as a TensorSource.

In this format every tensor is stored once, globally: per-layer parameters are stacked on a leading layer
axis (``decoder.layers.self_attention.linear_qkv.weight`` is ``[L, ng*(np/ng+2)*hn, h]``), ``linear_qkv``
is the global per-group interleave, ``linear_fc1`` the global ``[gate; up]``, and both layer specs use the
Transformer Engine names for the norms. Tensors are read one parameter at a time with
``torch.distributed.checkpoint`` (no process group needed); ``args`` come from the common state.
"""

from __future__ import annotations

import argparse
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .megatron_ckpt import (META_DIR, PARAM_BY_KEY, PARAM_OF_ROLE, PARAMS, Param, check_tp_pp, hf_config_from_args,
                            shape_from_args, unfuse)
from .shape import ModelShape, PruneError
from .slicing import ROLE_AXES

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


def dist_name(param: Param) -> str:
    """The global key of ``param``: TE names, layer number dropped (layers are the leading axis)."""
    return param.te.replace("decoder.layers.{}.", "decoder.layers.")


@dataclass
class TorchDistCheckpoint:
    """A torch_dist checkpoint opened lazily; ``get`` returns full logical tensors like MegatronCheckpoint's."""

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
    metadata: Any
    _cache: tuple[str | None, torch.Tensor | None] = field(default=(None, None), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, folder: Path, iter_dir: Path) -> "TorchDistCheckpoint":
        import torch.distributed.checkpoint as dcp

        from megatron.core.dist_checkpointing import load_common_state_dict

        try:
            common = load_common_state_dict(str(iter_dir))
            metadata = dcp.FileSystemReader(str(iter_dir)).read_metadata()
        except Exception as e:  # noqa: BLE001 - unreadable input is a user error
            raise PruneError(f"cannot read torch_dist checkpoint {iter_dir}: {str(e).splitlines()[0]}") from e
        args = common.get("args")
        if args is None:
            raise PruneError(f"{iter_dir}: the common state has no 'args'; not a Megatron-LM checkpoint")
        meta = folder / META_DIR / "config.json"
        hf_config = json.loads(meta.read_text()) if meta.is_file() else {}
        shape = shape_from_args(args, hf_config.get("vocab_size"))
        tp = int(getattr(args, "tensor_model_parallel_size", 1))
        pp = int(getattr(args, "pipeline_model_parallel_size", 1))
        spec = getattr(args, "transformer_impl", "local")
        embed = metadata.state_dict_metadata.get(dist_name(PARAM_BY_KEY["embed"]))
        if embed is None:
            raise PruneError(f"{iter_dir}: no {dist_name(PARAM_BY_KEY['embed'])} in the checkpoint")
        padded = int(getattr(args, "padded_vocab_size", None) or embed.size[0])
        ckpt = cls(folder, iter_dir, args, shape, tp, pp, "transformer_engine" if spec == "transformer_engine" else
                   "local", padded, embed.properties.dtype, hf_config or hf_config_from_args(args, shape, embed.properties.dtype),
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
        return (p.key != "lm_head" or not self.shape.tied_embeddings) and (p.key != "qkv_bias" or self.shape.qkv_bias)

    def _global_shape(self, p: Param) -> tuple[int, ...]:
        s = self.shape
        h, hn = s.hidden_size, s.head_dim
        qkv = (s.num_attention_heads + 2 * s.num_query_groups) * hn
        one = {"embed": (self.padded_vocab, h), "lm_head": (self.padded_vocab, h), "final_norm": (h,),
               "input_norm": (h,), "post_norm": (h,), "qkv": (qkv, h), "qkv_bias": (qkv,),
               "proj": (h, s.num_attention_heads * hn), "fc1": (2 * s.ffn_hidden_size, h),
               "fc2": (h, s.ffn_hidden_size)}[p.key]
        return (s.num_layers, *one) if p.per_layer else one

    def _load(self, name: str) -> torch.Tensor:
        """One global tensor (all layers for per-layer parameters); the last one read stays cached."""
        if self._cache[0] != name:
            import torch.distributed.checkpoint as dcp

            self._cache = (None, None)
            md = self.metadata.state_dict_metadata[name]
            sd = {name: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
            dcp.load(sd, storage_reader=dcp.FileSystemReader(str(self.iter_dir)), no_dist=True)
            self._cache = (name, sd[name])
        return self._cache[1]

    def release(self) -> None:
        self._cache = (None, None)

    def has(self, role: str, layer: int | None = None) -> bool:
        if role == "lm_head":
            return not self.shape.tied_embeddings
        if role.endswith("_bias"):
            return self.shape.qkv_bias
        return role in ROLE_AXES

    def get(self, role: str, layer: int | None = None) -> torch.Tensor:
        with self._lock:  # the writer's threads share the one cached tensor
            return self._get(role, layer)

    def _get(self, role: str, layer: int | None) -> torch.Tensor:
        param = PARAM_OF_ROLE[role]
        if role == "lm_head" and self.shape.tied_embeddings:
            param = PARAM_BY_KEY["embed"]
        t = self._load(dist_name(param))
        if param.per_layer:
            t = t[layer]
        s = self.shape
        part = unfuse(param, t, s.num_query_groups, s.num_attention_heads, s.head_dim)
        out = part["embed" if param.key == "embed" else role]
        return out[: s.vocab_size].contiguous() if role in ("embed", "lm_head") else out.contiguous()

    def itemsize(self, role: str, layer: int | None = None) -> int:
        return self.dtype.itemsize
