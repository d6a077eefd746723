"""megatron-core GPTModel built from our checkpoints' args loads them strictly and matches transformers' logits.

One torchrun group (2 processes, gloo) runs every check for the module: TP=1 jobs first (each rank holds the
whole model), then TP=2 jobs; results come back as JSON, one entry per rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compare import assert_same_tensors, hf_tensors
from megatron.prune.core.select import make_plan
from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.hf import apply_plan as apply_hf_plan
from megatron.prune.formats.mcore import ops
from megatron.prune.scoring.methods import random_scores
from procs import run_on_two_ranks
from tests.tiny import LLAMA3_ROPE, llama3_rope, logits, make_tiny_hf, make_tiny_model, sample_ids

FAMILIES = ("llama-gqa", "qwen2-bias", "llama-tied", "qwen3")
# torch_dist output checked per family
DIST_OUTPUT = {"qwen2-bias": "convert", "llama-gqa": "prune", "qwen3": "prune"}
WORKER = Path(__file__).with_name("megatron_parity_worker.py")
ROPE_SEQ = 64


def prune_target(shape):
    if shape.tied_embeddings:  # 6 heads / 2 groups
        return shape.replace(hidden_size=36, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                             num_layers=3)
    return shape.replace(hidden_size=40, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=32, num_layers=3)


@pytest.fixture(scope="module")
def parity(tiny_hf, tmp_path_factory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("parity")
    jobs = []
    for family in FAMILIES:
        hf = tiny_hf(family)
        shape = HFCheckpoint.open(hf).shape
        for tp in (1, 2):
            mg = ops.hf_to_megatron(hf, root / f"{family}-tp{tp}", tp=tp, progress=False)
            job = {"name": f"convert-{family}-tp{tp}", "mg": str(mg), "hf": str(hf), "tp": tp}
            if tp == 2 and family == "qwen2-bias":
                job["save_dist"] = str(root / "torch_dist")
            jobs.append(job)
        plan = make_plan(shape, prune_target(shape), random_scores(shape, 11), tp=2, balance=True)
        ref = apply_hf_plan(hf, root / f"{family}-pruned-hf", plan, progress=False)
        for tp in (1, 2):
            pruned = ops.apply_plan(open_megatron(root / f"{family}-tp{tp}"), plan, root / f"{family}-pruned-tp{tp}",
                                    progress=False)
            jobs.append({"name": f"prune-{family}-tp{tp}", "mg": str(pruned), "hf": str(ref), "tp": tp})
        if family in DIST_OUTPUT:  # torch_dist output, loaded by megatron-core's dist_checkpointing at TP=2
            if DIST_OUTPUT[family] == "convert":
                out = ops.hf_to_megatron(hf, root / f"{family}-dist", tp=2, progress=False, ckpt_format="torch_dist")
                jobs.append({"name": f"dist-convert-{family}", "mg": str(out), "hf": str(hf), "tp": 2, "dist": True})
            else:
                out = ops.apply_plan(open_megatron(root / f"{family}-tp2"), plan, root / f"{family}-pruned-dist",
                                     progress=False, ckpt_format="torch_dist")
                jobs.append({"name": f"dist-prune-{family}", "mg": str(out), "hf": str(ref), "tp": 2, "dist": True})
    # LLaMA-3.x RoPE scaling: carried in args, and applied with the checkpoint's factor (not the default 8)
    rope = make_tiny_hf(root / "llama3-rope-hf", "llama-gqa", **LLAMA3_ROPE)
    jobs.append({"name": "llama3-rope", "mg": str(ops.hf_to_megatron(rope, root / "llama3-rope", tp=2, progress=False)),
                 "hf": str(rope), "tp": 2, "seq": ROPE_SEQ})
    per_rank = run_on_two_ranks(WORKER, jobs, root, timeout=600)
    out = {j["name"]: [r[j["name"]] for r in per_rank] for j in jobs}
    out["torch_dist"] = {"mg": root / "torch_dist", "hf": tiny_hf("qwen2-bias")}
    return out


@pytest.mark.parametrize("kind", ["convert", "prune"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_gpt_model_logits_match_transformers(parity, kind, family, tp):
    ranks = parity[f"{kind}-{family}-tp{tp}"]
    assert len(ranks) == 2 and {r["rank"] for r in ranks} == {0, 1}
    for r in ranks:
        assert r["strict_load"] and r["tp"] == tp
        assert r["close"], r.get("error")
        assert r["max_abs_diff"] < 1e-4 * max(1.0, r["ref_scale"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_attention_matches_megatron_cores_unfused_attention(parity, family, tp):
    """The recipe's local spec (core attention through torch SDPA, one kernel per layer) gives the logits and
    gradients of megatron-core's unfused attention on the same weights, with GQA and at TP=2 (each rank's heads);
    a given mask (per-document masking) takes the stock path, bit for bit."""
    for r in parity[f"convert-{family}-tp{tp}"]:
        assert r["sdpa_calls"] == r["layers"] > 0
        assert r["sdpa_logit_diff"] < 1e-5 * max(1.0, r["ref_scale"]), r["sdpa_logit_diff"]
        assert r["sdpa_grad_rel_diff"] < 1e-4, r["sdpa_grad_rel_diff"]
        assert r["masked_falls_back"]


def test_torch_dist_input_matches_and_prunes_like_hf(parity, tmp_path):
    """A torch_dist checkpoint written by megatron-core at TP=2 reads back as the same logical tensors."""
    
    from megatron.prune.formats.mcore.dist import TorchDistCheckpoint

    src, hf = parity["torch_dist"]["mg"], parity["torch_dist"]["hf"]
    ck = open_megatron(src)
    assert isinstance(ck, TorchDistCheckpoint) and ck.tp == 2
    assert_same_tensors(hf_tensors(hf), hf_tensors(ops.megatron_to_hf(src, tmp_path / "hf", progress=False)))
    shape = ck.shape
    plan = make_plan(shape, prune_target(shape), random_scores(shape, 5), tp=2, balance=True)
    pruned = ops.apply_plan(open_megatron(src), plan, tmp_path / "pruned", progress=False)
    assert open_megatron(pruned).tp == 2
    ref = apply_hf_plan(hf, tmp_path / "ref", plan, progress=False)
    assert_same_tensors(hf_tensors(ref), hf_tensors(ops.megatron_to_hf(pruned, tmp_path / "back", progress=False)))


@pytest.mark.parametrize("name", [f"dist-{kind}-{family}" for family, kind in DIST_OUTPUT.items()])
def test_torch_dist_output_loads_in_megatron_core(parity, name):
    """Our torch_dist output (convert, balanced prune; TP=2) loads through megatron-core's dist_checkpointing
    into GPTModel's sharded state dict, then strictly, and gives transformers' logits."""
    ranks = parity[name]
    assert len(ranks) == 2 and {r["rank"] for r in ranks} == {0, 1}
    for r in ranks:
        assert r["strict_load"] and r["tp"] == 2
        assert r["close"], r.get("error")
        assert r["max_abs_diff"] < 1e-4 * max(1.0, r["ref_scale"])


def test_llama3_rope_scaling_matches_transformers(parity):
    """A LLaMA-3.x checkpoint (RoPE scaling, factor 32) gives transformers' logits at TP=2; the control shows the
    check would catch scaling left off or left at megatron-core's default factor 8."""
    for r in parity["llama3-rope"]:
        assert r["close"], r.get("error")
        assert r["max_abs_diff"] < 1e-4 * max(1.0, r["ref_scale"])
    ids = sample_ids(96, seq=ROPE_SEQ)
    ref = logits(make_tiny_model("llama-gqa", **LLAMA3_ROPE), ids)
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    unscaled = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_scaling"}
    for other in (unscaled, llama3_rope(8.0)):
        assert float((logits(make_tiny_model("llama-gqa", **other), ids) - ref).abs().max()) > 10 * tol
