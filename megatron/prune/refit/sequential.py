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

from megatron.prune.core.plan import LayerPlan, PrunePlan
from megatron.prune.core.slicing import AxisIndex, layer_index, slice_role
from megatron.prune.formats.hf import parse_hf_name
from megatron.prune.formats.safetensors import DTYPE_CODES
from megatron.prune.formats.source import TensorSource
from megatron.prune.refit.layer import GROUPS, Call, LayerReport, refit_layer, run_teacher
from megatron.prune.refit.solve import DEFAULT_DAMPING, Moment
from megatron.prune.refit.store import RefitStore

# auto: refit an untied lm_head on the final norm's output; with a tied head (the embedding, which the residual stream
# reads too) refit the final norm's gain instead, per kept channel; none: both keep the plan's slices
HEADS = ("auto", "none")
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


@dataclass(frozen=True)
class FusedSelection:
    """Choose each layer's query groups, heads and FFN channels inside the refit, from activation statistics gathered
    on its own run of the original layer (the hooks of :mod:`megatron.prune.scoring.stats`), instead of a separate
    scoring pass over the same tokens: for plans whose only pruned axes are per layer (hidden size and depth kept).
    The choice is :func:`~megatron.prune.core.select.dense_layer_plan` on the same statistics, so the plan is the one a
    scoring pass then ``make_plan`` would give."""

    aggregation: str
    slices: int = 1  # TP slices that keep equal counts


def fusable(plan: PrunePlan) -> bool:
    """Whether ``plan``'s choices can be made layer by layer inside the refit (:class:`FusedSelection`): a dense
    model whose hidden size and layers are all kept."""
    s, t = plan.source, plan.target
    return (not s.is_moe and t.hidden_size == s.hidden_size and len(plan.layers) == s.num_layers
            and plan.vocab is None)


@dataclass
class RefitSummary:
    """Per kept layer, how each refit group's calibration error went from the sliced weights to the refitted ones."""

    layers: list[LayerReport] = field(default_factory=list)
    head: tuple[float, float] | None = None  # lm_head (or the tied head's final-norm gain): (sliced, refit) error
    head_role: str = "lm_head"
    tokens: int = 0
    seconds: float = 0.0
    loss: tuple[float, float, int] | None = None  # calibration LM loss: (original, pruned and refit, tokens)
    layer_plans: list[LayerPlan] = field(default_factory=list)  # with a FusedSelection: each layer's choice

    def mean_error(self) -> tuple[float, float]:
        """Mean relative error over every refit group of every layer: (sliced, refit)."""
        reports = [g for layer in self.layers for g in layer.groups.values()]
        if not reports:
            return 0.0, 0.0
        return (sum(g.sliced for g in reports) / len(reports), sum(g.refit for g in reports) / len(reports))


