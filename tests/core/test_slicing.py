"""The slicing rules are exact: units that contribute nothing are pruned with the logits unchanged."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compare import prune_cli
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.select import Scores, make_plan
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.hf import apply_plan as apply_hf_plan
from tiny import logits, sample_ids


def zeroed_copy(src: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint, editing its tensors (``edit(dict)``) before saving."""
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def plan_dropping(shape, target, *, ffn=None, heads=None, groups=None, hidden=None, norm_scale=1.0) -> PrunePlan:
    """A plan whose scores put exactly the given units last."""
    L = shape.num_layers
    s = Scores(hidden=torch.ones(shape.hidden_size), heads=torch.ones(L, shape.num_attention_heads),
               ffn=torch.ones(L, shape.ffn_hidden_size), groups=torch.ones(L, shape.num_query_groups))
    for t, idx in ((s.ffn, ffn), (s.heads, heads), (s.groups, groups)):
        for i in idx or ():
            t[:, i] = 0
    for i in hidden or ():
        s.hidden[i] = 0
    plan = make_plan(shape, target, s)
    return PrunePlan(plan.source, plan.target, plan.hidden, plan.layers, plan.vocab, norm_scale).validate()


def assert_same_logits(a: Path, b: Path, **tol) -> None:
    ids = sample_ids()
    torch.testing.assert_close(logits(a, ids), logits(b, ids), **tol)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias"])
def test_zero_ffn_channels_prune_exactly(tiny_hf, tmp_path, family):
    """FFN channels whose down_proj column is zero contribute nothing: pruning them leaves logits unchanged."""
    drop = [3, 17, 40]

    def edit(sd):
        for k in sd:
            if k.endswith("down_proj.weight"):
                sd[k][:, drop] = 0

    src = zeroed_copy(tiny_hf(family), tmp_path / "src", edit)
    shape = HFCheckpoint.open(src).shape
    plan = plan_dropping(shape, shape.replace(ffn_hidden_size=shape.ffn_hidden_size - 3), ffn=drop)
    assert all(set(lp.ffn).isdisjoint(drop) for lp in plan.layers)
    apply_hf_plan(src, tmp_path / "out", plan, progress=False)
    assert_same_logits(src, tmp_path / "out")


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3"])
def test_zero_query_heads_prune_exactly(tiny_hf, tmp_path, family):
    """A query head whose o_proj columns are zero is dead: drop one per group (GQA stays even). Qwen3's q_norm and
    k_norm, shared by the heads, stay whole."""
    src0 = tiny_hf(family)
    shape = HFCheckpoint.open(src0).shape
    hpg, hn = shape.heads_per_group, shape.head_dim
    dead = [g * hpg + 1 for g in range(shape.num_query_groups)]

    def edit(sd):
        for k in sd:
            if k.endswith("o_proj.weight"):
                for h in dead:
                    sd[k][:, h * hn:(h + 1) * hn] = 0

    src = zeroed_copy(src0, tmp_path / "src", edit)
    target = shape.replace(num_attention_heads=shape.num_attention_heads - len(dead))
    plan = plan_dropping(shape, target, heads=dead)
    assert all(set(lp.heads).isdisjoint(dead) for lp in plan.layers)
    apply_hf_plan(src, tmp_path / "out", plan, progress=False)
    assert_same_logits(src, tmp_path / "out")


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3"])
def test_zero_kv_group_prunes_exactly(tiny_hf, tmp_path, family):
    """A KV group whose query heads all have zero o_proj columns is dead: dropping the whole group is exact."""
    src0 = tiny_hf(family)
    shape = HFCheckpoint.open(src0).shape
    hpg, hn, g = shape.heads_per_group, shape.head_dim, 2

    def edit(sd):
        for k in sd:
            if k.endswith("o_proj.weight"):
                sd[k][:, g * hpg * hn:(g + 1) * hpg * hn] = 0

    src = zeroed_copy(src0, tmp_path / "src", edit)
    target = shape.replace(num_query_groups=shape.num_query_groups - 1,
                           num_attention_heads=shape.num_attention_heads - hpg)
    plan = plan_dropping(shape, target, groups=[g])
    assert all(g not in lp.query_groups for lp in plan.layers)
    apply_hf_plan(src, tmp_path / "out", plan, progress=False)
    assert_same_logits(src, tmp_path / "out")


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3"])
def test_zero_hidden_channels_prune_exactly_with_norm_rescale(tmp_path, family):
    """A residual channel nobody writes is always zero; dropping it changes every RMSNorm's mean by H'/H,
    which a norm_scale of sqrt(H/H') undoes exactly (up to epsilon). Qwen3's QK-norms normalise over a head, not
    the hidden size: they must be left as they are (rescaling them would change every attention score)."""
    from tiny import make_tiny_model

    drop = [1, 5, 9, 17, 22, 30, 33, 41]  # 48 -> 40, still a multiple of the 8 heads
    model = make_tiny_model(family, rms_norm_eps=1e-12)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, drop] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[drop, :] = 0
            layer.mlp.down_proj.weight[drop, :] = 0
    model.save_pretrained(tmp_path / "src")
    shape = HFCheckpoint.open(tmp_path / "src").shape
    H, H2 = shape.hidden_size, shape.hidden_size - len(drop)
    plan = plan_dropping(shape, shape.replace(hidden_size=H2), hidden=drop, norm_scale=math.sqrt(H / H2))
    assert set(plan.hidden).isdisjoint(drop)
    apply_hf_plan(tmp_path / "src", tmp_path / "out", plan, progress=False)
    assert_same_logits(tmp_path / "src", tmp_path / "out", atol=1e-4, rtol=1e-4)
    # Without the rescale the same pruning is measurably wrong: the test above is not vacuous.
    plain = PrunePlan(plan.source, plan.target, plan.hidden, plan.layers)
    apply_hf_plan(tmp_path / "src", tmp_path / "plain", plain, progress=False)
    ids = sample_ids()
    assert not torch.allclose(logits(tmp_path / "src", ids), logits(tmp_path / "plain", ids), atol=1e-3)
    if family == "qwen3":  # the QK-norms came through untouched (what a rescale of them would break)
        a, b = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
        norms = [k for k in a if k.endswith(("q_norm.weight", "k_norm.weight"))]
        assert len(norms) == 2 * shape.num_layers and all(torch.equal(a[k], b[k]) for k in norms)


def test_dropping_a_layer_equals_skipping_it(tiny_hf, tmp_path):
    src = tiny_hf("llama-gqa")
    assert prune_cli(src, tmp_path / "out", "--drop-layers", "1,2") == 0
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in (0, 3)])
    ref.config.num_hidden_layers = 2
    if getattr(ref.config, "layer_types", None):
        ref.config.layer_types = ref.config.layer_types[:2]
    ids = sample_ids()
    with torch.no_grad():
        want = ref(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits(tmp_path / "out", ids), want)
