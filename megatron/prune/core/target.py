"""Target resolution: what the user asked for (sizes per axis, dropped layers, the GQA rule), checked against the
source shape and turned into the target shape, before any selection work is done."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.prune.core.shape import ModelShape, nearest_multiples, not_divisible
from megatron.prune.errors import PruneError


@dataclass(frozen=True)
class TargetRequest:
    """What the user asked for; None keeps that axis."""

    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    num_layers: int | None = None
    drop_layers: tuple[int, ...] | None = None
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    num_experts_per_tok: int | None = None


MOE_FLAGS = ("num_experts", "moe_ffn_hidden_size", "num_experts_per_tok")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_size(name: str, value: int | None, source: int) -> int:
    if value is None:
        return source
    if value < 1 or value > source:
        raise PruneError(f"--{name.replace('_', '-')} {value} is not possible: the source has {source}; "
                         f"valid values are 1..{source} (pruning only shrinks)")
    return value


def resolve_target(shape: ModelShape, req: TargetRequest) -> tuple[ModelShape, tuple[int, ...] | None]:
    """Validate a request against the source shape; return the target shape and explicit dropped layers."""
    hidden = _check_size("hidden_size", req.hidden_size, shape.hidden_size)
    experts = resolve_experts(shape, req)
    ffn = _check_size("ffn_hidden_size", req.ffn_hidden_size, shape.ffn_hidden_size)
    heads_req = _check_size("num_attention_heads", req.num_attention_heads, shape.num_attention_heads)
    groups_req = _check_size("num_query_groups", req.num_query_groups, shape.num_query_groups)
    mha = shape.num_query_groups == shape.num_attention_heads
    if req.num_query_groups is None:
        groups = heads_req if (mha and req.num_attention_heads is not None) else shape.num_query_groups
    else:
        groups = groups_req
    if req.num_attention_heads is None:
        heads = groups * shape.heads_per_group
    else:
        heads = heads_req
    if heads % groups:
        raise PruneError(
            f"--num-attention-heads {heads} is not a multiple of the {groups} kept query groups; "
            f"nearest valid: {nearest_multiples(heads, groups, groups * shape.heads_per_group)}"
        )
    if heads // groups > shape.heads_per_group:
        raise PruneError(
            f"--num-attention-heads {heads} with {groups} query groups needs {heads // groups} heads per group, "
            f"but the source has only {shape.heads_per_group}; valid: multiples of {groups} up to "
            f"{groups * shape.heads_per_group}"
        )
    L = shape.num_layers
    drop = None
    if req.drop_layers is not None:
        drop = tuple(req.drop_layers)
        bad = [i for i in drop if not 0 <= i < L]
        if bad:
            raise PruneError(f"--drop-layers {','.join(map(str, bad))}: out of range; valid layers are 0..{L - 1}")
        dup = sorted({i for i in drop if drop.count(i) > 1})
        if dup:
            raise PruneError(f"--drop-layers repeats layer(s) {','.join(map(str, dup))}")
        if len(drop) >= L:
            raise PruneError(f"--drop-layers would drop all {L} layers; keep at least one")
        if req.num_layers is not None and req.num_layers != L - len(drop):
            raise PruneError(f"--num-layers {req.num_layers} disagrees with --drop-layers "
                             f"({L} - {len(drop)} = {L - len(drop)})")
        drop = tuple(sorted(drop))
    layers = _check_size("num_layers", req.num_layers, L) if drop is None else L - len(drop)
    target = shape.replace(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=ffn, **experts,
    )
    return target, drop


def resolve_experts(shape: ModelShape, req: TargetRequest) -> dict[str, int]:
    """The expert sizes of the target (empty for a dense model); expert flags on a dense model and the dense FFN flag
    on a MoE model are refused, as is a top-k above the kept experts."""
    asked = [(_flag(n), getattr(req, n)) for n in MOE_FLAGS if getattr(req, n) is not None]
    if not shape.is_moe:
        if asked:
            raise PruneError(f"{asked[0][0]} {asked[0][1]}: the model is dense (no experts); expert flags apply to "
                             "mixture-of-experts models (Qwen3MoeForCausalLM, MixtralForCausalLM)")
        return {}
    if req.ffn_hidden_size is not None:
        raise PruneError(f"--ffn-hidden-size {req.ffn_hidden_size}: this mixture-of-experts model has no dense FFN; "
                         f"prune each expert's FFN with --moe-ffn-hidden-size (1..{shape.moe_ffn_hidden_size})")
    experts = _check_size("num_experts", req.num_experts, shape.num_experts)
    width = _check_size("moe_ffn_hidden_size", req.moe_ffn_hidden_size, shape.moe_ffn_hidden_size)
    if req.num_experts_per_tok is not None:
        top = _check_size("num_experts_per_tok", req.num_experts_per_tok, shape.num_experts_per_tok)
        if top > experts:
            raise PruneError(f"--num-experts-per-tok {top} is more than the {experts} kept experts; "
                             f"valid: 1..{experts}")
    else:
        top = min(shape.num_experts_per_tok, experts)
    return dict(num_experts=experts, moe_ffn_hidden_size=width, num_experts_per_tok=top)


def top_k_note(source: ModelShape, target: ModelShape) -> str | None:
    """The one line saying the router's top-k was clamped to the kept experts, if it was."""
    if target.num_experts_per_tok < source.num_experts_per_tok:
        return (f"note: top-k clamped to the {target.num_experts} kept experts: num_experts_per_tok "
                f"{source.num_experts_per_tok} -> {target.num_experts_per_tok}")
    return None


