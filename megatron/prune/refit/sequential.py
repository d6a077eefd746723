"""Least-squares reconstruction of a pruned model, one decoder layer in memory at a time.

The original model (the teacher) and the pruned one (the student) run side by side over the calibration batches,
layer by layer, each from its own hidden states: layer l of the student is refit on the inputs that the already
refitted layers 0..l-1 produce (sequential calibration, as SparseGPT/SlimGPT), against what the original layer
gives on the original model's inputs (:mod:`.layer`). The layers are read from the checkpoint (HF or Megatron, any
TP/PP, through :func:`megatron.prune.scoring.layerwise.open_source`) one at a time and freed; the refitted tensors
go to a :class:`.store.RefitStore`, in the source's dtype, for the format adapter to write in place of the plan's
slices. Peak memory: one original and one pruned layer, the calibration activations of both streams, and one
layer's moments (``[f, f']`` for the FFN).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.slicing import AxisIndex, layer_index, slice_role
from megatron.prune.formats.hf import parse_hf_name
from megatron.prune.formats.safetensors import DTYPE_CODES
from megatron.prune.formats.source import TensorSource
from megatron.prune.refit.layer import GROUPS, Call, LayerReport, refit_layer, run_teacher
from megatron.prune.refit.solve import DEFAULT_DAMPING, Moment, solve_from_moments
from megatron.prune.refit.store import RefitStore

HEADS = ("auto", "none")  # auto: refit an untied lm_head on the final norm's output; a tied head is the embedding
# residual: the down_proj of the last kept layer before a run of dropped layers is refit so that layer's output is the
# original's residual stream after the run (ReplaceMe's idea as one least squares; no new parameters); none: the
# layers are dropped as they are
DEPTH = ("residual", "none")


@dataclass(frozen=True)
class RefitOptions:
    """What is refit and how: the reader groups (:data:`.layer.GROUPS`), the damping δ, the output head."""

    groups: tuple[str, ...] = tuple(GROUPS)
    damping: float = DEFAULT_DAMPING
    head: str = "auto"
    depth: str = "residual"


@dataclass
class RefitSummary:
    """Per kept layer, how each refit group's calibration error went from the sliced weights to the refitted ones."""

    layers: list[LayerReport] = field(default_factory=list)
    head: tuple[float, float] | None = None  # lm_head: (sliced, refit) relative error
    tokens: int = 0
    seconds: float = 0.0

    def mean_error(self) -> tuple[float, float]:
        """Mean relative error over every refit group of every layer: (sliced, refit)."""
        reports = [g for layer in self.layers for g in layer.groups.values()]
        if not reports:
            return 0.0, 0.0
        return (sum(g.sliced for g in reports) / len(reports), sum(g.refit for g in reports) / len(reports))


def student_config(config: Any, plan: PrunePlan) -> Any:
    """The transformers config of the pruned layers. Set on a copy, field by field: transformers refuses a hidden
    size that is not a multiple of the head count at construction, which a Megatron target may have."""
    t = plan.target
    out = copy.deepcopy(config)
    out.hidden_size, out.intermediate_size = t.hidden_size, t.ffn_hidden_size
    out.num_attention_heads, out.num_key_value_heads = t.num_attention_heads, t.num_query_groups
    out.head_dim = t.head_dim
    return out


def pruned_layer(teacher: torch.nn.Module, config: Any, number: int, index: AxisIndex, head_dim: int,
                 norm_scale: float) -> torch.nn.Module:
    """The pruned counterpart of the (materialised) original decoder layer ``teacher``: the plan's slices of its
    parameters, in a module of the same class built for the pruned shape."""
    layer = type(teacher)(config, number).to(next(teacher.parameters()).dtype)
    originals = dict(teacher.named_parameters())
    with torch.no_grad():
        for name, param in layer.named_parameters():
            role, _ = parse_hf_name(f"model.layers.0.{name}")
            param.copy_(slice_role(role, originals[name], index, head_dim, norm_scale))
    return layer.to(next(teacher.parameters()).device).eval()


def storage_dtype(src: TensorSource, role: str, layer: int | None) -> torch.dtype:
    """The dtype a refitted tensor is written in: the source tensor's own."""
    return {code: dtype for dtype, code in DTYPE_CODES.items()}[src.dtype_code(role, layer)]


