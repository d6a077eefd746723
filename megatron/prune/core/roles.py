"""The logical tensors (roles) of a LLaMA-family model: their named axes, which exist for a shape, their shapes.

Every format maps its parameter names to these roles; slicing (:mod:`.slicing`) works on roles only.
"""

from __future__ import annotations

from typing import Iterator

from megatron.prune.core.shape import ModelShape

# Axis vocabulary: hidden [h], query heads [np] and KV groups [ng] (each head_dim rows wide),
# FFN channels [f], vocabulary [v], and the width of one head [hn], which no plan changes; in a mixture-of-experts
# layer, experts [E] (the router's rows) and the FFN channels of one expert [F].
ROLE_AXES: dict[str, tuple[str, ...]] = {
    # model-level
    "embed": ("vocab", "hidden"),  # [v, h]
    "lm_head": ("vocab", "hidden"),  # [v, h]
    "final_norm": ("hidden",),  # [h]
    # per layer
    "input_norm": ("hidden",),
    "post_norm": ("hidden",),
    "q": ("heads", "hidden"),  # [np*hn, h]
    "k": ("groups", "hidden"),  # [ng*hn, h]
    "v": ("groups", "hidden"),
    "q_bias": ("heads",),
    "k_bias": ("groups",),
    "v_bias": ("groups",),
    "q_norm": ("head_dim",),  # [hn]: one RMSNorm weight shared by every query head of the layer (Qwen3)
    "k_norm": ("head_dim",),  # [hn]: shared by every KV group
    "o": ("hidden", "heads"),  # [h, np*hn]
    "gate": ("ffn", "hidden"),  # [f, h]
    "up": ("ffn", "hidden"),
    "down": ("hidden", "ffn"),  # [h, f]
    # mixture of experts (instead of gate/up/down): the router, and each expert's SwiGLU FFN, one tensor per expert
    "router": ("experts", "hidden"),  # [E, h]
    "expert_gate": ("expert_ffn", "hidden"),  # [F, h] of one expert
    "expert_up": ("expert_ffn", "hidden"),
    "expert_down": ("hidden", "expert_ffn"),  # [h, F]
}


NORM_ROLES = frozenset({"final_norm", "input_norm", "post_norm"})  # RMSNorms over the hidden size


QK_NORM_ROLES = ("q_norm", "k_norm")


DENSE_FFN_ROLES = ("gate", "up", "down")


EXPERT_ROLES = ("expert_gate", "expert_up", "expert_down")  # one tensor per (layer, expert)


HEAD_AXES = frozenset({"heads", "groups"})  # axes whose unit is head_dim rows


FIXED_AXES = frozenset({"head_dim"})  # axes every plan keeps whole (RoPE is tied to head_dim)


def has_role(shape: ModelShape, role: str) -> bool:
    """Whether a model of ``shape`` stores ``role``: ``lm_head`` only when untied, q/k/v biases and QK-norms only
    with them."""
    if role == "lm_head":
        return not shape.tied_embeddings
    if role.endswith("_bias"):
        return shape.qkv_bias
    if role in QK_NORM_ROLES:
        return shape.qk_norm
    if role in DENSE_FFN_ROLES:
        return not shape.is_moe
    if role == "router" or role in EXPERT_ROLES:
        return shape.is_moe
    return role in ROLE_AXES


def stored_role(role: str, shape: ModelShape) -> str:
    """The role whose tensor holds ``role``: a tied ``lm_head`` is the embedding."""
    return "embed" if role == "lm_head" and shape.tied_embeddings else role


def expected_roles(shape: ModelShape) -> Iterator[tuple[str, int | None]]:
    """Every (role, layer) a checkpoint of ``shape`` holds, in write order, the per-expert roles aside
    (:func:`expected_tensors` lists them)."""
    for role, layer, expert in expected_tensors(shape):
        if expert is None:
            yield role, layer


def expected_tensors(shape: ModelShape) -> Iterator[tuple[str, int | None, int | None]]:
    """Every (role, layer, expert) a checkpoint of ``shape`` holds, in write order (expert None: not per expert)."""
    yield "embed", None, None
    layer_roles = ["input_norm", "q", "k", "v"]
    layer_roles += ["q_bias", "k_bias", "v_bias"] if shape.qkv_bias else []
    layer_roles += list(QK_NORM_ROLES) if shape.qk_norm else []
    layer_roles += ["o", "post_norm"] + (["router"] if shape.is_moe else list(DENSE_FFN_ROLES))
    for i in range(shape.num_layers):
        for r in layer_roles:
            yield r, i, None
        for e in range(shape.num_experts):
            for r in EXPERT_ROLES:
                yield r, i, e
    yield "final_norm", None, None
    if has_role(shape, "lm_head"):
        yield "lm_head", None, None


def role_shape(role: str, shape: ModelShape) -> tuple[int, ...]:
    """The tensor shape of ``role`` in a model of ``shape``."""
    size = {
        "hidden": shape.hidden_size,
        "heads": shape.num_attention_heads * shape.head_dim,
        "groups": shape.num_query_groups * shape.head_dim,
        "ffn": shape.ffn_hidden_size,
        "vocab": shape.vocab_size,
        "head_dim": shape.head_dim,
        "experts": shape.num_experts,
        "expert_ffn": shape.moe_ffn_hidden_size,
    }
    return tuple(size[a] for a in ROLE_AXES[role])
