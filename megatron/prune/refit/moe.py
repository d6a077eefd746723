"""The refit of a mixture-of-experts block (Qwen3-MoE, Mixtral), two streams side by side as for a dense layer
(:mod:`.layer`): the router and each kept expert's linears are refit so that, on calibration tokens, they give what
the original gave on the original model's inputs.

The block is held as transformers 5 holds it: ``mlp.gate`` (the router, ``[E, h]``) and ``mlp.experts`` with
``gate_up_proj [E, 2F, h]`` (each expert's gate rows, then its up rows) and ``down_proj [E, h, F]``.

- Router: its kept rows, on every token, against the original router's logits of the kept experts.
- Expert k's gate/up: on the tokens the pruned (and refitted) router sends to it, against the original expert's kept
  gate/up outputs, each token weighted by its routing weight (the factor that scales the expert's output in the
  block).
- Expert k's down_proj: on the same tokens, against the original expert's output (kept hidden channels), each token
  weighted likewise. Dropped experts are not compensated: the router renormalises over the kept ones.

An expert no calibration token reaches (or reaches only with routing weight 0: top-k over as many kept experts)
keeps its sliced weights; one reached by fewer tokens than its input width
moves only within the span of the inputs it saw (the ridge pulls toward the sliced weights elsewhere).
"""

from __future__ import annotations

import torch

from megatron.prune.core.slicing import AxisIndex, slice_role
from megatron.prune.refit.solve import GroupReport, refit_to_targets

ROUTER = "mlp.gate.weight"
GATE_UP = "mlp.experts.gate_up_proj"
DOWN = "mlp.experts.down_proj"

# the roles each refit group writes in a MoE layer (the router reads what gate/up read: it goes with them)
MOE_GROUP_ROLES = {"gate_up": ("router", "expert_gate", "expert_up"), "down": ("expert_down",)}


def is_moe_param(name: str) -> bool:
    """Whether a decoder layer's parameter ``name`` is its router's or its fused experts' (no HF role name)."""
    return name.startswith(("mlp.gate.", "mlp.experts."))


def is_moe_layer(layer: torch.nn.Module) -> bool:
    """Whether a decoder layer's MLP is a mixture of experts (a router and fused experts)."""
    return hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")


def ffn_rows(index: AxisIndex, width: int) -> torch.Tensor:
    """Rows of an expert's kept gate/up outputs in its fused ``[2F, h]`` gate_up (gate rows, then up rows)."""
    keep = torch.arange(width) if index.expert_ffn is None else torch.as_tensor(index.expert_ffn, dtype=torch.long)
    return torch.cat([keep, keep + width])


def source_expert(index: AxisIndex, k: int) -> int:
    """The original number of kept expert ``k``."""
    return k if index.experts is None else index.experts[k]


def pruned_moe_param(name: str, original: torch.Tensor, experts: list[AxisIndex]) -> torch.Tensor:
    """The plan's slice of a MoE parameter held fused in memory (``experts``: each kept expert's indices, in the
    order kept, as :func:`megatron.prune.core.slicing.layer_index` gives them)."""
    if name == ROUTER:
        return slice_role("router", original, experts[0], 0)
    if name not in (GATE_UP, DOWN):
        raise KeyError(f"{name}: not a mixture-of-experts parameter")
    parts = []
    for k, index in enumerate(experts):
        e = source_expert(index, k)
        if name == GATE_UP:
            F = original.shape[1] // 2
            parts.append(torch.cat([slice_role("expert_gate", original[e, :F], index, 0),
                                    slice_role("expert_up", original[e, F:], index, 0)]))
        else:
            parts.append(slice_role("expert_down", original[e], index, 0))
    return torch.stack(parts)


def moe_tensors(mlp: torch.nn.Module, roles: set[str]) -> dict[str, torch.Tensor]:
    """The refitted tensors of a pruned MoE block by store key (``router``; ``expert_gate.k`` and so on for kept
    expert k), those of ``roles`` only."""
    out = {"router": mlp.gate.weight} if "router" in roles else {}
    gate_up, down = mlp.experts.gate_up_proj, mlp.experts.down_proj
    F = gate_up.shape[1] // 2
    for k in range(gate_up.shape[0]):
        parts = {"expert_gate": gate_up[k, :F], "expert_up": gate_up[k, F:], "expert_down": down[k]}
        out.update({f"{role}.{k}": t for role, t in parts.items() if role in roles})
    return out


class Errors:
    """Error terms and target energy summed over experts, each weighted by its tokens: one relative error for the
    group, as a dense group reports it."""

    def __init__(self) -> None:
        self.terms, self.energy = [0.0, 0.0], 0.0

    def add(self, terms: list[float], energy: float, tokens: int) -> None:
        self.terms = [a + tokens * b for a, b in zip(self.terms, terms)]
        self.energy += tokens * energy

    def report(self) -> GroupReport:
        return GroupReport.relative(self.terms, self.energy)


