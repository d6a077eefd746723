"""The HF path end to end on tiny random models: exact equivalences, outputs stock transformers loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron.prune.cli import main
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.hf import apply_plan as apply_hf_plan
from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.select import Scores, make_plan
from megatron.prune.core.target import TargetRequest, resolve_target
from megatron.prune.scoring.methods import random_scores
from tiny import FAMILIES, logits, make_tiny_model, sample_ids


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def prune_cli(src: Path, out: Path, *flags: str) -> int:
    return main(["prune", "--input", str(src), "--output", str(out), "--no-progress", *flags])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_target_is_identity(tiny_hf, tmp_path, family):
    """With no target the output equals the input, tensor for tensor, and logits bit for bit."""
    src = tiny_hf(family)
    assert prune_cli(src, tmp_path / "out") == 0
    a, b = tensors(src), tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = sample_ids()
    assert torch.equal(logits(src, ids), logits(tmp_path / "out", ids))
    assert PrunePlan.load(tmp_path / "out").is_identity()


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias", "llama-tied", "mistral"])
def test_pruned_output_loads_and_matches_shape(tiny_hf, tmp_path, family):
    src = tiny_hf(family)
    shape = HFCheckpoint.open(src).shape
    heads = shape.num_query_groups * (shape.heads_per_group - 1 if shape.heads_per_group > 1 else 1)
    flags = ["--hidden-size", str(heads * 4), "--num-attention-heads", str(heads), "--gqa", "trim-heads",
             "--ffn-hidden-size", "40",
             "--num-layers", "3", "--method", "magnitude"]
    assert prune_cli(src, tmp_path / "out", *flags) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    plan = PrunePlan.load(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    t = plan.target
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (
        heads * 4, heads, 40, 3)
    assert cfg["head_dim"] == shape.head_dim and cfg["tie_word_embeddings"] == shape.tied_embeddings
    assert sum(p.numel() for p in model.parameters()) == t.num_params()
    assert torch.isfinite(model(input_ids=sample_ids()).logits).all()
    if shape.tied_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


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


def test_zero_query_heads_prune_exactly(tiny_hf, tmp_path):
    """A query head whose o_proj columns are zero is dead: drop one per group (GQA stays even)."""
    src0 = tiny_hf("llama-gqa")
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


def test_zero_kv_group_prunes_exactly(tiny_hf, tmp_path):
    """A KV group whose query heads all have zero o_proj columns is dead: dropping the whole group is exact."""
    src0 = tiny_hf("llama-gqa")
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


def test_zero_hidden_channels_prune_exactly_with_norm_rescale(tmp_path):
    """A residual channel nobody writes is always zero; dropping it changes every RMSNorm's mean by H'/H,
    which a norm_scale of sqrt(H/H') undoes exactly (up to epsilon)."""
    from tiny import make_tiny_model

    drop = [1, 5, 9, 17, 22, 30, 33, 41]  # 48 -> 40, still a multiple of the 8 heads
    model = make_tiny_model("llama-gqa", rms_norm_eps=1e-12)
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


def test_same_seed_same_bytes_and_plan_reapplies(tiny_hf, tmp_path):
    src = tiny_hf("mistral")
    flags = ["--hidden-size", "40", "--num-attention-heads", "4", "--ffn-hidden-size", "48", "--num-layers", "3",
             "--seed", "7"]
    assert prune_cli(src, tmp_path / "a", *flags) == 0
    assert prune_cli(src, tmp_path / "b", *flags) == 0
    assert prune_cli(src, tmp_path / "c", "--plan", str(tmp_path / "a" / "prune_plan.json")) == 0
    assert prune_cli(src, tmp_path / "d", *flags[:-1], "8") == 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "c" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "d" / "model.safetensors").read_bytes()  # another seed, another choice
    pa = PrunePlan.load(tmp_path / "a")
    assert PrunePlan.from_json(pa.to_json()) == pa
    assert pa == PrunePlan.load(tmp_path / "c")


def test_sharded_output_equals_single_file(tiny_hf, tmp_path):
    src = tiny_hf("llama-gqa")
    assert prune_cli(src, tmp_path / "one", "--ffn-hidden-size", "32") == 0
    assert prune_cli(src, tmp_path / "many", "--ffn-hidden-size", "32", "--max-shard-size", "20KB") == 0
    shards = sorted((tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    one, many = tensors(tmp_path / "one"), tensors(tmp_path / "many")
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    # and a sharded checkpoint is valid input again
    assert prune_cli(tmp_path / "many", tmp_path / "again", "--num-layers", "2") == 0


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


def test_bf16_checkpoint_streams_exactly(tmp_path):
    """The streaming safetensors writer keeps dtype and bytes: bf16 in, identical bf16 out."""
    model = make_tiny_model("llama-gqa").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    assert prune_cli(tmp_path / "src", tmp_path / "same") == 0
    assert prune_cli(tmp_path / "src", tmp_path / "small", "--ffn-hidden-size", "32") == 0
    a, b, c = tensors(tmp_path / "src"), tensors(tmp_path / "same"), tensors(tmp_path / "small")
    assert all(torch.equal(a[k], b[k]) and b[k].dtype == torch.bfloat16 for k in a)
    plan = PrunePlan.load(tmp_path / "small")
    kept = list(plan.layers[0].ffn)
    assert torch.equal(c["model.layers.0.mlp.down_proj.weight"], a["model.layers.0.mlp.down_proj.weight"][:, kept])


def test_gqa_default_drops_whole_groups(tiny_hf, tmp_path):
    """--num-attention-heads alone drops whole KV groups (measured better); --gqa trim-heads keeps every group."""
    src = tiny_hf("llama-gqa")  # 8 heads in 4 groups
    assert prune_cli(src, tmp_path / "drop", "--num-attention-heads", "4", "--hidden-size", "40") == 0
    assert prune_cli(src, tmp_path / "trim", "--num-attention-heads", "4", "--hidden-size", "40",
                     "--gqa", "trim-heads") == 0
    drop, trim = PrunePlan.load(tmp_path / "drop").target, PrunePlan.load(tmp_path / "trim").target
    assert (drop.num_query_groups, drop.heads_per_group) == (2, 2)
    assert (trim.num_query_groups, trim.heads_per_group) == (4, 1)