def select_hidden(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``h [b, s, n]`` restricted to the channels ``keep``, gathered in 2-D (10x faster than on a 3-D tensor's last
    dim on CPU)."""
    return h.reshape(-1, h.shape[-1]).index_select(1, keep).reshape(*h.shape[:-1], len(keep))


def student_config(config: Any, plan: PrunePlan) -> Any:
    """The transformers config of the pruned layers. Set on a copy, field by field: transformers refuses a hidden
    size that is not a multiple of the head count at construction, which a Megatron target may have."""
    t = plan.target
    out = copy.deepcopy(config)
    out.hidden_size, out.intermediate_size = t.hidden_size, t.ffn_hidden_size
    out.num_attention_heads, out.num_key_value_heads = t.num_attention_heads, t.num_query_groups
    out.head_dim = t.head_dim
    if t.is_moe:  # the family's own keys (Mixtral's expert width is its intermediate_size)
        from megatron.prune.core.shape import family_of, grouped_mm_aligned

        keys = family_of({"architectures": config.architectures}).moe
        for key in keys.experts:
            if hasattr(out, key):
                setattr(out, key, t.num_experts)
        setattr(out, keys.expert_ffn, t.moe_ffn_hidden_size)
        setattr(out, keys.top_k, t.num_experts_per_tok)
        if not grouped_mm_aligned(t):
            out._experts_implementation = "eager"
    return out


def pruned_layer(teacher: torch.nn.Module, config: Any, number: int, index: AxisIndex, head_dim: int,
                 norm_scale: float, experts: list[AxisIndex] | None = None) -> torch.nn.Module:
    """The pruned counterpart of the (materialised) original decoder layer ``teacher``: the plan's slices of its
    parameters, in a module of the same class built for the pruned shape (``experts``: each kept expert's indices,
    in a mixture-of-experts layer)."""
    from megatron.prune.refit.moe import is_moe_param, pruned_moe_param

    device = next(teacher.parameters()).device
    with torch.device("meta"):  # no random init: every parameter is copied in below
        layer = type(teacher)(config, number).to(next(teacher.parameters()).dtype)
    layer = layer.to_empty(device=device)
    originals = dict(teacher.named_parameters())
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if is_moe_param(name):
                param.copy_(pruned_moe_param(name, originals[name], experts or []))
                continue
            role, _ = parse_hf_name(f"model.layers.0.{name}")
            param.copy_(slice_role(role, originals[name], index, head_dim, norm_scale))
    return layer.eval()


def refit_roles(groups: tuple[str, ...], moe: bool) -> tuple[str, ...]:
    """The roles the refit ``groups`` rewrite in a dense or a mixture-of-experts layer."""
    from megatron.prune.refit.moe import MOE_GROUP_ROLES

    roles = [role for g in groups if not (moe and g in MOE_GROUP_ROLES) for role, _ in GROUPS[g]]
    return tuple(roles + [role for g in groups if moe for role in MOE_GROUP_ROLES.get(g, ())])


def layer_tensors(student: torch.nn.Module, roles: tuple[str, ...], storage: dict[str, torch.dtype]
                  ) -> dict[str, torch.Tensor]:
    """The refitted tensors of the pruned layer ``student`` by store key (role, or ``role.k`` for kept expert k),
    on the CPU in their storage dtype."""
    from megatron.prune.refit.moe import is_moe_layer, is_moe_param, moe_tensors

    params = {parse_hf_name(f"model.layers.0.{n}")[0]: p for n, p in student.named_parameters()
              if not is_moe_param(n)}
    if is_moe_layer(student):
        params.update(moe_tensors(student.mlp, set(roles)))
    return {key: t.detach().to(storage[key.split(".")[0]]).cpu() for key, t in params.items()
            if key.split(".")[0] in roles}


def storage_dtype(src: TensorSource, role: str, layer: int | None, expert: int | None = None) -> torch.dtype:
    """The dtype a refitted tensor is written in: the source tensor's own."""
    where = () if expert is None else (expert,)
    return {code: dtype for dtype, code in DTYPE_CODES.items()}[src.dtype_code(role, layer, *where)]


def sliced_final_norm(norm: torch.nn.Module, plan: PrunePlan) -> torch.Tensor:
    """The plan's slice of the final norm's weight (rescaled as the plan says)."""
    return slice_role("final_norm", norm.weight, AxisIndex(hidden=plan.hidden), plan.source.head_dim, plan.norm_scale)


def head_blocks(src: TensorSource, role: str, plan: PrunePlan):
    """The output head (``lm_head``, or ``embed`` when tied) restricted to the kept vocabulary, as float32 blocks of
    :data:`.solve.ROW_BLOCK` rows, ``(start, block)``: a 128k x 8k head is 8 GB in float64, and its right-hand side,
    prior and solution would be as much again each. Their products with the moments run in float32 (summed or solved
    in float64), as the layers' do: half the time of float64 products on a CPU."""
    from megatron.prune.refit import solve

    W = src.get(role)
    if plan.vocab is not None:
        W = W.index_select(0, torch.as_tensor(plan.vocab))
    for start in range(0, W.shape[0], solve.ROW_BLOCK):
        yield start, W[start:start + solve.ROW_BLOCK].float()


def final_moments(student_input: Any, norm: torch.nn.Module, teacher_hidden: list[torch.Tensor],
                  student_hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``E[x_s x_sᵀ]``, ``E[x_t x_sᵀ]`` and ``E[x_t x_tᵀ]`` of the head's inputs: ``x_t`` the original's final-norm
    output, ``x_s = student_input(h_s)`` what the pruned model's head (or gain) reads. On the CPU, beside the head
    read from the checkpoint, wherever the hidden states ran (``[h, h]`` each: small)."""
    H, C, T = Moment(torch.float32), Moment(torch.float32), Moment(torch.float32)
    for h_t, h_s in zip(teacher_hidden, student_hidden, strict=True):
        x_s, x_t = student_input(h_s), norm(h_t)
        H.add(x_s)
        C.add(x_t, x_s)
        T.add(x_t)
    return H.mean().cpu(), C.mean().cpu(), T.mean().cpu()


@torch.no_grad()
def refit_head(src: TensorSource, norm: torch.nn.Module, plan: PrunePlan, teacher_hidden: list[torch.Tensor],
               student_hidden: list[torch.Tensor], damping: float) -> tuple[torch.Tensor, tuple[float, float]]:
    """An untied ``lm_head`` refit on the final norm's output (the same two-stream least squares), with its
    (sliced, refit) relative error. ``norm`` is the original final norm, materialised. The moments are factored once
    and the head solved in blocks of vocabulary rows, written in its storage dtype."""
    from megatron.prune.refit.solve import Ridge

    norm_s = copy.deepcopy(norm)
    norm_s.weight = torch.nn.Parameter(sliced_final_norm(norm, plan))
    H_ss, C_ts, T_tt = final_moments(norm_s, norm, teacher_hidden, student_hidden)
    ridge = Ridge.factor(H_ss, damping)
    C_ts, T_tt = C_ts.float(), T_tt.float()
    kept = torch.as_tensor(plan.hidden)
    vocab = len(plan.vocab) if plan.vocab is not None else plan.source.vocab_size
    new = torch.empty(vocab, len(plan.hidden), dtype=storage_dtype(src, "lm_head", None))
    errors, energy = [0.0, 0.0], 0.0
    for start, W in head_blocks(src, "lm_head", plan):
        prior, C_ys = W.index_select(1, kept), (W @ C_ts).double()
        block, terms = ridge.solve_scored(C_ys, prior)
        new[start:start + W.shape[0]] = block
        errors = [e + d for e, d in zip(errors, terms)]
        energy += float(((W @ T_tt) * W).sum(dtype=torch.float64))
    if start + W.shape[0] != vocab:
        raise ValueError(f"lm_head has {start + W.shape[0]} rows where the plan's vocabulary has {vocab}")
    scale = max(energy, 1e-30)
    return new, tuple((e + energy) / scale for e in errors)


@torch.no_grad()
def refit_final_gain(src: TensorSource, norm: torch.nn.Module, plan: PrunePlan, teacher_hidden: list[torch.Tensor],
                     student_hidden: list[torch.Tensor], damping: float) -> tuple[torch.Tensor, tuple[float, float]]:
    """With tied embeddings the head cannot change without changing the input embedding, so fit the final norm's
    gain g instead: ``min E‖E_K (g ∘ r_s) − E x_t‖²`` over the logits (kept vocabulary), ``r_s`` the pruned model's
    normalised final hidden state, ``x_t`` the original's final-norm output (:func:`.solve.logit_gain_moments`, from
    the head's Gram matrix taken a block of rows at a time); the ridge pulls toward the plan's sliced (and rescaled)
    gain. Returns g and the (sliced, refit) relative error."""
    from megatron.prune.refit.solve import fit_diagonal, gram_lower_, logit_gain_moments, mirror_lower_

    prior = sliced_final_norm(norm, plan).double().cpu()  # solved on the CPU, with the head's moments
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def normalised(h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)

    R, C, T = final_moments(normalised, norm, teacher_hidden, student_hidden)
    G = torch.zeros(plan.source.hidden_size, plan.source.hidden_size, dtype=torch.float64)
    for _, E in head_blocks(src, "embed", plan):
        gram_lower_(G, E)
    G = mirror_lower_(G)
    Q, b = logit_gain_moments(G, torch.as_tensor(plan.hidden), R, C)
    gain = fit_diagonal(Q, b, prior, damping)
    energy = float((G * T).sum())  # E‖E x_t‖²
    scale = max(energy, 1e-30)

    def error(g: torch.Tensor) -> float:
        return float(g @ Q @ g - 2 * b @ g + energy) / scale
    return gain, (error(prior), error(gain))


def choose_layer(i: int, stats: Any, plan: PrunePlan, select: FusedSelection) -> LayerPlan:
    """Layer ``i``'s groups, heads and FFN channels from its activation statistics (``LayerStats``), as ``make_plan``
    chooses them from scores; non-finite statistics (overflowing activations) are refused as scoring refuses them."""
    from megatron.prune.core.select import dense_layer_plan
    from megatron.prune.errors import PruneError

    heads, groups, ffn = stats.heads.result().cpu(), stats.groups.result().cpu(), stats.ffn.result().cpu()
    for name, score in (("head", heads), ("query group", groups), ("FFN channel", ffn)):
        if not torch.isfinite(score).all():
            raise PruneError(f"layer {i}: non-finite {name} scores (activations overflowed? try --dtype float32)")
    return dense_layer_plan(i, heads, groups, ffn, plan.source, plan.target, select.slices)


# the calibration loss is a report; over the whole calibration it would cost two full vocabulary projections
# (a third of a forward of the 135M demo model at 8k tokens), so it reads the first windows up to this many tokens
LOSS_TOKENS = 2048


@torch.no_grad()
def calibration_loss(norm: torch.nn.Module, head: torch.Tensor, hidden: list[torch.Tensor], windows: torch.Tensor,
                     batch_size: int, max_tokens: int = LOSS_TOKENS) -> tuple[float, int]:
    """Mean next-token cross entropy of the final hidden states ``hidden`` (per batch of ``windows``) through the
    final ``norm`` and the ``head`` weight ``[v, h]``, over the first windows until ``max_tokens`` are predicted;
    returns (loss, tokens)."""
    total, count = 0.0, 0
    head = head.to(hidden[0].dtype) if hidden else head  # once, not per batch: a 70B head is GBs
    for k, h in enumerate(hidden):
        if count >= max_tokens:
            break
        rows = min(h.shape[0], -(-(max_tokens - count) // max(h.shape[1] - 1, 1)))  # whole windows, just enough
        h = h[:rows]
        ids = windows[k * batch_size : k * batch_size + rows].to(h.device)
        logits = norm(h)[:, :-1] @ head.T
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                         reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count, count


def model_losses(src: TensorSource, norm: torch.nn.Module, plan: PrunePlan, store: RefitStore,
                 teacher_hidden: list[torch.Tensor], student_hidden: list[torch.Tensor], windows: torch.Tensor,
                 batch_size: int) -> tuple[float, float, int] | None:
    """Calibration loss of the original and of the pruned, refit model, and the tokens it was taken on (None when the
    vocabulary is pruned: the token ids differ)."""
    if plan.vocab is not None:
        return None
    head = src.get("lm_head" if src.has("lm_head") and not plan.source.tied_embeddings else "embed")
    norm_s = copy.deepcopy(norm)
    norm_s.weight = torch.nn.Parameter(store.get("final_norm") if store.has("final_norm")
                                       else sliced_final_norm(norm, plan))
    head_s = store.get("lm_head") if store.has("lm_head") else head.index_select(1, torch.as_tensor(plan.hidden))
    device = norm.weight.device
    original, tokens = calibration_loss(norm, head.to(device), teacher_hidden, windows, batch_size)
    pruned, _ = calibration_loss(norm_s.to(device), head_s.to(device), student_hidden, windows, batch_size)
    return original, pruned, tokens


@torch.no_grad()
def refit_model(src: TensorSource, config: Any, plan: PrunePlan, windows: torch.Tensor, batch_size: int,
                dtype: torch.dtype, device: str, store: RefitStore, options: RefitOptions = RefitOptions(),
                progress: bool = True, select: FusedSelection | None = None) -> RefitSummary:
    """Refit every kept layer of ``plan`` applied to ``src`` on the calibration ``windows`` ``[n, s]``, writing the
    refitted tensors into ``store`` (by output layer); the HF ``config`` is the source's. With ``select``, ``plan``
    gives only the counts (:func:`fusable`) and each layer's units are chosen on the way (``summary.layer_plans``)."""
    from contextlib import nullcontext

    from megatron.prune.scoring.layerwise import first_layer_inputs, hidden_of, materialise, release, skeleton
    from megatron.prune.scoring.stats import importance_hooks

    if select is not None and not fusable(plan):
        raise ValueError("a fused selection needs a dense plan that keeps the hidden size, every layer, the vocabulary")

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
    student_calls = [Call(select_hidden(c.hidden, hidden), c.kwargs) for c in calls]
    s_config, hn = student_config(model.config, plan), plan.source.head_dim
    kept = {lp.source_layer: j for j, lp in enumerate(plan.layers)}
    summary = RefitSummary(tokens=int(windows.numel()))
    layers, L = body.layers, len(body.layers)
    desc = "scoring and refitting layer by layer" if select else "refitting layer by layer"
    bar = tqdm(total=L, desc=desc, unit="layer", disable=not progress)
    hooks = importance_hooks(model, plan.source, select.aggregation) if select else nullcontext([])
    with hooks as stats:
        i = 0
        while i < L:
            j = kept.get(i)
            index = None if j is None else layer_index(plan, plan.layers[j])  # with select: the counts only
            materialise(layers[i], f"model.layers.{i}", src, device)
            run = run_teacher(layers[i], teacher_calls, index, hn)
            if select is not None:  # the statistics hooks have seen layer i: choose its units
                summary.layer_plans.append(choose_layer(i, stats[i], plan, select))
                index = layer_index(plan, summary.layer_plans[-1])
            end, residual = i + 1, None
            if index is None:
                release(layers[i])
            elif (options.depth == "residual" and "down" in options.groups and not plan.source.is_moe and i + 1 < L
                  and i + 1 not in kept):  # a MoE layer has no one down_proj to take the run's place
                release(layers[i])  # one layer at a time: read it again after the run of dropped layers that follows
                after = run.outputs  # the original through that run
                while end < L and end not in kept:
                    materialise(layers[end], f"model.layers.{end}", src, device)
                    after = run_teacher(layers[end], [Call(h, c.kwargs) for h, c in zip(after, teacher_calls)], None,
                                        hn).outputs
                    release(layers[end])
                    end += 1
                residual, run.outputs = [select_hidden(h, hidden) for h in after], after
                materialise(layers[i], f"model.layers.{i}", src, device)
            if index is not None:
                lp = plan.layers[j] if select is None else summary.layer_plans[-1]
                experts = [layer_index(plan, lp, k) for k in range(len(lp.experts))] if plan.source.is_moe else None
                student = pruned_layer(layers[i], s_config, j, index, hn, plan.norm_scale, experts)
                first = (lp.experts[0],) if plan.source.is_moe else ()  # expert tensors: one dtype
                roles = refit_roles(options.groups, plan.source.is_moe)
                storage = {role: storage_dtype(src, role, i, *(first if role.startswith("expert") else ()))
                           for role in roles}
                outputs, report = refit_layer(student, layers[i], student_calls, run, index, hn, options.groups,
                                              options.damping, storage, residual, experts)
                release(layers[i])
                summary.layers.append(report)
                store.put(j, layer_tensors(student, roles, storage))
                student_calls = [Call(o, c.kwargs) for o, c in zip(outputs, student_calls)]
                del student, outputs
            teacher_calls = [Call(o, c.kwargs) for o, c in zip(run.outputs, teacher_calls)]
            run = residual = None  # freed now, not once the next layer's run has been built beside them
            bar.update(end - i)
            i = end
    bar.close()
    materialise(body.norm, "model.norm", src, device)
    if options.head == "auto":
        untied = not plan.source.tied_embeddings and src.has("lm_head")
        fit = refit_head if untied else refit_final_gain
        summary.head_role = "lm_head" if untied else "final_norm"
        tensor, summary.head = fit(src, body.norm, plan, [c.hidden for c in teacher_calls],
                                   [c.hidden for c in student_calls], options.damping)
        store.put(None, {summary.head_role: tensor.to(storage_dtype(src, summary.head_role, None))})
    summary.loss = model_losses(src, body.norm, plan, store, [c.hidden for c in teacher_calls],
                                [c.hidden for c in student_calls], windows, batch_size)
    release(body.norm)
    src.release()
    summary.seconds = time.perf_counter() - t0
    return summary