def refit_linear(weight: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, delta: float, storage: torch.dtype | None,
                 errors: Errors) -> None:
    """Refit ``weight [out, n]`` in place so that ``weight @ x_s`` best gives ``y`` on the tokens ``xs [T, n]``,
    ``ys [T, out]`` (an expert's tokens, or the router's), adding its error terms to ``errors``."""
    errors.add(*refit_to_targets(weight, [xs], [ys], delta, storage))


def refit_gate_ups(s_experts: torch.nn.Module, t_experts: torch.nn.Module, xs: torch.Tensor, xt: torch.Tensor,
                   kept: torch.Tensor, experts: list[AxisIndex], routed: list, delta: float,
                   storage: torch.dtype | None) -> GroupReport:
    """Refit each kept expert's gate/up rows, on its tokens (each scaled by its routing weight), against the original
    expert's kept gate/up outputs on the original's inputs."""
    errors, t_gu = Errors(), t_experts.gate_up_proj
    F = t_gu.shape[1] // 2
    for k, (index, (token, w)) in enumerate(zip(experts, routed)):
        if token.numel():
            y = (xt[token] @ t_gu[int(kept[k])].T).index_select(1, ffn_rows(index, F).to(xt.device))
            refit_linear(s_experts.gate_up_proj[k], w * xs[token], w * y, delta, storage, errors)
    return errors.report()


def expert_inputs(experts: torch.nn.Module, k: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What expert ``k``'s down_proj reads on tokens ``x``, scaled by their routing weights ``w``: its output in the
    block is ``down_proj @`` that."""
    gate, up = (x @ experts.gate_up_proj[k].T).chunk(2, dim=-1)
    return w * (experts.act_fn(gate) * up)


def refit_downs(s_experts: torch.nn.Module, t_experts: torch.nn.Module, xs: torch.Tensor, xt: torch.Tensor,
                kept: torch.Tensor, hidden: torch.Tensor, routed: list, delta: float,
                storage: torch.dtype | None) -> GroupReport:
    """Refit each kept expert's down_proj, on its tokens (each scaled by its routing weight), against the original
    expert's output (kept hidden channels) on the original's inputs. (Fitting them in turn to what the whole block's
    output misses instead, which would let the kept experts take up what the dropped ones leave out, lowered the
    calibration error but raised perplexity on held-out text: bench/README.md.)"""
    errors, t_gu, t_down, act = Errors(), t_experts.gate_up_proj, t_experts.down_proj, t_experts.act_fn
    hidden = hidden.to(xt.device)
    for k, (token, w) in enumerate(routed):
        if token.numel():
            e = int(kept[k])
            g, u = (xt[token] @ t_gu[e].T).chunk(2, dim=-1)
            y = w * ((act(g) * u) @ t_down[e].index_select(0, hidden).T)
            refit_linear(s_experts.down_proj[k], expert_inputs(s_experts, k, xs[token], w), y, delta, storage, errors)
    return errors.report()


@torch.no_grad()
def refit_moe(student: torch.nn.Module, teacher: torch.nn.Module, xs: list[torch.Tensor], xt: list[torch.Tensor],
              experts: list[AxisIndex], groups: tuple[str, ...], delta: float,
              storage: dict[str, torch.dtype] | None = None) -> tuple[list[torch.Tensor], dict[str, GroupReport]]:
    """Refit the pruned MoE block ``student`` (``mlp`` of the pruned layer) from its inputs ``xs`` against the
    original block ``teacher`` on its inputs ``xt`` (per batch, ``[b, s, h']`` and ``[b, s, h]``); ``experts``:
    each kept expert's indices. Returns the refitted block's outputs per batch (its stock forward) and a report per
    refit group (``router`` and ``gate_up`` with gate/up in ``groups``, ``down``)."""
    storage = storage or {}
    Xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    Xt = torch.cat([x.reshape(-1, x.shape[-1]) for x in xt])
    hidden = torch.arange(Xt.shape[1]) if experts[0].hidden is None else torch.as_tensor(experts[0].hidden)
    kept = torch.as_tensor([source_expert(index, k) for k, index in enumerate(experts)], dtype=torch.long)
    reports: dict[str, GroupReport] = {}
    if "gate_up" in groups:
        errors = Errors()
        targets = Xt @ teacher.gate.weight.index_select(0, kept.to(Xt.device)).T.to(Xt.dtype)
        refit_linear(student.gate.weight, Xs, targets, delta, storage.get("router"), errors)
        reports["router"] = errors.report()
    _, weights, chosen = student.gate(Xs)
    routed = []  # per kept expert: the tokens the router sends to it with a weight, and their routing weights
    for k in range(len(experts)):
        token, slot = torch.where((chosen == k) & (weights > 0))  # a zero weight: the expert adds nothing there
        routed.append((token, weights[token, slot].to(Xs.dtype)[:, None]))
    if "gate_up" in groups:
        reports["gate_up"] = refit_gate_ups(student.experts, teacher.experts, Xs, Xt, kept, experts, routed, delta,
                                            storage.get("expert_gate"))
    if "down" in groups:
        reports["down"] = refit_downs(student.experts, teacher.experts, Xs, Xt, kept, hidden, routed, delta,
                                      storage.get("expert_down"))
    return [student(x) for x in xs], reports
