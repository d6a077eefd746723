"""Selection: turn importance scores and a target shape into a :class:`PrunePlan`.

Every scoring method (:mod:`megatron.prune.scoring.methods`) produces :class:`Scores` (higher = more important);
one function, :func:`make_plan`, turns them into a plan, so top-k, GQA grouping and tensor-parallel balancing are
written once whatever the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron.prune.core.plan import LayerPlan, PrunePlan
from megatron.prune.core.shape import ModelShape
from megatron.prune.core.target import check_tp_balance
from megatron.prune.errors import PruneError


@dataclass(frozen=True)
class Scores:
    """Importance per unit of each axis; ``groups``/``layers`` may be None (derived or heuristic)."""

    hidden: torch.Tensor  # [h]
    heads: torch.Tensor  # [L, np]
    ffn: torch.Tensor  # [L, f]
    groups: torch.Tensor | None = None  # [L, ng]; None: sum of the group's head scores
    layers: torch.Tensor | None = None  # [L]; None: the seed's "spread through the middle" rule
    method: str = "unknown"
    # mixture of experts (None for a dense model)
    experts: torch.Tensor | None = None  # [L, E]: importance of each expert
    expert_ffn: torch.Tensor | None = None  # [L, E, F]: importance of each FFN channel of each expert
    routing: torch.Tensor | None = None  # [L, E]: share of tokens routed to each expert (recorded, not used)

    def save(self, path: Path) -> None:
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path: Path) -> "Scores":
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # torch explains weights_only at length
            raise PruneError(f"cannot read scores file {path}: {first}") from None
        what = "a file of `megatron-prune score`"
        if not isinstance(d, dict):
            raise PruneError(f"scores file {path} holds a {type(d).__name__}, not the dictionary of {what}")
        missing = [k for k in ("hidden", "heads", "ffn") if k not in d]
        if missing:
            raise PruneError(f"scores file {path} has no {', '.join(missing)} scores: is it {what}?")
        for k in cls.__dataclass_fields__:
            if k in d and d[k] is not None and not isinstance(d[k], str if k == "method" else torch.Tensor):
                raise PruneError(f"scores file {path}: '{k}' is a {type(d[k]).__name__}, not a tensor: is it {what}?")
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def zeros(cls, shape: ModelShape, method: str = "placeholder") -> "Scores":
        """Every unit equal (top-k keeps the first ones): for a plan that fixes the counts, its units chosen later
        (by ``method``, which the plan records)."""
        L = shape.num_layers
        moe = {} if not shape.is_moe else dict(
            experts=torch.zeros(L, shape.num_experts),
            expert_ffn=torch.zeros(L, shape.num_experts, shape.moe_ffn_hidden_size))
        return cls(hidden=torch.zeros(shape.hidden_size), heads=torch.zeros(L, shape.num_attention_heads),
                   ffn=torch.zeros(L, shape.ffn_hidden_size), method=method, **moe)

    def check(self, shape: ModelShape) -> "Scores":
        expect = {
            "hidden": (shape.hidden_size,),
            "heads": (shape.num_layers, shape.num_attention_heads),
            "ffn": (shape.num_layers, shape.ffn_hidden_size),
            "groups": (shape.num_layers, shape.num_query_groups),
            "layers": (shape.num_layers,),
            "experts": (shape.num_layers, shape.num_experts),
            "expert_ffn": (shape.num_layers, shape.num_experts, shape.moe_ffn_hidden_size),
            "routing": (shape.num_layers, shape.num_experts),
        }
        if shape.is_moe and (self.experts is None or self.expert_ffn is None):
            raise PruneError(f"scores ({self.method}) have no expert scores, and the model has {shape.num_experts} "
                             "experts: were they computed for another model?")
        for name, want in expect.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != want:
                raise PruneError(f"scores '{name}' have shape {tuple(t.shape)}, the model needs {want}: "
                                 "were they computed for another model?")
            if t is not None and not bool(torch.isfinite(t).all()):
                raise PruneError(f"scores '{name}' hold NaN or Inf values (activations overflowed, e.g. in "
                                 "--dtype float16?): the units they rank would be arbitrary; score in float32")
        return self


def spread_middle(num_layers: int, n_drop: int) -> tuple[int, ...]:
    """The seed project's depth rule: drop layers spread evenly through the middle, never first or last."""
    if n_drop == 0:
        return ()
    inner = num_layers - 2
    if n_drop > inner:  # cannot spare first and last: fall back to the last middle-most ones
        return tuple(range(1, num_layers))[:n_drop]
    step = inner / n_drop
    return tuple(sorted({1 + int(step * i + step / 2) for i in range(n_drop)}))