@torch.no_grad()
def refit_head(src: TensorSource, norm: torch.nn.Module, plan: PrunePlan, teacher_hidden: list[torch.Tensor],
               student_hidden: list[torch.Tensor], damping: float) -> tuple[torch.Tensor, tuple[float, float]]:
    """An untied ``lm_head`` refit on the final norm's output (the same two-stream least squares), with its
    (sliced, refit) relative error. ``norm`` is the original final norm, materialised."""
    from megatron.prune.refit.solve import reconstruction_error

    weight = slice_role("final_norm", norm.weight, AxisIndex(hidden=plan.hidden), plan.source.head_dim,
                        plan.norm_scale)
    norm_s = copy.deepcopy(norm)
    norm_s.weight = torch.nn.Parameter(weight)
    H, C, T = Moment(torch.float32), Moment(torch.float32), Moment(torch.float32)
    for h_t, h_s in zip(teacher_hidden, student_hidden, strict=True):
        x_s, x_t = norm_s(h_s), norm(h_t)
        H.add(x_s)
        C.add(x_t, x_s)
        T.add(x_t)
    W = src.get("lm_head").double()
    if plan.vocab is not None:
        W = W.index_select(0, torch.as_tensor(plan.vocab))
    prior = W.index_select(1, torch.as_tensor(plan.hidden))
    H_ss, C_ys = H.mean(), W @ C.mean()
    new = solve_from_moments(C_ys, H_ss, prior, damping)
    energy = float(((W @ T.mean()) * W).sum())
    scale = max(energy, 1e-30)
    return new, (reconstruction_error(prior, H_ss, C_ys, energy) / scale,
                 reconstruction_error(new, H_ss, C_ys, energy) / scale)


@torch.no_grad()
def refit_model(src: TensorSource, config: Any, plan: PrunePlan, windows: torch.Tensor, batch_size: int,
                dtype: torch.dtype, device: str, store: RefitStore, options: RefitOptions = RefitOptions(),
                progress: bool = True) -> RefitSummary:
    """Refit every kept layer of ``plan`` applied to ``src`` on the calibration ``windows`` ``[n, s]``, writing the
    refitted tensors into ``store`` (by output layer); the HF ``config`` is the source's."""
    from megatron.prune.scoring.layerwise import first_layer_inputs, hidden_of, materialise, release, skeleton

    t0 = time.perf_counter()
    model = skeleton(config, dtype)
    body = model.model
    materialise(body.embed_tokens, "model.embed_tokens", src, device)
    with torch.device("cpu"):  # computed buffers, as when the whole model is loaded
        body.rotary_emb = type(body.rotary_emb)(config=model.config).to(device)
    calls = []
    for args, kwargs in first_layer_inputs(model, windows, batch_size, device):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        calls.append(Call(hidden_of(args, kwargs), rest))
    release(body.embed_tokens)
    hidden = torch.as_tensor(plan.hidden, device=device)
    teacher_calls = calls
    student_calls = [Call(c.hidden.index_select(-1, hidden), c.kwargs) for c in calls]
    s_config, hn = student_config(model.config, plan), plan.source.head_dim
    kept = {lp.source_layer: j for j, lp in enumerate(plan.layers)}
    summary = RefitSummary(tokens=int(windows.numel()))
    layers, L = body.layers, len(body.layers)
    bar = tqdm(total=L, desc="refitting layer by layer", unit="layer", disable=not progress)
    i = 0
    while i < L:
        j = kept.get(i)
        index = None if j is None else layer_index(plan, plan.layers[j])
        materialise(layers[i], f"model.layers.{i}", src, device)
        run = run_teacher(layers[i], teacher_calls, index, hn)
        release(layers[i])
        end, residual = i + 1, None
        if index is not None and options.depth == "residual" and "down" in options.groups:
            after = run.outputs  # the original through the run of dropped layers that follows this kept one
            while end < L and end not in kept:
                materialise(layers[end], f"model.layers.{end}", src, device)
                after = run_teacher(layers[end], [Call(h, c.kwargs) for h, c in zip(after, teacher_calls)], None,
                                    hn).outputs
                release(layers[end])
                end += 1
            if end > i + 1:
                residual, run.outputs = [h.index_select(-1, hidden) for h in after], after
        if index is not None:
            materialise(layers[i], f"model.layers.{i}", src, device)  # again, after the run: one layer at a time
            student = pruned_layer(layers[i], s_config, j, index, hn, plan.norm_scale)
            storage = {role: storage_dtype(src, role, i) for g in options.groups for role, _ in GROUPS[g]}
            outputs, report = refit_layer(student, layers[i], student_calls, run, index, hn, options.groups,
                                          options.damping, storage, residual)
            release(layers[i])
            summary.layers.append(report)
            params = {parse_hf_name(f"model.layers.0.{n}")[0]: p for n, p in student.named_parameters()}
            store.put(j, {role: params[role].detach().to(dt).cpu() for role, dt in storage.items()})
            student_calls = [Call(o, c.kwargs) for o, c in zip(outputs, student_calls)]
            del student
        teacher_calls = [Call(o, c.kwargs) for o, c in zip(run.outputs, teacher_calls)]
        bar.update(end - i)
        i = end
    bar.close()
    if options.head == "auto" and src.has("lm_head"):  # a tied head is the embedding the residual stream reads too
        materialise(body.norm, "model.norm", src, device)
        head, summary.head = refit_head(src, body.norm, plan, [c.hidden for c in teacher_calls],
                                        [c.hidden for c in student_calls], options.damping)
        store.put(None, {"lm_head": head.to(storage_dtype(src, "lm_head", None)).cpu()})
        release(body.norm)
    src.release()
    summary.seconds = time.perf_counter() - t0
    return summary
