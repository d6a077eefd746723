"""Activation statistics: the hooks equal a hand-written forward, leave the model unchanged, rank unused units last."""

from __future__ import annotations

import math

import pytest
import torch

from compare import shape_of
from megatron.prune.core.select import make_plan
from megatron.prune.core.target import TargetRequest, resolve_target
from megatron.prune.scoring import stats
from tiny import make_tiny_model, sample_ids

MANUAL_AGG = {  # stat [b, s, n] -> [n], written out directly
    "mean-l2": lambda t: t.mean(1).pow(2).mean(0).sqrt(),
    "mean": lambda t: t.mean((0, 1)),
    "rms": lambda t: t.pow(2).mean((0, 1)).sqrt(),
}


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):  # x [b, s, n, hn]
    hn, s = x.shape[-1], x.shape[1]
    inv = 1.0 / theta ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn)
    ang = torch.arange(s, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[None, :, None], torch.cat([ang, ang], -1).sin()[None, :, None]
    x1, x2 = x[..., : hn // 2], x[..., hn // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def manual_activations(model, ids):
    """Per layer: the two norm outputs, the attention output before o_proj, the down_proj input, in and out."""
    c, sd = model.config, {k: v.float() for k, v in model.state_dict().items()}
    nh, ng, hn, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
    b, s = ids.shape
    x = sd["model.embed_tokens.weight"][ids]
    causal = torch.full((s, s), float("-inf")).triu(1)
    out = []
    for i in range(c.num_hidden_layers):
        w = lambda n: sd[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        n1 = rms_norm(x, w("input_layernorm"), eps)
        q = rope((n1 @ w("self_attn.q_proj").T).view(b, s, nh, hn), c.rope_parameters["rope_theta"])
        k = rope((n1 @ w("self_attn.k_proj").T).view(b, s, ng, hn), c.rope_parameters["rope_theta"])
        v = (n1 @ w("self_attn.v_proj").T).view(b, s, ng, hn)
        k, v = (t.repeat_interleave(nh // ng, dim=2) for t in (k, v))
        att = torch.softmax(torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(hn) + causal, -1)
        attn = torch.einsum("bnqk,bknd->bqnd", att, v).reshape(b, s, nh * hn)
        x2 = x + attn @ w("self_attn.o_proj").T
        n2 = rms_norm(x2, w("post_attention_layernorm"), eps)
        act = torch.nn.functional.silu(n2 @ w("mlp.gate_proj").T) * (n2 @ w("mlp.up_proj").T)
        x3 = x2 + act @ w("mlp.down_proj").T
        out.append(dict(n1=n1, n2=n2, attn=attn, act=act, x_in=x, x_out=x3))
        x = x3
    return out


@pytest.mark.parametrize("agg", list(stats.AGGREGATIONS))
def test_hooks_match_hand_written_forward(agg):
    model = make_tiny_model("llama-gqa")
    shape = shape_of(model)
    ids = sample_ids(batch=3, seq=10)
    acts = manual_activations(model, ids)
    # sanity: the hand-written forward is the model's forward
    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(model.model.norm(acts[-1]["x_out"]), ref, rtol=1e-4, atol=1e-4)

    scores = stats.collect_scores(model, shape, ids, batch_size=2, agg=agg, progress=False)  # 2 batches: 2 + 1
    a = MANUAL_AGG[agg]
    hn, hpg = shape.head_dim, shape.heads_per_group
    b, s = ids.shape
    hidden = sum(a(l["n1"].abs()) + a(l["n2"].abs()) for l in acts)
    heads = torch.stack([a(l["attn"].view(b, s, -1, hn).norm(dim=-1)) for l in acts])
    groups = torch.stack([a(l["attn"].view(b, s, -1, hpg * hn).norm(dim=-1)) for l in acts])
    ffn = torch.stack([a(l["act"].abs()) for l in acts])
    layers = torch.stack([(1 - torch.nn.functional.cosine_similarity(l["x_in"], l["x_out"], dim=-1)).mean()
                          for l in acts])
    for name, want in dict(hidden=hidden, heads=heads, groups=groups, ffn=ffn, layers=layers).items():
        torch.testing.assert_close(getattr(scores, name), want, rtol=1e-4, atol=1e-5, msg=name)
    assert scores.method == "activation"


def test_hooks_are_removed_and_model_output_unchanged():
    model = make_tiny_model("llama-gqa")
    ids = sample_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        stats.collect_scores(model, shape_of(model), ids, progress=False)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_scores_are_deterministic():
    model = make_tiny_model("llama-gqa")
    ids = sample_ids(batch=4, seq=16)
    s1 = stats.collect_scores(model, shape_of(model), ids, batch_size=2, progress=False)
    s2 = stats.collect_scores(model, shape_of(model), ids, batch_size=2, progress=False)
    for name in ("hidden", "heads", "groups", "ffn", "layers"):
        assert torch.equal(getattr(s1, name), getattr(s2, name)), name


def zero_units(model, channel=5, group=(1, 2), ffn=(2, 17), layer=3):
    """Zero one hidden channel everywhere, one KV group's V, one FFN channel's gate, one layer's outputs."""
    sd = model.state_dict()
    with torch.no_grad():
        for i in range(model.config.num_hidden_layers):
            for n in ("input_layernorm", "post_attention_layernorm"):
                sd[f"model.layers.{i}.{n}.weight"][channel] = 0
        hn = model.config.head_dim
        sd[f"model.layers.{group[0]}.self_attn.v_proj.weight"][group[1] * hn : (group[1] + 1) * hn] = 0
        sd[f"model.layers.{ffn[0]}.mlp.gate_proj.weight"][ffn[1]] = 0
        sd[f"model.layers.{layer}.self_attn.o_proj.weight"].zero_()
        sd[f"model.layers.{layer}.mlp.down_proj.weight"].zero_()
    return model


def test_unused_units_score_lowest_and_are_removed_first():
    model = zero_units(make_tiny_model("llama-gqa"))
    shape = shape_of(model)
    scores = stats.collect_scores(model, shape, sample_ids(batch=4, seq=16), progress=False)
    assert scores.hidden[5] == 0 and int(scores.hidden.argmin()) == 5
    assert scores.groups[1, 2] == 0 and int(scores.groups[1].argmin()) == 2
    assert scores.ffn[2, 17] == 0 and int(scores.ffn[2].argmin()) == 17
    assert scores.layers[3] < 1e-6 and int(scores.layers.argmin()) == 3
    target = shape.replace(hidden_size=shape.hidden_size - 1, num_query_groups=shape.num_query_groups - 1,
                           num_attention_heads=shape.num_attention_heads - shape.heads_per_group,
                           ffn_hidden_size=shape.ffn_hidden_size - 1, num_layers=shape.num_layers - 1)
    plan = make_plan(shape, target, scores)
    assert 5 not in plan.hidden
    assert [lp.source_layer for lp in plan.layers] == [0, 1, 2]
    assert plan.info["layer_rule"] == "block-influence"
    assert 2 not in plan.layers[1].query_groups and 17 not in plan.layers[2].ffn


def test_unused_head_is_removed_first_mha():
    model = make_tiny_model("llama-mha")
    hn = model.config.head_dim
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[2 * hn : 3 * hn] = 0
    shape = shape_of(model)
    scores = stats.collect_scores(model, shape, sample_ids(batch=4, seq=16), progress=False)
    assert scores.heads[0, 2] == 0 and int(scores.heads[0].argmin()) == 2
    target, drop = resolve_target(shape, TargetRequest(num_attention_heads=3))
    plan = make_plan(shape, target, scores, drop)
    assert plan.layers[0].heads == (0, 1, 3)
