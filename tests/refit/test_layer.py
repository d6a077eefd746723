"""The refit of one decoder layer: exact where the dropped units are linear combinations of kept ones, never worse
than slicing, the minimiser of its objective, and the pruned layer's outputs what its stock forward gives."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron.prune.core.slicing import AxisIndex, slice_role
from megatron.prune.refit.layer import GROUPS, Call, refit_group, refit_layer, run_teacher
from megatron.prune.refit.sequential import pruned_layer, student_config
from megatron.prune.refit.solve import Moment, reconstruction_error
from tiny import make_tiny_model

HN = 8  # head_dim of the tiny models


def layer_and_calls(seed: int = 0) -> tuple[torch.nn.Module, list[Call], object]:
    """Layer 0 of the tiny GQA model (8 heads / 4 groups, hidden 48, FFN 64) and its calls on 3 random batches."""
    model = make_tiny_model("llama-gqa", seed=seed)
    body = model.model
    calls = []
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        ids = torch.randint(0, 96, (2, 16), generator=g)
        h = body.embed_tokens(ids)
        pos = torch.arange(16)[None].expand(2, 16)
        calls.append(Call(h.detach(), {"position_embeddings": body.rotary_emb(h, pos), "attention_mask": None,
                                       "position_ids": pos}))
    return body.layers[0], calls, model.config


def full_index(config, **kept) -> AxisIndex:
    axes = dict(hidden=tuple(range(config.hidden_size)), heads=tuple(range(8)), groups=tuple(range(4)),
                ffn=tuple(range(config.intermediate_size)))
    axes.update(kept)
    return AxisIndex(**axes)


def target_config(config, index: AxisIndex):
    from megatron.prune.core.plan import LayerPlan, PrunePlan
    from megatron.prune.core.shape import shape_from_hf_config

    cfg = config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    s = shape_from_hf_config(cfg)
    t = s.replace(hidden_size=len(index.hidden), num_attention_heads=len(index.heads),
                  num_query_groups=len(index.groups), ffn_hidden_size=len(index.ffn), num_layers=1)
    plan = PrunePlan(s, t, index.hidden, (LayerPlan(0, index.groups, index.heads, index.ffn),))
    return student_config(config, plan)


def outputs(layer: torch.nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [layer(c.hidden, **c.kwargs) for c in calls]


def student_calls(calls: list[Call], index: AxisIndex) -> list[Call]:
    """The pruned layer's inputs: the same hidden states without the dropped channels."""
    keep = torch.as_tensor(index.hidden)
    return [Call(c.hidden.index_select(-1, keep), c.kwargs) for c in calls]


def prune_and_refit(teacher, calls, config, index, groups=tuple(GROUPS)):
    student = pruned_layer(teacher, target_config(config, index), 0, index, HN, 1.0)
    sliced = copy.deepcopy(student)
    run = run_teacher(teacher, calls, index, HN)
    out, report = refit_layer(student, teacher, student_calls(calls, index), run, index, HN, groups, delta=1e-9)
    return student, sliced, out, report


@pytest.mark.parametrize("unit", ["ffn", "head", "group"])
def test_a_unit_that_is_a_combination_of_kept_ones_is_removed_exactly(unit):
    """FFN channel 5 = 2 x channel 3 (same gate row, twice the up row); query head 1 = head 0 (same q rows); KV group
    3 = group 2 (same k, v and q rows). Dropping it changes the layer's output when sliced, not once refit."""
    teacher, calls, config = layer_and_calls()
    sa, mlp = teacher.self_attn, teacher.mlp
    with torch.no_grad():
        if unit == "ffn":
            mlp.gate_proj.weight[5] = mlp.gate_proj.weight[3]
            mlp.up_proj.weight[5] = 2 * mlp.up_proj.weight[3]
            index = full_index(config, ffn=tuple(i for i in range(64) if i != 5))
        elif unit == "head":  # heads 0 and 1 are both in group 0: keep one head of every group
            sa.q_proj.weight[HN:2 * HN] = sa.q_proj.weight[:HN]
            for h in (3, 5, 7):
                sa.q_proj.weight[h * HN:(h + 1) * HN] = sa.q_proj.weight[(h - 1) * HN:h * HN]
            index = full_index(config, heads=(0, 2, 4, 6))
        else:
            for w in (sa.k_proj.weight, sa.v_proj.weight):
                w[3 * HN:4 * HN] = w[2 * HN:3 * HN]
            sa.q_proj.weight[6 * HN:8 * HN] = sa.q_proj.weight[4 * HN:6 * HN]
            index = full_index(config, groups=(0, 1, 2), heads=tuple(range(6)))
    want = outputs(teacher, calls)
    student, sliced, got, report = prune_and_refit(teacher, calls, config, index)
    for w, s, r in zip(want, outputs(sliced, calls), got):
        assert not torch.allclose(w, s, atol=1e-3)
        torch.testing.assert_close(r, w, atol=2e-4, rtol=2e-4)
    for w, r in zip(got, outputs(student, calls)):  # what the refit computed is the refitted layer's stock forward
        torch.testing.assert_close(r, w, atol=1e-6, rtol=1e-6)


