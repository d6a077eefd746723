"""Megatron-LM checkpoints (megatron-core ``GPTModel``, LLaMA family) as a prune format.

On disk: the Megatron-LM ``torch`` layout, ``latest_checkpointed_iteration.txt`` and
``iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt`` holding ``model`` (one TP/PP shard of the state
dict), ``args`` (the Namespace ``--use-checkpoint-args`` reads), ``checkpoint_version`` and ``iteration``.
Beside it, ``hf_meta/`` keeps the HF config and tokenizer so the model converts back to HF.

Everything goes through logical roles (:mod:`megatron.prune.slicing`): a shard is unfused into rank-local
logical tensors, sliced with ``slice_role`` and re-fused. The only Megatron-specific knowledge here is
the name table :data:`PARAMS` (names per layer spec, the roles each parameter fuses, its TP split axis),
the two fusions (:func:`fuse_qkv`, :func:`fuse_fc1`) and vocabulary padding.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from tqdm import tqdm

from .io import atomic_output, check_output_path, copy_side_files
from .memory import BufferPool, drop_mapped_pages, file_mappings, ordered_map
from .plan import PLAN_FILE, PrunePlan
from .shape import ModelShape, PruneError, hf_config_for_shape, nearest_multiples
from .slicing import (NORM_ROLES, ROLE_AXES, AxisIndex, layer_index, model_index, slice_role,
                      tp_slice_index)
from .torch_stream import TorchStreamWriter

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
META_DIR = "hf_meta"  # HF config.json + tokenizer of the model, for megatron-to-hf and for training
CHECKPOINT_VERSION = 3.0
SPECS = ("local", "transformer_engine")
CKPT_FORMATS = ("torch", "torch_dist")  # output formats; both are read
WORKERS = 4  # most threads computing one output file's tensors (the writer, not compute, soon limits)
TP_AXES = ("heads", "groups", "ffn", "vocab")  # logical axes megatron-core splits across TP ranks
NOT_CARRIED = ("optimizer state and RNG state are not carried over and the iteration is reset to 0: "
               "load it with --finetune (or --no-load-optim --no-load-rng)")


# ---- the name table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One megatron-core parameter: its name per layer spec, the logical roles it fuses, its TP split axis.

    ``tp_axis`` is the one declaration of how the parameter is split across tensor-parallel ranks:
    0 column-parallel, 1 row-parallel, None replicated.
    """

    key: str
    local: str
    te: str
    roles: tuple[str, ...]
    tp_axis: int | None
    per_layer: bool

    def name(self, spec: str, layer: int | None = None) -> str:
        template = self.local if spec == "local" else self.te
        return template.format(layer) if self.per_layer else template


_L = "decoder.layers.{}."
PARAMS: tuple[Param, ...] = (
    Param("embed", "embedding.word_embeddings.weight", "embedding.word_embeddings.weight", ("embed",), 0, False),
    Param("final_norm", "decoder.final_layernorm.weight", "decoder.final_layernorm.weight", ("final_norm",), None,
          False),
    Param("lm_head", "output_layer.weight", "output_layer.weight", ("lm_head",), 0, False),
    Param("input_norm", _L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight",
          ("input_norm",), None, True),
    Param("qkv", _L + "self_attention.linear_qkv.weight", _L + "self_attention.linear_qkv.weight", ("q", "k", "v"),
          0, True),
    Param("qkv_bias", _L + "self_attention.linear_qkv.bias", _L + "self_attention.linear_qkv.bias",
          ("q_bias", "k_bias", "v_bias"), 0, True),
    Param("proj", _L + "self_attention.linear_proj.weight", _L + "self_attention.linear_proj.weight", ("o",), 1, True),
    Param("post_norm", _L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight", ("post_norm",), None,
          True),
    Param("fc1", _L + "mlp.linear_fc1.weight", _L + "mlp.linear_fc1.weight", ("gate", "up"), 0, True),
    Param("fc2", _L + "mlp.linear_fc2.weight", _L + "mlp.linear_fc2.weight", ("down",), 1, True),
)
PARAM_BY_KEY = {p.key: p for p in PARAMS}
PARAM_OF_ROLE = {r: p for p in PARAMS for r in p.roles}

# Non-tensor ``_extra_state`` entries each spec's modules carry (None when there is no FP8 metadata);
# megatron-core loads strictly, so they must be present.
EXTRA_STATE: dict[str, tuple[str, ...]] = {
    "local": (_L + "self_attention.linear_qkv._extra_state", _L + "self_attention.linear_proj._extra_state",
              _L + "mlp.linear_fc1._extra_state", _L + "mlp.linear_fc2._extra_state", "output_layer._extra_state"),
    "transformer_engine": (_L + "self_attention.linear_qkv._extra_state", _L + "self_attention.linear_proj._extra_state",
                           _L + "self_attention.core_attention._extra_state", _L + "mlp.linear_fc1._extra_state",
                           _L + "mlp.linear_fc2._extra_state", "output_layer._extra_state"),
}


def role_tp_axis(role: str) -> int | None:
    """Where a logical role's TP-split axis lies, from ROLE_AXES (checked against PARAMS in the tests)."""
    axes = ROLE_AXES[role]
    return next((i for i, a in enumerate(axes) if a in TP_AXES), None)


def params_for(shape: ModelShape, first: bool, last: bool) -> tuple[list[Param], list[Param]]:
    """(model-level, per-layer) parameters a pipeline stage holds."""
    model = [PARAM_BY_KEY["embed"]] if first else []
    if last:
        model.append(PARAM_BY_KEY["final_norm"])
        # tied: the last stage keeps its own copy of the embedding unless it is also the first stage
        if not shape.tied_embeddings or not first:
            model.append(PARAM_BY_KEY["lm_head"])
    layer = [p for p in PARAMS if p.per_layer and (p.key != "qkv_bias" or shape.qkv_bias)]
    return model, layer


