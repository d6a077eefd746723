"""The Megatron schema: megatron-core ``GPTModel`` parameter names per layer spec, the logical roles each one fuses,
its tensor-parallel split axis, the two fusions, stored shapes, vocabulary padding and shard naming.

On disk, the Megatron-LM ``torch`` layout is ``latest_checkpointed_iteration.txt`` and
``iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt`` holding ``model`` (one TP/PP shard of the state dict),
``args`` (the Namespace ``--use-checkpoint-args`` reads), ``checkpoint_version`` and ``iteration``; beside it
``hf_meta/`` keeps the HF config and tokenizer so the model converts back to HF. ``torch_dist`` stores every tensor
once, globally (:mod:`.dist`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from megatron.prune.core.roles import ROLE_AXES, has_role, role_shape, stored_role
from megatron.prune.core.shape import ModelShape, not_divisible
from megatron.prune.core.slicing import AxisIndex
from megatron.prune.errors import PruneError

TRACKER = "latest_checkpointed_iteration.txt"


MODEL_FILE = "model_optim_rng.pt"


META_DIR = "hf_meta"  # HF config.json + tokenizer of the model, for megatron-to-hf and for training


CHECKPOINT_VERSION = 3.0


SPECS = ("local", "transformer_engine")
SPEC_CHOICES = ("auto", *SPECS)  # auto: the spec recovery training builds on this machine (resolve_spec)


def resolve_spec(spec: str) -> str:
    """``auto`` -> the layer spec ``pretrain_llama.py`` builds here: Transformer Engine's where TE is installed and a
    GPU is present (without a GPU it runs on CPU with the local spec), else local; other names unchanged."""
    if spec != "auto":
        return spec
    import importlib.util

    return "transformer_engine" if importlib.util.find_spec("transformer_engine") and torch.cuda.is_available() \
        else "local"


CKPT_FORMATS = ("torch", "torch_dist")  # output formats; both are read


TP_AXES = ("heads", "groups", "ffn", "vocab", "expert_ffn")  # logical axes megatron-core splits across TP ranks


# ---- the name table ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One megatron-core parameter: its name per layer spec, the logical roles it fuses, its TP split axis.

    ``tp_axis`` is the one declaration of how the parameter is split across tensor-parallel ranks:
    0 column-parallel, 1 row-parallel, None replicated. ``per_expert`` parameters are one per local expert of a layer
    (SequentialMLP's ``local_experts.E``, TEGroupedMLP's ``weightE``). ``grouped`` is the name in a MoE layer built
    with grouped GEMM (:data:`MOE_SPEC`; None: the ``te`` name).
    """

    key: str
    local: str
    te: str
    roles: tuple[str, ...]
    tp_axis: int | None
    per_layer: bool
    per_expert: bool = False
    grouped: str | None = None

    def name(self, spec: str, layer: int | None = None, expert: int | None = None, grouped: bool = False) -> str:
        template = self.local if spec == "local" else (self.grouped or self.te) if grouped else self.te
        return template.format(*(i for i in (layer, expert) if i is not None)) if self.per_layer else template


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
    # QK-norm (Qwen3): the same module, megatron-core's RMSNorm of one head's width, in both specs; replicated
    Param("q_norm", _L + "self_attention.q_layernorm.weight", _L + "self_attention.q_layernorm.weight", ("q_norm",),
          None, True),
    Param("k_norm", _L + "self_attention.k_layernorm.weight", _L + "self_attention.k_layernorm.weight", ("k_norm",),
          None, True),
    Param("proj", _L + "self_attention.linear_proj.weight", _L + "self_attention.linear_proj.weight", ("o",), 1, True),
    Param("post_norm", _L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight", ("post_norm",), None,
          True, grouped=_L + "pre_mlp_layernorm.weight"),  # a MoE layer's norm is a TENorm of its own
    Param("fc1", _L + "mlp.linear_fc1.weight", _L + "mlp.linear_fc1.weight", ("gate", "up"), 0, True),
    Param("fc2", _L + "mlp.linear_fc2.weight", _L + "mlp.linear_fc2.weight", ("down",), 1, True),
    # mixture of experts (megatron-core MoELayer): the router is replicated, each expert's fc1 [gate; up] column- and
    # fc2 row-parallel inside the expert (--expert-tensor-parallel-size = TP). SequentialMLP (local spec) holds one
    # linear per expert; TEGroupedMLP (transformer_engine spec, --moe-grouped-gemm) one TE GroupedLinear per fc whose
    # weightE is the same [2*f/tp, h] / [h, f/tp] tensor of local expert E (its sharded_state_dict maps the two)
    Param("router", _L + "mlp.router.weight", _L + "mlp.router.weight", ("router",), None, True),
    Param("expert_fc1", _L + "mlp.experts.local_experts.{}.linear_fc1.weight",
          _L + "mlp.experts.local_experts.{}.linear_fc1.weight", ("expert_gate", "expert_up"), 0, True, True,
          grouped=_L + "mlp.experts.linear_fc1.weight{}"),
    Param("expert_fc2", _L + "mlp.experts.local_experts.{}.linear_fc2.weight",
          _L + "mlp.experts.local_experts.{}.linear_fc2.weight", ("expert_down",), 1, True, True,
          grouped=_L + "mlp.experts.linear_fc2.weight{}"),
)