def top_k(score: torch.Tensor, k: int, slices: int = 1) -> tuple[int, ...]:
    """Indices of the ``k`` highest scores, ``k/slices`` from each contiguous slice, ascending.

    Ties go to the lower index so the choice is deterministic.
    """
    n = score.numel()
    per_n, per_k = n // slices, k // slices
    kept: list[int] = []
    for s in range(slices):
        part = score[s * per_n : (s + 1) * per_n].double()
        order = torch.argsort(-part, stable=True)[:per_k]
        kept.extend((order + s * per_n).tolist())
    return tuple(sorted(kept))


def select_experts(scores: Scores, layer: int, target: ModelShape, tp_slices: int = 1,
                   ep_slices: int = 1) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """The kept experts of ``layer`` (most important first to survive), as many from each of ``ep_slices``
    expert-parallel ranks, and the kept FFN channels of each, as many in each expert and in each of its ``tp_slices``
    TP slices; nothing for a dense model."""
    if not target.is_moe:
        return (), ()
    experts = top_k(scores.experts[layer], target.num_experts, ep_slices)
    return experts, tuple(top_k(scores.expert_ffn[layer, e], target.moe_ffn_hidden_size, tp_slices) for e in experts)


def dense_layer_plan(layer: int, head_s: torch.Tensor, group_s: torch.Tensor | None, ffn_s: torch.Tensor,
                     shape: ModelShape, target: ModelShape, slices: int = 1, experts: tuple[int, ...] = (),
                     expert_ffn: tuple[tuple[int, ...], ...] = ()) -> LayerPlan:
    """One kept layer's choice from its own scores: the best query groups (``slices`` TP slices kept equal), the best
    heads within each, the best FFN channels. Per layer, so the refit can choose each layer as it reaches it."""
    hpg_s, hpg_t = shape.heads_per_group, target.heads_per_group
    if group_s is None:
        group_s = head_s.reshape(-1, hpg_s).sum(1)
    groups = top_k(group_s, target.num_query_groups, slices)
    heads: list[int] = []
    for g in groups:
        within = top_k(head_s[g * hpg_s : (g + 1) * hpg_s], hpg_t)
        heads.extend(g * hpg_s + h for h in within)
    ffn = top_k(ffn_s, target.ffn_hidden_size, slices)
    return LayerPlan(layer, groups, tuple(heads), ffn, experts, expert_ffn)


def make_plan(
    shape: ModelShape,
    target: ModelShape,
    scores: Scores,
    drop_layers: Sequence[int] | None = None,
    tp: int = 1,
    balance: bool = True,
    info: dict[str, Any] | None = None,
    ep: int = 1,
) -> PrunePlan:
    """Turn scores into a plan for ``target``; with ``balance`` every TP slice (and every expert-parallel rank of
    ``ep``) keeps equal counts."""
    scores.check(shape)
    slices = tp if balance else 1
    if balance:
        check_tp_balance(shape, target, tp, ep)
    L = shape.num_layers
    if drop_layers is not None:
        kept_layers = tuple(i for i in range(L) if i not in set(drop_layers))
        layer_rule = "explicit"
    elif target.num_layers == L:
        kept_layers, layer_rule = tuple(range(L)), "all"
    elif scores.layers is not None:
        kept_layers, layer_rule = top_k(scores.layers, target.num_layers), "block-influence"
    else:
        dropped = spread_middle(L, L - target.num_layers)
        kept_layers = tuple(i for i in range(L) if i not in dropped)
        layer_rule = "spread-middle"
    layer_plans = []
    for i in kept_layers:
        group_s = None if scores.groups is None else scores.groups[i]
        experts, expert_ffn = select_experts(scores, i, target, slices, ep if balance else 1)
        layer_plans.append(dense_layer_plan(i, scores.heads[i], group_s, scores.ffn[i], shape, target, slices,
                                            experts, expert_ffn))
    hidden = top_k(scores.hidden, target.hidden_size)
    meta = {"method": scores.method, "layer_rule": layer_rule, "tp": tp,
            "prune_type": "balance" if balance else "unbalance", **({"ep": ep} if shape.is_moe else {})}
    meta.update(info or {})
    return PrunePlan(shape, target, hidden, tuple(layer_plans), info=meta).validate()
