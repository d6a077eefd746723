"""Selectors: decide *which* channels, heads, groups and layers survive.

Every selector produces :class:`Scores` (higher = more important); one function, :func:`make_plan`,
turns scores and a target shape into a :class:`PrunePlan`, so top-k, GQA grouping and tensor-parallel
balancing are written once whatever the scoring method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from .plan import LayerPlan, PrunePlan
from .shape import ModelShape, PruneError, nearest_multiples


class TensorSource(Protocol):
    """Read access to a checkpoint's logical (unsharded, unfused) tensors, one at a time."""

    shape: ModelShape

    def get(self, role: str, layer: int | None = None) -> torch.Tensor: ...

    def has(self, role: str, layer: int | None = None) -> bool: ...


@dataclass(frozen=True)
class Scores:
    """Importance per unit of each axis; ``groups``/``layers`` may be None (derived or heuristic)."""

    hidden: torch.Tensor  # [h]
    heads: torch.Tensor  # [L, np]
    ffn: torch.Tensor  # [L, f]
    groups: torch.Tensor | None = None  # [L, ng]; None: sum of the group's head scores
    layers: torch.Tensor | None = None  # [L]; None: the seed's "spread through the middle" rule
    method: str = "unknown"

    def save(self, path: Path) -> None:
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path: Path) -> "Scores":
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
            raise PruneError(f"cannot read scores file {path}: {e}") from e
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})

    def check(self, shape: ModelShape) -> "Scores":
        expect = {
            "hidden": (shape.hidden_size,),
            "heads": (shape.num_layers, shape.num_attention_heads),
            "ffn": (shape.num_layers, shape.ffn_hidden_size),
            "groups": (shape.num_layers, shape.num_query_groups),
            "layers": (shape.num_layers,),
        }
        for name, want in expect.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != want:
                raise PruneError(f"scores '{name}' have shape {tuple(t.shape)}, the model needs {want}: "
                                 "were they computed for another model?")
        return self


# ---- scoring methods ---------------------------------------------------------------------------


def random_scores(shape: ModelShape, seed: int = 0) -> Scores:
    """Seeded random scores: the seed project's method (same seed, same plan)."""
    g = torch.Generator().manual_seed(seed)
    L = shape.num_layers
    return Scores(
        hidden=torch.rand(shape.hidden_size, generator=g),
        heads=torch.rand(L, shape.num_attention_heads, generator=g),
        ffn=torch.rand(L, shape.ffn_hidden_size, generator=g),
        groups=torch.rand(L, shape.num_query_groups, generator=g),
        method="random",
    )


def _sq_rows(t: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """Sum of squares per block of ``unit`` rows: [n*unit, k] -> [n]."""
    t = t.float()
    return t.pow(2).reshape(-1, unit * t.shape[1] if t.dim() == 2 else unit).sum(1)


def magnitude_scores(src: TensorSource, progress: Callable[[Any], Any] = iter) -> Scores:
    """L2 norm of every weight coupled to each unit (channel, head, group, FFN channel)."""
    s = src.shape
    hn = s.head_dim
    hidden = _sq_rows(src.get("embed").t())
    if src.has("lm_head"):
        hidden += _sq_rows(src.get("lm_head").t())
    heads, groups, ffn = [], [], []
    for layer in progress(range(s.num_layers)):
        q, k, v, o = (src.get(r, layer) for r in ("q", "k", "v", "o"))
        gate, up, down = (src.get(r, layer) for r in ("gate", "up", "down"))
        for t in (q, k, v, gate, up):
            hidden += _sq_rows(t.t())
        for t in (o, down):
            hidden += _sq_rows(t)
        head = _sq_rows(q, hn) + _sq_rows(o.t(), hn)
        heads.append(head.sqrt())
        grp = _sq_rows(k, hn) + _sq_rows(v, hn) + head.reshape(s.num_query_groups, -1).sum(1)
        groups.append(grp.sqrt())
        ffn.append((_sq_rows(gate) + _sq_rows(up) + _sq_rows(down.t())).sqrt())
    return Scores(hidden.sqrt(), torch.stack(heads), torch.stack(ffn), torch.stack(groups), method="magnitude")


# ---- target resolution -------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRequest:
    """What the user asked for; None keeps that axis."""

    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    num_layers: int | None = None
    drop_layers: tuple[int, ...] | None = None


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
        ffn_hidden_size=ffn,
    )
    return target, drop


def check_tp_balance(shape: ModelShape, target: ModelShape, tp: int) -> None:
    """Balanced TP pruning keeps the same count in each of ``tp`` slices: sizes must divide evenly."""
    if tp < 1:
        raise PruneError(f"--tp {tp}: must be at least 1")
    for name, src, tgt in (
        ("num_query_groups", shape.num_query_groups, target.num_query_groups),
        ("ffn_hidden_size", shape.ffn_hidden_size, target.ffn_hidden_size),
    ):
        if src % tp:
            raise PruneError(f"source {name} {src} is not divisible by --tp {tp}")
        if tgt % tp:
            raise PruneError(
                f"--{name.replace('_', '-')} {tgt} is not divisible by --tp {tp} (balanced pruning keeps the same "
                f"number in each TP slice); nearest valid: {nearest_multiples(tgt, tp, src)}"
            )


# ---- plan construction -------------------------------------------------------------------------


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


def make_plan(
    shape: ModelShape,
    target: ModelShape,
    scores: Scores,
    drop_layers: Sequence[int] | None = None,
    tp: int = 1,
    balance: bool = True,
    info: dict[str, Any] | None = None,
) -> PrunePlan:
    """Turn scores into a plan for ``target``; with ``balance`` every TP slice keeps equal counts."""
    scores.check(shape)
    slices = tp if balance else 1
    if balance:
        check_tp_balance(shape, target, tp)
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
    hpg_s, hpg_t = shape.heads_per_group, target.heads_per_group
    layer_plans = []
    for i in kept_layers:
        head_s = scores.heads[i]
        group_s = scores.groups[i] if scores.groups is not None else head_s.reshape(-1, hpg_s).sum(1)
        groups = top_k(group_s, target.num_query_groups, slices)
        heads: list[int] = []
        for g in groups:
            within = top_k(head_s[g * hpg_s : (g + 1) * hpg_s], hpg_t)
            heads.extend(g * hpg_s + h for h in within)
        ffn = top_k(scores.ffn[i], target.ffn_hidden_size, slices)
        layer_plans.append(LayerPlan(i, groups, tuple(heads), ffn))
    hidden = top_k(scores.hidden, target.hidden_size)
    meta = {"method": scores.method, "layer_rule": layer_rule, "tp": tp,
            "prune_type": "balance" if balance else "unbalance"}
    meta.update(info or {})
    return PrunePlan(shape, target, hidden, tuple(layer_plans), info=meta).validate()


def _progress(desc: str, quiet: bool):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="layer", disable=quiet)


def _activation_scores(src: TensorSource, opt: dict[str, Any]) -> Scores:
    """Activations on calibration text + block influence; imported lazily (it needs transformers)."""
    from .importance import activation_scorer

    return activation_scorer(src, opt)


# method name -> scorer(source, options); options are the CLI's flags as a dict.
SCORERS: dict[str, Callable[[TensorSource, dict[str, Any]], Scores]] = {
    "random": lambda src, opt: random_scores(src.shape, int(opt.get("seed", 0))),
    "magnitude": lambda src, opt: magnitude_scores(src, _progress("magnitude", bool(opt.get("no_progress")))),
    "activation": _activation_scores,
}