PARAM_BY_KEY = {p.key: p for p in PARAMS}


MOE_PARAMS = frozenset({"router", "expert_fc1", "expert_fc2"})


PARAM_OF_ROLE = {r: p for p in PARAMS for r in p.roles}


# Non-tensor ``_extra_state`` entries each spec's modules carry (None when there is no FP8 metadata);
# megatron-core loads strictly, so they must be present.
EXTRA_STATE: dict[str, tuple[str, ...]] = {
    "local": (_L + "self_attention.linear_qkv._extra_state", _L + "self_attention.linear_proj._extra_state",
              _L + "mlp.linear_fc1._extra_state", _L + "mlp.linear_fc2._extra_state", "output_layer._extra_state"),
    "transformer_engine": (_L + "self_attention.linear_qkv._extra_state",
                           _L + "self_attention.linear_proj._extra_state",
                           _L + "self_attention.core_attention._extra_state", _L + "mlp.linear_fc1._extra_state",
                           _L + "mlp.linear_fc2._extra_state", "output_layer._extra_state"),
}


# A MoE layer's _extra_state entries in the local spec: each expert's linears (the router has none); they replace
# the dense MLP's.
EXPERT_EXTRA_STATE = (_L + "mlp.experts.local_experts.{}.linear_fc1._extra_state",
                      _L + "mlp.experts.local_experts.{}.linear_fc2._extra_state")


# ... and with grouped GEMM: one per TE GroupedLinear (all of a shard's local experts)
GROUPED_EXTRA_STATE = (_L + "mlp.experts.linear_fc1._extra_state", _L + "mlp.experts.linear_fc2._extra_state")


# The two expert layouts megatron-core 0.19 builds, keyed by the saved ``moe_grouped_gemm`` arg: the layer spec each
# exists in (the local spec ignores --moe-grouped-gemm and builds SequentialMLP; the legacy GroupedMLP with
# weight1/weight2 is gone). Names differ, tensors do not (:class:`Param`).
MOE_SPEC: dict[bool, str] = {False: "local", True: "transformer_engine"}


EXPERT_LAYOUT_NAMES = {False: "SequentialMLP", True: "TEGroupedMLP (grouped GEMM)"}


def extra_state_names(spec: str, shape: ModelShape, layer: int, local_experts: int, grouped: bool = False
                      ) -> list[str]:
    """The ``_extra_state`` names of local layer ``layer`` of a model of ``shape``, in a shard holding
    ``local_experts`` experts (``grouped``: TEGroupedMLP's)."""
    names = [t.format(layer) for t in EXTRA_STATE[spec] if "{}" in t]
    if not shape.is_moe:
        return names
    names = [n for n in names if ".mlp." not in n]
    if grouped:
        return names + [t.format(layer) for t in GROUPED_EXTRA_STATE]
    return names + [t.format(layer, e) for e in range(local_experts) for t in EXPERT_EXTRA_STATE]


def layer_param_names(param: Param, spec: str, layer: int, local_experts: int, grouped: bool = False
                      ) -> list[tuple[str, int | None]]:
    """(state-dict name, local expert) of each tensor of ``param`` in local layer ``layer`` of a shard holding
    ``local_experts`` experts (one per expert if ``per_expert``; ``grouped``: a MoE layer's names under grouped
    GEMM)."""
    if param.per_expert:
        return [(param.name(spec, layer, e, grouped), e) for e in range(local_experts)]
    return [(param.name(spec, layer, grouped=grouped), None)]


def expert_shard(expert: int, num_experts: int, ep: int) -> tuple[int, int]:
    """(EP rank, local number) of expert ``expert``: expert-parallel rank r holds experts [r*E/ep, (r+1)*E/ep),
    numbered from 0 in its shard (megatron-core's expert parallelism, declared here once)."""
    per = num_experts // ep
    return expert // per, expert % per


def check_ep(shape: ModelShape, ep: int, what: str = "") -> None:
    """Expert parallelism splits the experts evenly; a dense model has none to split."""
    if ep < 1:
        raise PruneError(f"--ep {ep}: must be at least 1")
    if ep > 1 and not shape.is_moe:
        raise PruneError(f"{what}--ep {ep}: the model is dense (no experts to split); expert parallelism needs a "
                         "mixture-of-experts model")
    if shape.is_moe and shape.num_experts % ep:
        valid = [d for d in range(1, shape.num_experts + 1) if shape.num_experts % d == 0]
        raise PruneError(f"{what}num_experts {shape.num_experts} is not divisible by expert-parallel size {ep}; "
                         f"valid --ep values: {valid}")


