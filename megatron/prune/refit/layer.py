"""The refit of one decoder layer, two streams side by side: the original layer runs on the original model's hidden
states (the teacher), the pruned layer on the pruned model's (the student). Each linear of the pruned layer that
reads a pruned axis is refit, in forward order, so that on calibration tokens it gives what the original linear
gave: ``W' = argmin E‖W' x_s − W x_t‖²`` (:class:`.solve.Ridge`), with ``x_s`` the pruned layer's own
input as the already refitted linears before it make it.

The layer is taken apart as the stock ``LlamaDecoderLayer.forward`` composes it (norm, attention, residual, norm,
MLP, residual; Mistral, Qwen2 and Qwen3 are the same, Qwen3's QK-norm running inside the stock attention), so the
pruned layer's outputs are what its stock forward gives. The QK-norm weights read no pruned axis: never refit. A
mixture-of-experts block (Qwen3-MoE, Mixtral) in place of the MLP is refit by :mod:`.moe`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from megatron.prune.core.slicing import AxisIndex, expand_heads, slice_role
from megatron.prune.refit.moe import is_moe_layer, refit_moe
from megatron.prune.refit.solve import DEFAULT_DAMPING, GroupReport, Moment, Ridge, refit_rows, refit_to_targets

# reader groups, in forward order: the linears of a group read the same input and are solved together
GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "qkv": (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj")),
    "o": (("o", "self_attn.o_proj"),),
    "gate_up": (("gate", "mlp.gate_proj"), ("up", "mlp.up_proj")),
    "down": (("down", "mlp.down_proj"),),
}
ATTENTION_KWARGS = ("attention_mask", "position_ids", "position_embeddings", "cache_position")


@dataclass
class Call:
    """One batch's call of a decoder layer: hidden states ``[b, s, h]`` and the rest (mask, rotary embeddings)."""

    hidden: torch.Tensor
    kwargs: dict


@dataclass
class LayerReport:
    groups: dict[str, GroupReport] = field(default_factory=dict)


def attention_kwargs(kwargs: dict) -> dict:
    """The part of a layer call its attention module takes."""
    return {k: v for k, v in kwargs.items() if k in ATTENTION_KWARGS}