def test_refit_is_never_worse_than_slicing_and_minimises_its_objective():
    """Random FFN, head and hidden pruning: each group's refit error is at most the sliced one, and any small random
    perturbation of the refitted weights makes the calibration error larger."""
    teacher, calls, config = layer_and_calls(seed=3)
    index = full_index(config, hidden=tuple(range(0, 48, 2)) + (1, 3), ffn=tuple(range(0, 64, 3)), heads=(0, 2, 4, 6),
                       groups=(0, 1, 2, 3))
    index = AxisIndex(hidden=tuple(sorted(index.hidden)), heads=index.heads, groups=index.groups, ffn=index.ffn)
    student, _, _, report = prune_and_refit(teacher, calls, config, index)
    for name, g in report.groups.items():
        assert g.refit <= g.sliced + 1e-9, name
    # the down_proj refit: perturb it and measure the calibration error from the same moments
    student2 = pruned_layer(teacher, target_config(config, index), 0, index, HN, 1.0)
    run = run_teacher(teacher, calls, index, HN)
    s_calls = student_calls(calls, index)
    refit_layer(student2, teacher, s_calls, run, index, HN, ("qkv", "o", "gate_up"), delta=1e-9)
    mlp = student2.mlp
    with torch.no_grad():
        zs = [mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
              for x in (student2.post_attention_layernorm(c.hidden + _attn(student2, c)) for c in s_calls)]
    assert "down" in run.targets and "down" not in run.inputs  # h' outputs are narrower than the f inputs
    H, C = Moment(torch.float64), Moment(torch.float64)
    for z, x_t in zip(zs, run_inputs(teacher, calls, "mlp.down_proj")):
        H.add(z)
        C.add(x_t, z)
    W = slice_role("down", teacher.mlp.down_proj.weight, AxisIndex(hidden=index.hidden), HN).double()
    C_ys = W @ C.mean()
    refit_group(student2, teacher, "down", zs, run, index, HN, delta=1e-9)
    best = student2.mlp.down_proj.weight.double()
    base = reconstruction_error(best, H.mean(), C_ys, 0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        bump = torch.randn(best.shape, generator=g, dtype=torch.float64) * 1e-3
        assert reconstruction_error(best + bump, H.mean(), C_ys, 0.0) > base


def run_inputs(layer, calls: list[Call], path: str) -> list[torch.Tensor]:
    """The input of ``layer``'s submodule ``path`` on every call, recorded by hand."""
    seen: list[torch.Tensor] = []
    handle = dict(layer.named_modules())[path].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            for c in calls:
                layer(c.hidden, **c.kwargs)
    finally:
        handle.remove()
    return seen


def _attn(layer, call: Call) -> torch.Tensor:
    from megatron.prune.refit.layer import attention_kwargs

    return layer.self_attn(hidden_states=layer.input_layernorm(call.hidden), **attention_kwargs(call.kwargs))[0]


def test_nothing_pruned_leaves_the_sliced_weights_within_rounding():
    """A layer that keeps every unit and sees the original's own inputs refits to its own weights."""
    teacher, calls, config = layer_and_calls(seed=5)
    index = full_index(config)
    student, sliced, out, _ = prune_and_refit(teacher, calls, config, index)
    for (name, a), (_, b) in zip(student.named_parameters(), sliced.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