# ---- fused tensors -----------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ng: int) -> torch.Tensor:
    """q [np*hn, ...], k/v [ng*hn, ...] -> linear_qkv [ng*(np/ng + 2)*hn, ...], per group [q heads, k, v]."""
    rest = q.shape[1:]
    parts = [t.reshape(ng, -1, *rest) for t in (q, k, v)]  # [ng, np/ng*hn | hn | hn, ...]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def unfuse_qkv(qkv: torch.Tensor, ng: int, np_: int, hn: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: [ng, (np/ng + 2)*hn, ...] -> q, k, v (views when ng == 1)."""
    rest = qkv.shape[1:]
    qh = np_ // ng * hn
    g = qkv.reshape(ng, qh + 2 * hn, *rest)
    return tuple(t.reshape(-1, *rest) for t in (g[:, :qh], g[:, qh:qh + hn], g[:, qh + hn:]))


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU linear_fc1 of one TP rank: [gate_r; up_r] -> [2*f/tp, h]."""
    return torch.cat([gate, up], dim=0)


def unfuse_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_fc1` (two views)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def fuse(param: Param, parts: Mapping[str, torch.Tensor], ng_local: int) -> torch.Tensor:
    """Rank-local logical tensors -> the rank's megatron-core tensor for ``param``."""
    if param.key == "qkv":
        return fuse_qkv(parts["q"], parts["k"], parts["v"], ng_local)
    if param.key == "qkv_bias":
        return fuse_qkv(parts["q_bias"], parts["k_bias"], parts["v_bias"], ng_local)
    if param.key == "fc1":
        return fuse_fc1(parts["gate"], parts["up"])
    (role,) = param.roles
    return parts[role]