def check_tp_balance(shape: ModelShape, target: ModelShape, tp: int, ep: int = 1) -> None:
    """Balanced TP pruning keeps the same count in each of ``tp`` slices (and the same number of experts on each of
    ``ep`` expert-parallel ranks): sizes must divide evenly."""
    if tp < 1:
        raise PruneError(f"--tp {tp}: must be at least 1")
    if target.is_moe and target.num_experts % ep:
        raise PruneError(f"--num-experts {target.num_experts} is not divisible by the expert-parallel size {ep} "
                         f"(balanced pruning keeps as many experts on each EP rank); nearest valid: "
                         f"{nearest_multiples(target.num_experts, ep, shape.num_experts)}")
    balanced = ("num_query_groups", "ffn_hidden_size", "moe_ffn_hidden_size")  # heads follow their groups
    for name, src in not_divisible(shape, tp, balanced)[:1]:
        raise PruneError(f"source {name} {src} is not divisible by --tp {tp}")
    for name, tgt in not_divisible(target, tp, balanced)[:1]:
        raise PruneError(
            f"--{name.replace('_', '-')} {tgt} is not divisible by --tp {tp} (balanced pruning keeps the same "
            f"number in each TP slice); nearest valid: {nearest_multiples(tgt, tp, getattr(shape, name))}"
        )


GQA_MODES = ("trim-heads", "drop-groups")


def gqa_query_groups(shape: ModelShape, num_attention_heads: int | None, num_query_groups: int | None,
                     mode: str) -> int | None:
    """The KV-group count implied by ``--gqa`` when only ``--num-attention-heads`` is given.

    ``trim-heads`` keeps every KV group and fewer query heads per group (Minitron); ``drop-groups`` keeps the
    heads per group and drops whole KV groups. Explicit ``--num-query-groups`` always wins.
    """
    if mode not in GQA_MODES:
        raise PruneError(f"--gqa {mode!r}; choose one of {', '.join(GQA_MODES)}")
    if num_query_groups is not None or num_attention_heads is None or shape.heads_per_group == 1:
        return num_query_groups
    if mode == "trim-heads":
        return shape.num_query_groups
    hpg = shape.heads_per_group
    if num_attention_heads % hpg:
        raise PruneError(f"--gqa drop-groups keeps {hpg} heads per KV group, so --num-attention-heads must be a "
                         f"multiple of {hpg}; got {num_attention_heads} (or use --gqa trim-heads)")
    return num_attention_heads // hpg