def check_moe_layout(shape: ModelShape, spec: str, ckpt_format: str, grouped: bool = False) -> None:
    """What the Megatron format takes of a mixture-of-experts model so far: ``torch`` format, SequentialMLP experts in
    the local spec or TEGroupedMLP experts in the transformer_engine spec (:data:`MOE_SPEC`)."""
    if grouped and not shape.is_moe:
        raise PruneError("--moe-grouped-gemm: the model is dense (no experts to group); drop the flag")
    if shape.is_moe and (MOE_SPEC[grouped] != spec or ckpt_format != "torch"):
        valid = "; ".join(f"{EXPERT_LAYOUT_NAMES[g]}: --transformer-impl {s}" for g, s in MOE_SPEC.items())
        raise PruneError(f"a mixture-of-experts model ({shape.num_experts} experts) is written in torch format with "
                         f"{valid} only so far; got {EXPERT_LAYOUT_NAMES[grouped]}, spec {spec}, format {ckpt_format} "
                         "(--ckpt-format torch)")


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
        if has_role(shape, "lm_head") or not first:
            model.append(PARAM_BY_KEY["lm_head"])
    layer = [p for p in PARAMS if p.per_layer and has_role(shape, p.roles[0])]
    return model, layer


def model_role(param: Param, shape: ModelShape) -> str:
    """The logical role a model-level parameter holds (a tied output layer holds the embedding)."""
    return stored_role(param.roles[0], shape)


def dist_name(param: Param) -> str:
    """The global ``torch_dist`` key of ``param``: TE names, layer number dropped (layers are the leading axis)."""
    return param.te.replace("decoder.layers.{}.", "decoder.layers.")


def stored_shape(param: Param, shape: ModelShape, padded_vocab: int, tp: int = 1) -> tuple[int, ...]:
    """The shape of ``param``'s tensor in one of ``tp`` shards (``tp=1``: the whole tensor): its roles' logical
    shapes fused along dim 0, the vocabulary padded, the TP-split axis divided."""
    padded = shape.replace(vocab_size=padded_vocab)
    parts = [role_shape(r, padded) for r in param.roles]
    dims = [sum(p[0] for p in parts), *parts[0][1:]]
    if param.tp_axis is not None:
        dims[param.tp_axis] //= tp
    return tuple(dims)


def check_ckpt_format(ckpt_format: str) -> None:
    if ckpt_format not in CKPT_FORMATS:
        raise PruneError(f"--ckpt-format {ckpt_format!r}: choose one of {', '.join(CKPT_FORMATS)}")


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
    if param.key in ("fc1", "expert_fc1"):
        return fuse_fc1(*(parts[r] for r in param.roles))
    (role,) = param.roles
    return parts[role]


def unfuse(param: Param, t: torch.Tensor, ng_local: int, np_local: int, hn: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`fuse`."""
    if param.key in ("qkv", "qkv_bias"):
        return dict(zip(param.roles, unfuse_qkv(t, ng_local, np_local, hn)))
    if param.key in ("fc1", "expert_fc1"):
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
            "ffn": shape.ffn_hidden_size, "vocab": padded, "expert_ffn": shape.moe_ffn_hidden_size}


def rank_index(units: Mapping[str, int], tp: int, rank: int) -> AxisIndex:
    """The indices of TP slice ``rank``: contiguous equal parts of every TP-split axis."""
    return AxisIndex(**{a: tuple(range(rank * n // tp, (rank + 1) * n // tp)) for a, n in units.items()})


def check_tp_pp(shape: ModelShape, tp: int, pp: int, what: str = "") -> None:
    """megatron-core needs heads, groups and FFN divisible by TP and layers divisible by PP."""
    if tp < 1 or pp < 1:
        raise PruneError(f"--tp {tp} --pp {pp}: both must be at least 1")
    for name, n in not_divisible(shape, tp)[:1]:
        valid = [d for d in range(1, n + 1) if not not_divisible(shape, d)]
        raise PruneError(f"{what}{name} {n} is not divisible by tensor-parallel size {tp}; "
                         f"valid --tp values for this shape: {valid}")
    if shape.num_layers % pp:
        valid = [d for d in range(1, shape.num_layers + 1) if shape.num_layers % d == 0]
        raise PruneError(f"{what}num_layers {shape.num_layers} is not divisible by pipeline-parallel size {pp}; "
                         f"valid --pp values: {valid}")


def shard_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron-LM's shard folder: ``mp_rank_TT``, ``_PPP`` with pipeline parallelism, ``_EEE`` with expert
    parallelism."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep == 1 else f"{name}_{ep_rank:03d}"


def shard_keys(tp: int, pp: int, ep: int = 1) -> list[tuple[int, ...]]:
    """Every shard of a layout, pipeline stage by stage: (tp, pp), or (tp, pp, ep) with expert parallelism."""
    return [(t, p) if ep == 1 else (t, p, e) for p in range(pp) for t in range(tp) for e in range(ep)]


def shard_path_name(key: tuple[int, ...], pp: int, ep: int) -> str:
    """The folder name of shard ``key`` (:func:`shard_keys`)."""
    return shard_dir_name(key[0], key[1], pp, key[2] if len(key) > 2 else 0, ep)


_SHARD_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