def unfuse(param: Param, t: torch.Tensor, ng_local: int, np_local: int, hn: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`fuse`."""
    if param.key in ("qkv", "qkv_bias"):
        return dict(zip(param.roles, unfuse_qkv(t, ng_local, np_local, hn)))
    if param.key == "fc1":
        return dict(zip(param.roles, unfuse_fc1(t)))
    return {param.roles[0]: t}


# ---- vocabulary padding and TP slices ------------------------------------------------------------


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows up to ``padded`` (padding tokens never occur; zero rows give them logit 0)."""
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def tp_units(shape: ModelShape, padded: int) -> dict[str, int]:
    """Source size of each TP-split axis."""
    return {"heads": shape.num_attention_heads, "groups": shape.num_query_groups,
            "ffn": shape.ffn_hidden_size, "vocab": padded}


def rank_index(units: Mapping[str, int], tp: int, rank: int) -> AxisIndex:
    """The indices of TP slice ``rank``: contiguous equal parts of every TP-split axis."""
    return AxisIndex(**{a: tuple(range(rank * n // tp, (rank + 1) * n // tp)) for a, n in units.items()})


def check_tp_pp(shape: ModelShape, tp: int, pp: int, what: str = "") -> None:
    """megatron-core needs heads, groups and FFN divisible by TP and layers divisible by PP."""
    if tp < 1 or pp < 1:
        raise PruneError(f"--tp {tp} --pp {pp}: both must be at least 1")
    for name, n in (("num_query_groups", shape.num_query_groups), ("num_attention_heads", shape.num_attention_heads),
                    ("ffn_hidden_size", shape.ffn_hidden_size)):
        if n % tp:
            valid = [d for d in range(1, n + 1) if all(m % d == 0 for m in (
                shape.num_query_groups, shape.num_attention_heads, shape.ffn_hidden_size))]
            raise PruneError(f"{what}{name} {n} is not divisible by tensor-parallel size {tp}; "
                             f"valid --tp values for this shape: {valid}")
    if shape.num_layers % pp:
        valid = [d for d in range(1, shape.num_layers + 1) if shape.num_layers % d == 0]
        raise PruneError(f"{what}num_layers {shape.num_layers} is not divisible by pipeline-parallel size {pp}; "
                         f"valid --pp values: {valid}")


def shard_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


_SHARD_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


# ---- args ---------------------------------------------------------------------------------------


def rope_scaling_args(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """Megatron's RoPE scaling flags for an HF config; only LLaMA-3 scaling with megatron-core's fixed factors.

    The stock ``--use-checkpoint-args`` loader does not read these; ``pretrain_llama.py`` adopts them itself.
    """
    rs = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return {"use_rope_scaling": False}
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind != "llama3" or any(float(rs.get(k, v)) != v for k, v in fixed.items()):
        raise PruneError(f"RoPE scaling {dict(rs)} is not supported by megatron-core (only llama3 scaling with "
                         f"{fixed})")
    return {"use_rope_scaling": True, "rope_scaling_factor": float(rs["factor"])}


def args_for_shape(base: argparse.Namespace | None, shape: ModelShape, tp: int, pp: int, padded: int,
                   divisible_by: int, dtype: torch.dtype, spec: str, hf_config: Mapping[str, Any],
                   tokenizer_dir: Path | None) -> argparse.Namespace:
    """The ``args`` Namespace of an output checkpoint: ``base`` (if any) with every shape field set."""
    a = argparse.Namespace(**vars(base)) if base is not None else argparse.Namespace()
    max_pos = int(hf_config.get("max_position_embeddings") or getattr(a, "max_position_embeddings", None) or 4096)
    rope = hf_config.get("rope_theta") or (hf_config.get("rope_parameters") or {}).get("rope_theta")
    fields = dict(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
        group_query_attention=shape.num_query_groups != shape.num_attention_heads, kv_channels=shape.head_dim,
        max_position_embeddings=max_pos, position_embedding_type="rope", add_position_embedding=False,
        use_rotary_position_embeddings=True,
        rotary_base=float(rope or getattr(a, "rotary_base", 10000)),
        rotary_percent=1.0, rotary_interleaved=False, add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        squared_relu=False, swiglu=True, untie_embeddings_and_output_weights=not shape.tied_embeddings,
        apply_layernorm_1p=False, normalization="RMSNorm",
        norm_epsilon=float(hf_config.get("rms_norm_eps") or getattr(a, "norm_epsilon", 1e-5)),
        apply_query_key_layer_scaling=False, attention_dropout=0.0, hidden_dropout=0.0,
        vocab_size=shape.vocab_size, padded_vocab_size=padded, make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
        expert_model_parallel_size=1, num_experts=None, ckpt_format="torch", transformer_impl=spec,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        iteration=0, consumed_train_samples=0, consumed_valid_samples=0,
    )
    fields.update(rope_scaling_args(hf_config))
    fields.setdefault("seq_length", getattr(a, "seq_length", None) or min(max_pos, 4096))
    a.__dict__.update(fields)
    if tokenizer_dir is not None:
        a.tokenizer_type, a.tokenizer_model = "HuggingFaceTokenizer", str(tokenizer_dir)
    return a


def hf_config_from_args(args: argparse.Namespace, shape: ModelShape, dtype: torch.dtype) -> dict[str, Any]:
    """An HF config for a Megatron checkpoint that came without ``hf_meta/config.json``."""
    arch, model_type = ("Qwen2ForCausalLM", "qwen2") if shape.qkv_bias else ("LlamaForCausalLM", "llama")
    cfg = {"architectures": [arch], "model_type": model_type, "hidden_act": "silu",
           "rms_norm_eps": float(getattr(args, "norm_epsilon", 1e-5)),
           "rope_theta": float(getattr(args, "rotary_base", 10000)),
           "max_position_embeddings": int(getattr(args, "max_position_embeddings", 4096) or 4096),
           "attention_bias": shape.qkv_bias, "torch_dtype": str(dtype).removeprefix("torch.")}
    if getattr(args, "use_rope_scaling", False):
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(args.rope_scaling_factor), "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return hf_config_for_shape(cfg, shape)


def shape_from_args(args: argparse.Namespace, vocab_size: int | None) -> ModelShape:
    """Read a :class:`ModelShape` from a checkpoint's args; refuse what LLaMA-family layers are not."""
    wrong = {k: getattr(args, k, None) for k, want in (("normalization", "RMSNorm"), ("swiglu", True),
                                                        ("position_embedding_type", "rope"),
                                                        ("add_bias_linear", False))
             if getattr(args, k, want) != want}
    if getattr(args, "num_experts", None):
        wrong["num_experts"] = args.num_experts
    if wrong:
        raise PruneError(f"not a LLaMA-family Megatron checkpoint: {wrong} (need RMSNorm, swiglu, rope, "
                         "no linear biases, no experts)")
    try:
        heads = int(args.num_attention_heads)
        groups = int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
        return ModelShape(
            num_layers=int(args.num_layers), hidden_size=int(args.hidden_size), num_attention_heads=heads,
            num_query_groups=groups, head_dim=int(getattr(args, "kv_channels", None) or args.hidden_size // heads),
            ffn_hidden_size=int(args.ffn_hidden_size),
            vocab_size=int(vocab_size or getattr(args, "vocab_size", None) or args.padded_vocab_size),
            tied_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
            qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
        )
    except (AttributeError, TypeError) as e:
        raise PruneError(f"checkpoint args lack a shape field ({e})") from e


# ---- reading ------------------------------------------------------------------------------------


def load_shard(path: Path) -> dict[str, Any]:
    """``torch.load`` one shard memory-mapped (only touched tensors are read), with safe unpickling."""
    from types import SimpleNamespace

    try:
        try:
            with torch.serialization.safe_globals([argparse.Namespace, SimpleNamespace, Path, type(Path())]):
                return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - retry with megatron's list of safe classes
            if "Unsupported global" not in str(e):
                raise
            from megatron.core.safe_globals import register_safe_globals

            register_safe_globals()
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable shard is a user error
        raise PruneError(f"cannot read Megatron shard {path}: {str(e).splitlines()[0]} "
                         "(missing, truncated or corrupt?)") from e


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

    def has(self, role: str, layer: int | None = None) -> bool:
        """Which logical tensors exist follows from the shape alone (tied embeddings, q/k/v bias)."""
        if role == "lm_head":
            return not self.shape.tied_embeddings
        if role.endswith("_bias"):
            return self.shape.qkv_bias
        return role in ROLE_AXES


@dataclass
class MegatronCheckpoint(CheckpointHeader):
    """A Megatron-LM torch-format checkpoint, opened lazily: implements the selectors' TensorSource.

    ``get`` returns full logical tensors (TP shards gathered, fused tensors split, vocab padding removed);
    shards are memory-mapped and at most ``tp`` of them are held open at once.
    """

    files: dict[tuple[int, int], Path]
    _open: "OrderedDict[tuple[int, int], dict[str, Any]]" = field(default_factory=OrderedDict, repr=False)
    _parts: "OrderedDict[tuple, dict[str, torch.Tensor]]" = field(default_factory=OrderedDict, repr=False)
    _maps: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, folder: Path | str, iteration: int | None = None) -> "MegatronCheckpoint":
        """Open and validate every shard (names, shapes, count) of ``iteration`` (default: the latest) before
        anything is written."""
        folder = Path(folder)
        if not folder.is_dir():
            raise PruneError(f"input {folder} is not a folder")
        iter_dir = find_iteration_dir(folder, iteration)
        from .megatron_dist import TorchDistCheckpoint, is_torch_dist

        if is_torch_dist(iter_dir):  # read-only input format; the same TensorSource interface
            return TorchDistCheckpoint.open(folder, iter_dir)  # type: ignore[return-value]
        found = {}
        for d in sorted(iter_dir.iterdir()):
            m = _SHARD_DIR.match(d.name)
            if m and d.is_dir():
                found[(int(m.group(1)), int(m.group(2) or 0))] = d / MODEL_FILE
        if not found:
            raise PruneError(f"{iter_dir} holds no mp_rank_* shard folders")
        first = load_shard(found[min(found)])
        args = first.get("args")
        if args is None or "model" not in first:
            raise PruneError(f"{found[min(found)]} has no 'args' or 'model'; not a Megatron-LM checkpoint")
        tp = int(getattr(args, "tensor_model_parallel_size", 1))
        pp = int(getattr(args, "pipeline_model_parallel_size", 1))
        expected = {(t, p): iter_dir / shard_dir_name(t, p, pp) / MODEL_FILE for t in range(tp) for p in range(pp)}
        if set(found) != set(expected) or any(found[k].parent != expected[k].parent for k in expected):
            raise PruneError(
                f"{iter_dir}: args say TP={tp} PP={pp} ({len(expected)} shard folders: "
                f"{', '.join(sorted(p.parent.name for p in expected.values()))}) but found "
                f"{', '.join(sorted(p.parent.name for p in found.values()))}")
        missing = [str(p) for p in expected.values() if not p.is_file()]
        if missing:
            raise PruneError(f"missing shard file(s): {', '.join(missing)}")
        meta = folder / META_DIR / "config.json"
        hf_config = json.loads(meta.read_text()) if meta.is_file() else {}
        shape = shape_from_args(args, hf_config.get("vocab_size"))
        spec = "transformer_engine" if PARAM_BY_KEY["input_norm"].te.format(0) in first["model"] else "local"
        embed = first["model"].get(PARAM_BY_KEY["embed"].name(spec))
        dtype = embed.dtype if isinstance(embed, torch.Tensor) else torch.float32
        padded = int(getattr(args, "padded_vocab_size", None) or shape.vocab_size)
        if not hf_config:
            hf_config = hf_config_from_args(args, shape, dtype)
        ckpt = cls(folder, iter_dir, args, shape, tp, pp, spec, padded, dtype, hf_config, expected)
        check_tp_pp(shape, tp, pp, what="checkpoint: ")
        for key in tqdm(sorted(expected), desc="checking shards", unit="shard", disable=len(expected) < 16):
            ckpt._check_shard(key, first["model"] if key == min(found) else load_shard(expected[key])["model"])
        return ckpt

    # -- layout --------------------------------------------------------------------------------
    @property
    def layers_per_stage(self) -> int:
        return self.shape.num_layers // self.pp

    def local_shape(self, param: Param) -> tuple[int, ...]:
        """The shape of ``param`` in one TP shard."""
        s, tp = self.shape, self.tp
        h, hn = s.hidden_size, s.head_dim
        qkv_rows = (s.num_attention_heads + 2 * s.num_query_groups) * hn // tp
        return {
            "embed": (self.padded_vocab // tp, h), "lm_head": (self.padded_vocab // tp, h), "final_norm": (h,),
            "input_norm": (h,), "post_norm": (h,), "qkv": (qkv_rows, h), "qkv_bias": (qkv_rows,),
            "proj": (h, s.num_attention_heads * hn // tp), "fc1": (2 * s.ffn_hidden_size // tp, h),
            "fc2": (h, s.ffn_hidden_size // tp),
        }[param.key]

    def expected_names(self, pp_rank: int) -> dict[str, Param | None]:
        """Every state-dict key of stage ``pp_rank`` -> its Param (None for ``_extra_state``)."""
        first, last = pp_rank == 0, pp_rank == self.pp - 1
        model, layer = params_for(self.shape, first, last)
        names: dict[str, Param | None] = {p.name(self.spec): p for p in model}
        for i in range(self.layers_per_stage):
            names.update({p.name(self.spec, i): p for p in layer})
            names.update({t.format(i): None for t in EXTRA_STATE[self.spec] if "{}" in t})
        if last:
            names.update({t: None for t in EXTRA_STATE[self.spec] if "{}" not in t})
        return names

    def _check_shard(self, key: tuple[int, int], sd: Mapping[str, Any]) -> None:
        where = self.files[key]
        want = self.expected_names(key[1])
        unknown = sorted(set(sd) - set(want))
        if unknown:
            raise PruneError(f"{where}: unknown state-dict key(s) {unknown[:6]}{' ...' if len(unknown) > 6 else ''} "
                             f"for a {self.spec}-spec LLaMA-family GPTModel")
        missing = sorted(n for n, p in want.items() if p is not None and n not in sd)
        if missing:
            raise PruneError(f"{where}: missing state-dict key(s) {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        for name, p in want.items():
            if p is not None and tuple(sd[name].shape) != self.local_shape(p):
                raise PruneError(f"{where}: {name} has shape {tuple(sd[name].shape)}, args imply "
                                 f"{self.local_shape(p)}")

    def _shard(self, tp_rank: int, pp_rank: int) -> dict[str, Any]:
        key = (tp_rank, pp_rank)
        if key not in self._open:
            while len(self._open) >= self.tp:
                self._maps.pop(self._open.popitem(last=False)[0], None)
            self._open[key] = load_shard(self.files[key])["model"]
            self._maps[key] = file_mappings(self.files[key])
        self._open.move_to_end(key)
        return self._open[key]

    def release(self) -> None:
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

    def _where(self, role: str, layer: int | None) -> tuple[Param, int, str]:
        param = PARAM_OF_ROLE[role]
        if role == "lm_head" and self.shape.tied_embeddings:
            param = PARAM_BY_KEY["embed"]
        if layer is None:
            stage = 0 if param.key == "embed" else self.pp - 1
            return param, stage, param.name(self.spec)
        return param, layer // self.layers_per_stage, param.name(self.spec, layer % self.layers_per_stage)

    # -- TensorSource ----------------------------------------------------------------------------

    def stored(self, role: str, layer: int | None, tp_rank: int) -> torch.Tensor:
        """The megatron-core tensor holding ``role`` in TP shard ``tp_rank``, as stored (memory-mapped, fused)."""
        _, stage, name = self._where(role, layer)
        with self._lock:
            return self._shard(tp_rank, stage)[name]

    def get_local(self, role: str, layer: int | None, tp_rank: int) -> torch.Tensor:
        """The rank-local logical tensor of ``role`` (vocab still padded for embed/lm_head)."""
        with self._lock:
            return self._get_local(role, layer, tp_rank)

    def _get_local(self, role: str, layer: int | None, tp_rank: int) -> torch.Tensor:
        param, stage, name = self._where(role, layer)
        key = (tp_rank, stage, name)
        if key not in self._parts:  # q, k, v (gate, up) come from one fused tensor: unfuse it once
            s = self.shape
            self._parts[key] = unfuse(param, self._shard(tp_rank, stage)[name], s.num_query_groups // self.tp,
                                      s.num_attention_heads // self.tp, s.head_dim)
            while len(self._parts) > WORKERS + 1:  # one per writer thread
                self._parts.popitem(last=False)
        return self._parts[key]["embed" if param.key == "embed" else role]

    def get(self, role: str, layer: int | None = None) -> torch.Tensor:
        param = PARAM_OF_ROLE[role]
        if param.tp_axis is None:
            return self.get_local(role, layer, 0)
        t = torch.cat([self.get_local(role, layer, r) for r in range(self.tp)], dim=param.tp_axis)
        self._done_with(role, layer)  # ``t`` is a copy: the pages it was read from can leave the resident set
        return t[: self.shape.vocab_size] if role in ("embed", "lm_head") else t

    def _done_with(self, role: str, layer: int | None) -> None:
        """:meth:`done_reading` for every open TP shard's stored tensor of ``role`` (opens nothing)."""
        _, stage, name = self._where(role, layer)
        with self._lock:
            stored = [self._open[(r, stage)][name] for r in range(self.tp) if (r, stage) in self._open]
        for t in stored:
            self.done_reading(t)


# ---- writing ------------------------------------------------------------------------------------

# (role, layer) -> rank-local pruned logical tensor for output rank r
RoleFn = Callable[[str, int | None, int], torch.Tensor]
# (param, layer) -> output rank r's stored megatron-core tensor of param (layer None: a model-level param)
ParamFn = Callable[["Param", int | None, int], torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """How an output checkpoint is split and named."""

    shape: ModelShape
    tp: int
    pp: int
    spec: str
    padded_vocab: int

    @property
    def layers_per_stage(self) -> int:
        return self.shape.num_layers // self.pp


def global_roles(src: Any, plan: PrunePlan, layout: Layout) -> RoleFn:
    """Gather the full logical tensor, apply the plan, pad the vocab, take output rank r's TP slice."""
    units = tp_units(plan.target, layout.padded_vocab)
    hn = src.shape.head_dim

    def get(role: str, layer: int | None, r: int) -> torch.Tensor:
        if layer is None:
            t = slice_role(role, src.get(role), model_index(plan), hn, plan.norm_scale)
            if role in ("embed", "lm_head"):
                t = pad_vocab(t, layout.padded_vocab)
        else:
            lp = plan.layers[layer]
            t = slice_role(role, src.get(role, lp.source_layer), layer_index(plan, lp), hn, plan.norm_scale)
        return slice_role(role, t, rank_index(units, layout.tp, r), hn)

    return get


def model_role(param: Param, shape: ModelShape) -> str:
    """The logical role a model-level parameter holds (a tied output layer holds the embedding)."""
    return "embed" if param.key == "embed" or (param.key == "lm_head" and shape.tied_embeddings) else param.roles[0]


def fused_params(roles: RoleFn, layout: Layout) -> ParamFn:
    """Stored tensors from rank-local logical tensors: fuse q/k/v and gate/up per output rank."""
    ng_local = layout.shape.num_query_groups // layout.tp

    def get(param: Param, layer: int | None, r: int) -> torch.Tensor:
        if layer is None:
            return roles(model_role(param, layout.shape), None, r)
        return fuse(param, {role: roles(role, layer, r) for role in param.roles}, ng_local)

    return get


def global_params(src: Any, plan: PrunePlan, layout: Layout) -> ParamFn:
    """:func:`global_roles`, fused: any TP/PP in, any TP/PP out."""
    return fused_params(global_roles(src, plan, layout), layout)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
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
        if t.dtype.itemsize not in _INT_OF_SIZE or t.requires_grad:
            out = t if self.rows is None else t.index_select(0, self.rows)
            return out if self.cols is None else out.index_select(1, self.cols)
        a = t.view(_INT_OF_SIZE[t.dtype.itemsize]).numpy()
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


def balanced_params(src: MegatronCheckpoint, plan: PrunePlan, layout: Layout) -> ParamFn:
    """Prune TP shard r on its own (same TP): the plan's kept indices inside rank r's slice, re-based, taken
    from each stored tensor by one row and one column gather (:func:`param_gather`)."""
    s, t = src.shape, layout.shape
    units = tp_units(s, src.padded_vocab)
    hn = s.head_dim
    ng = (s.num_query_groups // src.tp, t.num_query_groups // layout.tp)
    fallback = global_params(src, plan, layout)
    local_vocab = plan.vocab is None and layout.padded_vocab == src.padded_vocab

    @functools.lru_cache(maxsize=None)
    def index(layer: int | None, r: int) -> AxisIndex:
        if layer is None:
            return AxisIndex(hidden=plan.hidden)  # vocab kept whole: padding rows stay as they are
        return tp_slice_index(layer_index(plan, plan.layers[layer]), units, src.tp, r)

    def get(param: Param, layer: int | None, r: int) -> torch.Tensor:
        if layer is None and param.key in ("embed", "lm_head") and not local_vocab:
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


def shard_jobs(layout: Layout, params: ParamFn, tp_rank: int, pp_rank: int
               ) -> tuple[list[tuple[str, Callable[[], torch.Tensor]]], list[str]]:
    """Output shard (tp_rank, pp_rank) as (name, compute) pairs in state-dict order, and its ``_extra_state``
    names (stored as None, as megatron-core saves them for the local spec)."""
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    model_params, layer_params = params_for(layout.shape, first, last)
    jobs: list[tuple[str, Callable[[], torch.Tensor]]] = []
    for p in model_params:
        jobs.append((p.name(layout.spec), lambda p=p: params(p, None, tp_rank)))
    for i in range(layout.layers_per_stage):
        layer = pp_rank * layout.layers_per_stage + i
        for p in layer_params:
            jobs.append((p.name(layout.spec, i), lambda p=p, layer=layer: params(p, layer, tp_rank)))
    extra = [t.format(i) for i in range(layout.layers_per_stage) for t in EXTRA_STATE[layout.spec] if "{}" in t]
    if last:
        extra += [t for t in EXTRA_STATE[layout.spec] if "{}" not in t]
    return jobs, extra


class Stopped(Exception):
    """Another shard's writer failed (or the run was interrupted): this one stops too."""


def write_shard(path: Path, layout: Layout, params: ParamFn, tp_rank: int, pp_rank: int, args: argparse.Namespace,
                workers: int = WORKERS, stop: threading.Event | None = None) -> None:
    """Write output shard (tp_rank, pp_rank) as a Megatron-LM ``model_optim_rng.pt``.

    ``workers`` threads compute the tensors while this thread streams each finished one into the file
    (:class:`TorchStreamWriter`), so compute and writing overlap and only a few tensors are in memory at once.
    Once ``stop`` is set the shard is abandoned (:class:`Stopped`) at the next tensor.
    """
    jobs, extra = shard_jobs(layout, params, tp_rank, pp_rank)
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

    The TP shards of one pipeline stage are written at once (at most ``files_at_once``, default one per CPU):
    each streams a few tensors at a time, so memory stays small, and writes to separate files run in parallel
    where one file's writes would queue on its lock. ``release`` runs after each stage.
    """
    iter_dir = out / "iter_0000000"
    cpus = os.cpu_count() or 1
    at_once = max(1, min(files_at_once or cpus, layout.tp))
    workers = max(1, min(WORKERS, cpus // at_once))

    stop = threading.Event()  # set on any failure or Ctrl-C: the other shards' writers give up at once

    def write(key: tuple[int, int]) -> None:
        path = iter_dir / shard_dir_name(*key, layout.pp) / MODEL_FILE
        path.parent.mkdir(parents=True)
        write_shard(path, layout, params, *key, args, workers, stop)

    with tqdm(total=layout.tp * layout.pp, desc="writing shards", unit="shard", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=at_once) as pool:
        try:
            for p in range(layout.pp):
                for t0 in range(0, layout.tp, at_once):
                    futures = [pool.submit(write, (t, p)) for t in range(t0, min(t0 + at_once, layout.tp))]
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


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def _save(src: Any, plan: PrunePlan, output: Path, tp: int, pp: int, spec: str, divisible_by: int,
          params_fn: Callable[[Any, PrunePlan, Layout], ParamFn], base_args: argparse.Namespace | None,
          side_files: Path | None, overwrite: bool, progress: bool, save_plan: bool,
          ckpt_format: str = "torch") -> Path:
    """Shared body of convert, reshard and prune: write ``plan`` applied to ``src`` as a Megatron checkpoint."""
    if spec not in SPECS:
        raise PruneError(f"layer spec {spec!r} unknown; choose one of {', '.join(SPECS)}")
    check_ckpt_format(ckpt_format)
    target = plan.target
    check_tp_pp(target, tp, pp, what="output: ")
    layout = Layout(target, tp, pp, spec, padded_vocab_size(target.vocab_size, divisible_by, tp))
    output = Path(output)
    final = output.resolve()
    tokenizer = final / META_DIR if _has_tokenizer(side_files) else None
    args = args_for_shape(base_args, target, tp, pp, layout.padded_vocab, divisible_by,
                          getattr(src, "dtype", None) or _hf_dtype(src), spec, src_hf_config(src), tokenizer)
    with atomic_output(output, overwrite) as tmp:
        write_checkpoint(tmp, layout, params_fn(src, plan, layout), args, getattr(src, "release", lambda: None),
                         progress)
        write_meta(tmp, side_files, src_hf_config(src), target)
        if ckpt_format == "torch_dist":
            from .megatron_dist import torch_to_dist

            torch_to_dist(tmp, progress)
        if save_plan:
            plan.save(tmp)
    return output


def check_ckpt_format(ckpt_format: str) -> None:
    if ckpt_format not in CKPT_FORMATS:
        raise PruneError(f"--ckpt-format {ckpt_format!r}: choose one of {', '.join(CKPT_FORMATS)}")


def src_hf_config(src: Any) -> dict[str, Any]:
    return dict(getattr(src, "hf_config", None) or getattr(src, "config", {}))


def _hf_dtype(src: Any) -> torch.dtype:
    return src.get("final_norm").dtype


# ---- public entry points ------------------------------------------------------------------------


def hf_to_megatron(hf_dir: Path | str, out_dir: Path | str, tp: int = 1, pp: int = 1, spec: str = "local",
                   make_vocab_size_divisible_by: int = 128, overwrite: bool = False, progress: bool = True,
                   ckpt_format: str = "torch") -> Path:
    """Convert an HF LLaMA-family checkpoint into a Megatron-LM checkpoint of TP ``tp`` and PP ``pp``."""
    from .hf import HFCheckpoint

    src = HFCheckpoint.open(hf_dir)
    check_tp_pp(src.shape, tp, pp)
    check_output_path(hf_dir, out_dir, overwrite)
    return _save(src, PrunePlan.keep_all(src.shape), Path(out_dir), tp, pp, spec, make_vocab_size_divisible_by,
                 global_params, None, Path(hf_dir), overwrite, progress, save_plan=False, ckpt_format=ckpt_format)


def reshard(mg_dir: Path | str, out_dir: Path | str, tp: int | None = None, pp: int | None = None,
            spec: str | None = None, make_vocab_size_divisible_by: int | None = None, overwrite: bool = False,
            progress: bool = True, ckpt_format: str = "torch") -> Path:
    """Rewrite a Megatron checkpoint at another TP/PP size (and/or layer spec); weights unchanged."""
    src = MegatronCheckpoint.open(mg_dir)
    tp, pp = tp or src.tp, pp or src.pp
    check_tp_pp(src.shape, tp, pp)
    check_output_path(mg_dir, out_dir, overwrite)
    div = make_vocab_size_divisible_by or int(getattr(src.args, "make_vocab_size_divisible_by", 128))
    plan_file = src.folder / PLAN_FILE
    out = _save(src, PrunePlan.keep_all(src.shape), Path(out_dir), tp, pp, spec or src.spec, div, global_params,
                src.args, src.folder / META_DIR, overwrite, progress, save_plan=False, ckpt_format=ckpt_format)
    if plan_file.is_file():
        shutil.copy2(plan_file, out / PLAN_FILE)  # keep the record of how this checkpoint was pruned
    return out


def megatron_to_hf(mg_dir: Path | str, out_dir: Path | str, overwrite: bool = False, progress: bool = True,
                   max_shard_bytes: int | None = None, iteration: int | None = None) -> Path:
    """Convert a Megatron checkpoint (its ``iteration``, default the latest) back to HF safetensors (vocab
    padding removed, TP/PP gathered)."""
    from . import hf

    src = MegatronCheckpoint.open(mg_dir, iteration)
    hf.check_hf_target(src.shape)
    check_output_path(mg_dir, out_dir, overwrite)
    with atomic_output(Path(out_dir), overwrite) as tmp:
        side = src.folder / META_DIR
        if not side.is_dir():  # a checkpoint from elsewhere: config from args, no tokenizer to copy
            side = tmp / ".no-side-files"
            side.mkdir()
        view = HFView(side, config_with_dtype(hf_config_for_shape(src.hf_config, src.shape), src.dtype), src)
        hf.write_pruned(view, PrunePlan.keep_all(src.shape), tmp, max_shard_bytes or hf.DEFAULT_MAX_SHARD_BYTES,
                        progress)
        if side.parent == tmp:
            side.rmdir()
        (tmp / PLAN_FILE).unlink()  # an identity plan says nothing; keep the source's real plan if any
        if (src.folder / PLAN_FILE).is_file():
            shutil.copy2(src.folder / PLAN_FILE, tmp / PLAN_FILE)
    return Path(out_dir)


def config_with_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``config`` naming the dtype the weights are written in: after bf16 training the weights are bf16 even where
    the source's config says float32, and transformers loads a checkpoint in its config's dtype."""
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    return {**config, **{k: name for k in keys}}


@dataclass
class HFView:
    """What :func:`megatron.prune.hf.write_pruned` needs of a source: side-file folder, config, tensors."""

    folder: Path
    config: dict[str, Any]
    src: MegatronCheckpoint

    @property
    def shape(self) -> ModelShape:
        return self.src.shape

    def get(self, role: str, layer: int | None = None) -> torch.Tensor:
        return self.src.get(role, layer)

    def has(self, role: str, layer: int | None = None) -> bool:
        return self.src.has(role, layer)

    def dtype_code(self, role: str, layer: int | None = None) -> str:
        """safetensors dtype code of every tensor (one dtype throughout a Megatron checkpoint)."""
        from .hf import _DTYPE_CODES

        return _DTYPE_CODES[self.src.dtype]


# ---- pruning ------------------------------------------------------------------------------------


def check_balanced(plan: PrunePlan, tp: int, padded: int) -> None:
    """Balanced pruning needs every TP slice of every layer to keep the same number of groups/heads/FFN."""
    units = tp_units(plan.source, padded)
    s, t = plan.source, plan.target
    for lp in plan.layers:
        idx = layer_index(plan, lp)
        for axis, want in (("groups", t.num_query_groups), ("heads", t.num_attention_heads),
                           ("ffn", t.ffn_hidden_size)):
            counts = [len(tp_slice_index(idx, units, tp, r).for_axis(axis)) for r in range(tp)]
            if len(set(counts)) > 1:
                raise PruneError(
                    f"plan is not balanced for TP={tp}: layer {lp.source_layer} keeps {counts} {axis} per TP slice; "
                    f"make the plan with --tp {tp} --prune-type balance, or use --prune-type unbalance")
    for name, n in (("num_query_groups", t.num_query_groups), ("num_attention_heads", t.num_attention_heads),
                    ("ffn_hidden_size", t.ffn_hidden_size)):
        if n % tp:
            src_n = getattr(s, name)
            raise PruneError(f"--{name.replace('_', '-')} {n} is not divisible by the checkpoint's TP size {tp}; "
                             f"valid values near it: {nearest_multiples(n, tp, src_n)}")


def output_layout(src: CheckpointHeader, target: ModelShape, prune_type: str, tp: int | None,
                  pp: int | None) -> tuple[int, int]:
    """The output TP and PP of pruning ``src`` to ``target``; checked before any selection work is done."""
    pp = pp or src.pp
    if prune_type == "balance":
        if tp not in (None, src.tp):
            raise PruneError(f"--prune-type balance keeps the checkpoint's TP size {src.tp}; got --tp {tp} "
                             "(use --prune-type unbalance to write another TP size)")
        tp = src.tp
    elif prune_type == "unbalance":
        tp = tp or src.tp
    else:
        raise PruneError(f"--prune-type {prune_type!r}: choose balance or unbalance")
    if target.num_layers % pp:
        L = target.num_layers
        valid = [n for n in range(pp, src.shape.num_layers + 1, pp)]
        raise PruneError(f"the pruned model would have {L} layers, not divisible by the checkpoint's pipeline-parallel "
                         f"size {pp}; keep a multiple of {pp} layers ({valid}) or first run "
                         f"`megatron-prune reshard --pp 1`")
    check_tp_pp(target, tp, pp, what="target: ")
    return tp, pp


def prune_megatron(src: MegatronCheckpoint, plan: PrunePlan, output: Path | str, overwrite: bool = False,
                   prune_type: str = "balance", tp: int | None = None, pp: int | None = None,
                   progress: bool = True, ckpt_format: str = "torch") -> Path:
    """Apply ``plan`` to a Megatron checkpoint.

    ``balance`` prunes each TP shard on its own (output TP = input TP, one input and one output shard in
    memory at a time); ``unbalance`` gathers each tensor, applies the plan and writes ``tp``/``pp``.
    """
    if plan.source != src.shape:
        raise PruneError(f"plan was made for {plan.source} but {src.folder} has {src.shape}")
    plan.validate()
    tp, pp = output_layout(src, plan.target, prune_type, tp, pp)
    div = int(getattr(src.args, "make_vocab_size_divisible_by", 128))
    params_fn: Callable[[Any, PrunePlan, Layout], ParamFn] = global_params
    if prune_type == "balance":
        check_balanced(plan, tp, src.padded_vocab)
        if isinstance(src, MegatronCheckpoint):  # torch_dist input has no per-rank files: gather, prune, re-split
            params_fn = balanced_params
    check_output_path(src.folder, output, overwrite)
    src.release()
    out = _save(src, plan, Path(output), tp, pp, src.spec, div, params_fn, src.args, src.folder / META_DIR,
                overwrite, progress, save_plan=True, ckpt_format=ckpt_format)
    print(f"note: {NOT_CARRIED}")
    return out


def prune(input_dir: Path | str, output_dir: Path | str, plan: PrunePlan, **kw: Any) -> Path:
    """Open ``input_dir`` and apply ``plan`` (see :func:`prune_megatron`)."""
    return prune_megatron(MegatronCheckpoint.open(input_dir), plan, output_dir, **kw)


def iter_state_dicts(folder: Path | str) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
    """(tp_rank, pp_rank), shard dict for every shard of a checkpoint (for tests and inspection)."""
    ckpt = MegatronCheckpoint.open(folder)
    for key in sorted(ckpt.files):
        yield key, load_shard(ckpt.files[key])


def format_adapter():
    """The ``megatron`` entry of :data:`megatron.prune.formats.ADAPTERS`."""
    from .formats import FormatAdapter

    def write(src: MegatronCheckpoint, plan: PrunePlan, output: Path, overwrite: bool = False, progress: bool = True,
              args: argparse.Namespace | None = None, **_: Any) -> Path:
        return prune_megatron(src, plan, output, overwrite, prune_type=getattr(args, "prune_type", None) or "balance",
                              tp=getattr(args, "tp", None), pp=getattr(args, "pp", None), progress=progress,
                              ckpt_format=getattr(args, "ckpt_format", None) or "torch")

    def check_target(src: MegatronCheckpoint, target: ModelShape, args: argparse.Namespace | None = None) -> None:
        check_ckpt_format(getattr(args, "ckpt_format", None) or "torch")
        output_layout(src, target, getattr(args, "prune_type", None) or "balance", getattr(args, "tp", None),
                      getattr(args, "pp", None))

    return FormatAdapter("megatron", is_megatron_dir, MegatronCheckpoint.open, check_target, write)