@contextmanager
def without(module: torch.nn.Module, child: str) -> Iterator[None]:
    """``module.child`` replaced by the identity for the duration (its input becomes the module's output)."""
    kept = getattr(module, child)
    setattr(module, child, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(module, child, kept)


@contextmanager
def capture_inputs(layer: torch.nn.Module, names: dict[str, str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the input of the submodules ``names`` (group -> module path) of ``layer`` on every call."""
    seen: dict[str, list[torch.Tensor]] = {g: [] for g in names}
    modules = dict(layer.named_modules())
    handles = [modules[path].register_forward_pre_hook(lambda m, a, g=g: seen[g].append(a[0]))
               for g, path in names.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


READER_INPUTS = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj",
                 "down": "mlp.down_proj"}
MOE_INPUT = "moe"  # the input of a mixture-of-experts block (router and experts), in TeacherLayer.inputs


def layer_groups(layer: torch.nn.Module) -> tuple[str, ...]:
    """The reader groups of :data:`GROUPS` that ``layer`` has: all of them, or the attention's in a
    mixture-of-experts layer (whose router and experts :mod:`.moe` refits)."""
    modules = dict(layer.named_modules())
    return tuple(g for g, members in GROUPS.items() if members[0][1] in modules)


@dataclass
class TeacherLayer:
    """The original layer's run over the calibration batches: its outputs; per reader group, either its input
    (``inputs``) or its outputs (``targets``, the group's roles side by side, ``[T, n]`` per batch), whichever is
    narrower once the pruned layer's kept outputs are taken (the cross moment of the refit is that width times the
    pruned input's); per role, the sum over tokens of each output feature's square (``sq``, the scale of the
    reconstruction error). Nothing here depends on which units the pruned layer keeps, only on how many: the refit
    can choose them after this run (:func:`group_energy`, :func:`kept_targets`)."""

    outputs: list[torch.Tensor]
    inputs: dict[str, list[torch.Tensor]]
    sq: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    targets: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def kept_outputs(role: str, index: AxisIndex, head_dim: int) -> torch.Tensor:
    """Positions of the output features of ``role`` the pruned linear keeps."""
    axis = OUTPUT_AXIS[role]
    keep = torch.as_tensor(index.for_axis(axis), dtype=torch.long)
    return expand_heads(keep, head_dim) if axis in ("heads", "groups") else keep


def group_rows(run: TeacherLayer, group: str, index: AxisIndex, head_dim: int) -> torch.Tensor:
    """Positions of the kept outputs of ``group`` in its roles' outputs side by side."""
    rows, start = [], 0
    for role, _ in GROUPS[group]:
        rows.append(kept_outputs(role, index, head_dim) + start)
        start += run.sq[role].numel()
    return torch.cat(rows)


def group_energy(run: TeacherLayer, group: str, index: AxisIndex, head_dim: int) -> float:
    """``E‖y‖²`` of the original group's kept outputs."""
    total = sum(float(run.sq[role].index_select(0, kept_outputs(role, index, head_dim)).sum())
                for role, _ in GROUPS[group])
    return total / max(run.tokens, 1)


def kept_targets(run: TeacherLayer, group: str, index: AxisIndex, head_dim: int) -> list[torch.Tensor]:
    """The original group's kept outputs per batch ``[T, k]`` (``group`` is in ``run.targets``)."""
    rows = group_rows(run, group, index, head_dim)
    ys = run.targets[group]
    if not ys or rows.numel() == ys[0].shape[1]:  # kept indices are unique: all of them, in order
        return ys
    rows = rows.to(ys[0].device)
    return [y.index_select(1, rows) for y in ys]  # 2-D: index_select on a 3-D tensor's last dim is ~10x slower


def by_outputs(layer: torch.nn.Module, group: str, index: AxisIndex, head_dim: int) -> bool:
    """Whether the refit of ``group`` reads the original's kept outputs rather than its inputs: when they are fewer
    (down_proj after hidden or FFN pruning: ``h'`` outputs against ``f`` inputs). Counts only: ``index`` may hold any
    units of the right number."""
    modules = dict(layer.named_modules())
    rows = sum(len(kept_outputs(role, index, head_dim)) for role, _ in GROUPS[group])
    return rows < modules[GROUPS[group][0][1]].weight.shape[1]


@torch.no_grad()
def run_teacher(layer: torch.nn.Module, calls: list[Call], index: AxisIndex | None, head_dim: int) -> TeacherLayer:
    """The original layer's stock forward on every batch; with ``index`` (the layer is kept; only its unit counts
    matter) also what its pruned counterpart's refit needs."""
    outputs: list[torch.Tensor] = []
    if index is None:
        for c in calls:
            out = layer(c.hidden, **c.kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return TeacherLayer(outputs, {})
    modules = dict(layer.named_modules())
    present = layer_groups(layer)
    narrow = {g for g in present if by_outputs(layer, g, index, head_dim)}
    sq: dict[str, torch.Tensor] = {}
    kept: dict[str, list[torch.Tensor]] = {role: [] for g in narrow for role, _ in GROUPS[g]}

    def watch(role: str):
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            y = out if module.bias is None else out - module.bias  # W x: the bias stays as it is
            y = y.reshape(-1, y.shape[-1])
            yf = y.float()
            part = (yf * yf).sum(0).double()
            sq[role] = part if role not in sq else sq[role] + part
            if role in kept:
                kept[role].append(y)
        return hook

    handles = [modules[path].register_forward_hook(watch(role)) for g in present for role, path in GROUPS[g]]
    readers = {g: p for g, p in READER_INPUTS.items() if g in present and g not in narrow}
    if is_moe_layer(layer):
        readers[MOE_INPUT] = "mlp"
    tokens = 0
    try:
        with capture_inputs(layer, readers) as seen:
            for c in calls:
                out = layer(c.hidden, **c.kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
                tokens += c.hidden.shape[0] * c.hidden.shape[1]
    finally:
        for h in handles:
            h.remove()
    joined = {g: [ys[0] if len(ys) == 1 else torch.cat(ys, -1) for ys in zip(*(kept[role] for role, _ in GROUPS[g]))]
              for g in narrow}
    return TeacherLayer(outputs, seen, {r: v.cpu() for r, v in sq.items()}, tokens, joined)


OUTPUT_AXIS = {"q": "heads", "k": "groups", "v": "groups", "o": "hidden", "gate": "ffn", "up": "ffn", "down": "hidden"}


def teacher_rows(role: str, w: torch.Tensor, index: AxisIndex, head_dim: int) -> torch.Tensor:
    """The original weight restricted to the outputs the pruned linear keeps (its inputs all kept): the target."""
    axis = OUTPUT_AXIS[role]
    return slice_role(role, w, AxisIndex(**{axis: index.for_axis(axis)}), head_dim)


def cross_moment(group: str, xs: list[torch.Tensor], run: TeacherLayer, index: AxisIndex, head_dim: int,
                 product: torch.dtype = torch.float32) -> tuple[torch.Tensor, bool]:
    """``E[y x_sᵀ]`` (float64), ``y`` the original group's kept outputs, when the teacher run kept them; else
    ``E[x_t x_sᵀ]`` of its inputs, from which :func:`refit_group` takes the targets' rows. Says which."""
    C = Moment(product)
    if group in run.targets:
        for s, y in zip(xs, kept_targets(run, group, index, head_dim), strict=True):
            C.add(y, s)
        return C.pop_mean(), True
    for s, t in zip(xs, run.inputs[group], strict=True):
        C.add(t, s)
    return C.pop_mean(), False


def refit_group(student: torch.nn.Module, teacher: torch.nn.Module, group: str, xs: list[torch.Tensor],
                run: TeacherLayer, index: AxisIndex, head_dim: int, delta: float = DEFAULT_DAMPING,
                storage: dict[str, torch.dtype] | None = None, product: torch.dtype = torch.float32) -> GroupReport:
    """Refit the linears of ``group`` in ``student`` from its inputs ``xs`` (per batch) against what the original
    gave in ``run`` (whose inputs or outputs for the group are released once read). Each refitted weight is rounded
    to its ``storage`` dtype (role -> dtype), so the layers after it see what will be written. Without kept outputs
    the targets are ``W_t E[x_t x_sᵀ]``, a block of rows at a time (float32 products)."""
    H = Moment(product)
    for s in xs:
        H.add(s)
    ridge = Ridge.factor(H.pop_mean(), delta)
    C, of_outputs = cross_moment(group, xs, run, index, head_dim, product)
    C = C if of_outputs else C.float()
    run.inputs.pop(group, None)  # used up: the layer's later groups run without them
    run.targets.pop(group, None)
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    errors, start = [0.0, 0.0], 0
    with torch.no_grad():
        for role, path in GROUPS[group]:
            w = s_mods[path].weight
            rows = None if of_outputs else teacher_rows(role, t_mods[path].weight, index, head_dim).float()

            def targets(r0: int, r1: int, at: int = start, rows: torch.Tensor | None = rows) -> torch.Tensor:
                return C[at + r0:at + r1] if rows is None else (rows[r0:r1] @ C).double()
            part = refit_rows(w, ridge, targets, (storage or {}).get(role))
            errors = [e + p for e, p in zip(errors, part)]
            start += w.shape[0]
    return GroupReport.relative(errors, group_energy(run, group, index, head_dim))


def refit_to_residual(linear: torch.nn.Module, xs: list[torch.Tensor], targets: list[torch.Tensor],
                      delta: float = DEFAULT_DAMPING, storage: torch.dtype | None = None,
                      product: torch.dtype = torch.float32) -> GroupReport:
    """Refit ``linear`` so that its output on ``xs`` best gives ``targets`` (per batch, least squares with the ridge
    toward its current weights): what the block's last linear must add to the residual stream."""
    terms, energy, _ = refit_to_targets(linear.weight, xs, targets, delta, storage, product)
    return GroupReport.relative(terms, energy)


@torch.no_grad()
def refit_layer(student: torch.nn.Module, teacher: torch.nn.Module, student_calls: list[Call], run: TeacherLayer,
                index: AxisIndex, head_dim: int, groups: tuple[str, ...] = tuple(GROUPS),
                delta: float = DEFAULT_DAMPING, storage: dict[str, torch.dtype] | None = None,
                residual: list[torch.Tensor] | None = None, experts: list[AxisIndex] | None = None
                ) -> tuple[list[torch.Tensor], LayerReport]:
    """Refit ``groups`` of the pruned layer ``student`` in forward order; its outputs on every batch (what its stock
    forward gives with the refitted weights) and how much each refit reduced the error. With ``residual`` (per batch,
    the original's hidden states, kept channels, after a run of dropped layers that follows this one), down_proj is
    refit so the layer's output is that residual stream instead (:func:`refit_to_residual`). A mixture-of-experts
    layer (``experts``: each kept expert's indices) has its router and experts refit by :func:`.moe.refit_moe`."""
    report = LayerReport()
    norm_in = [student.input_layernorm(c.hidden) for c in student_calls]
    if "qkv" in groups:
        report.groups["qkv"] = refit_group(student, teacher, "qkv", norm_in, run, index, head_dim, delta, storage)
    attn = student.self_attn
    with without(attn, "o_proj"):  # the attention's output before o_proj: what o_proj reads
        o_in = [attn(hidden_states=x, **attention_kwargs(c.kwargs))[0] for x, c in zip(norm_in, student_calls)]
    del norm_in
    if "o" in groups:
        report.groups["o"] = refit_group(student, teacher, "o", o_in, run, index, head_dim, delta, storage)
    mid = [c.hidden + attn.o_proj(z) for c, z in zip(student_calls, o_in)]
    del o_in
    mlp_in = [student.post_attention_layernorm(h) for h in mid]
    if MOE_INPUT in run.inputs:
        moe_out, moe_reports = refit_moe(student.mlp, teacher.mlp, mlp_in, run.inputs.pop(MOE_INPUT), experts or [],
                                         groups, delta, storage)
        report.groups.update(moe_reports)
        return [h + z for h, z in zip(mid, moe_out)], report
    if "gate_up" in groups:
        report.groups["gate_up"] = refit_group(student, teacher, "gate_up", mlp_in, run, index, head_dim, delta,
                                               storage)
    mlp = student.mlp
    down_in = [mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) for x in mlp_in]
    del mlp_in
    if residual is not None:
        targets = [want - h for want, h in zip(residual, mid, strict=True)]
        report.groups["down"] = refit_to_residual(mlp.down_proj, down_in, targets, delta, (storage or {}).get("down"))
    elif "down" in groups:
        report.groups["down"] = refit_group(student, teacher, "down", down_in, run, index, head_dim, delta, storage)
    return [h + mlp.down_proj(z) for h, z in zip(mid, down_in)], report
