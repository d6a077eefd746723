"""Selection: top-k inside each TP slice, query heads inside their KV groups."""

from __future__ import annotations

import json

import torch

from compare import prune_cli, shape_of
from megatron.prune.core.select import make_plan
from megatron.prune.core.target import TargetRequest, resolve_target
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.scoring import stats
from megatron.prune.scoring.methods import random_scores
from tiny import make_tiny_model, sample_ids


def test_tp_balance_keeps_equal_counts_per_slice(tiny_hf):
    shape = HFCheckpoint.open(tiny_hf("llama-gqa")).shape  # 4 groups x 2 heads, ffn 64
    target, drop = resolve_target(shape, TargetRequest(num_query_groups=2, num_attention_heads=4, ffn_hidden_size=32))
    scores = random_scores(shape, seed=3)
    # make the unbalanced choice obviously lopsided: everything in the first half scores higher
    scores.ffn[:, :32] += 10
    scores.groups[:, :2] += 10
    bal = make_plan(shape, target, scores, drop, tp=2, balance=True)
    unb = make_plan(shape, target, scores, drop, tp=2, balance=False)
    for lp in bal.layers:
        assert sum(i < 32 for i in lp.ffn) == 16 and sum(g < 2 for g in lp.query_groups) == 1
    for lp in unb.layers:
        assert all(i < 32 for i in lp.ffn) and lp.query_groups == (0, 1)


def test_mha_head_pruning_follows_groups(tiny_hf, tmp_path):
    src = tiny_hf("llama-mha")
    assert prune_cli(src, tmp_path / "out", "--num-attention-heads", "2", "--hidden-size", "40") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_attention_heads"] == 2 and cfg["num_key_value_heads"] == 2


def test_tp_balanced_selection_keeps_top_k_inside_each_slice():
    model = make_tiny_model("llama-gqa")
    f = model.config.intermediate_size
    with torch.no_grad():  # the first TP half of every FFN dominates: a global top-k would take only it
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[: f // 2] *= 20
    shape = shape_of(model)
    scores = stats.collect_scores(model, shape, sample_ids(batch=4, seq=16), progress=False)
    target = shape.replace(ffn_hidden_size=f // 2, num_query_groups=2, num_attention_heads=2 * shape.heads_per_group)
    balanced = make_plan(shape, target, scores, tp=2, balance=True)
    unbalanced = make_plan(shape, target, scores, tp=2, balance=False)
    for lp in balanced.layers:
        sc = scores.ffn[lp.source_layer]
        for r in range(2):
            part = sc[r * f // 2 : (r + 1) * f // 2]
            want = sorted(int(i) + r * f // 2 for i in torch.argsort(-part, stable=True)[: f // 4])
            assert [i for i in lp.ffn if r * f // 2 <= i < (r + 1) * f // 2] == want
        g = scores.groups[lp.source_layer]
        assert lp.query_groups == (int(g[:2].argmax()), 2 + int(g[2:].argmax()))
    assert any(max(lp.ffn) < f // 2 for lp in unbalanced.layers)  # the skew is real
