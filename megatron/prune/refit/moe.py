"""The refit of a mixture-of-experts block (Qwen3-MoE, Mixtral), two streams side by side as for a dense layer
(:mod:`.layer`): the router and each kept expert's linears are refit so that, on calibration tokens, they give what
the original gave on the original model's inputs.

The block is held as transformers 5 holds it: ``mlp.gate`` (the router, ``[E, h]``) and ``mlp.experts`` with
``gate_up_proj [E, 2F, h]`` (each expert's gate rows, then its up rows) and ``down_proj [E, h, F]``.

- Router: its kept rows, on every token, against the original router's logits of the kept experts.
- Expert k: on the tokens the pruned (and refitted) router sends to it, its gate/up rows against the original
  expert's kept gate/up outputs, then its down_proj against the original expert's output (kept hidden channels),
  each token weighted by its routing weight, the factor that scales the expert's output in the block. An expert no
  calibration token reaches keeps its sliced weights; one reached by fewer tokens than its input width moves only
  within the span of the inputs it saw (the ridge pulls toward the sliced weights elsewhere).
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


@torch.no_grad()
def refit_moe(student: torch.nn.Module, teacher: torch.nn.Module, xs: list[torch.Tensor], xt: list[torch.Tensor],
              experts: list[AxisIndex], groups: tuple[str, ...], delta: float,
              storage: dict[str, torch.dtype] | None = None) -> tuple[list[torch.Tensor], dict]:
    """Refit the pruned MoE block ``student`` (``mlp`` of the pruned layer) from its inputs ``xs`` against the
    original block ``teacher`` on its inputs ``xt`` (per batch, ``[b, s, h']`` and ``[b, s, h]``); ``experts``:
    each kept expert's indices. Returns the refitted block's outputs per batch (its stock forward) and a report per
    refit group (``router``, ``gate_up``, ``down``)."""
    storage = storage or {}
    Xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    Xt = torch.cat([x.reshape(-1, x.shape[-1]) for x in xt])
    hidden = torch.arange(Xt.shape[1]) if experts[0].hidden is None else torch.as_tensor(experts[0].hidden)
    kept = torch.as_tensor([source_expert(index, k) for k, index in enumerate(experts)], dtype=torch.long)
    reports: dict[str, Errors] = {g: Errors() for g in ("router", "gate_up", "down")
                                  if (g == "router" and "gate_up" in groups) or g in groups}
    if "router" in reports:
        targets = Xt @ teacher.gate.weight.index_select(0, kept.to(Xt.device)).T.to(Xt.dtype)
        refit_linear(student.gate.weight, Xs, targets, delta, storage.get("router"), reports["router"])
    _, weights, chosen = student.gate(Xs)
    t_gu, t_down, act = teacher.experts.gate_up_proj, teacher.experts.down_proj, teacher.experts.act_fn
    s_gu, s_down = student.experts.gate_up_proj, student.experts.down_proj
    F = t_gu.shape[1] // 2
    for k, index in enumerate(experts):
        token, slot = torch.where(chosen == k)
        if token.numel() == 0:
            continue
        w = weights[token, slot].to(Xs.dtype)[:, None]
        x_s, x_t = Xs[token], Xt[token]
        e = int(kept[k])
        g_t, u_t = (x_t @ t_gu[e].T).chunk(2, dim=-1)
        if "gate_up" in reports:
            rows = ffn_rows(index, F).to(g_t.device)
            refit_linear(s_gu[k], w * x_s, w * torch.cat([g_t, u_t], -1).index_select(1, rows), delta,
                         storage.get("expert_gate"), reports["gate_up"])
        if "down" in reports:
            g_s, u_s = (x_s @ s_gu[k].T).chunk(2, dim=-1)
            y = (act(g_t) * u_t) @ t_down[e].index_select(0, hidden.to(x_t.device)).T
            refit_linear(s_down[k], w * (act(g_s) * u_s), w * y, delta, storage.get("expert_down"), reports["down"])
    return [student(x) for x in xs], {g: r.report() for g, r in reports.items()}
