"""torchrun worker: build megatron-core GPTModel (local spec) from each checkpoint's args, load its shard
strictly, and compare its logits with transformers' for the matching HF checkpoint.

Usage: torchrun --nproc_per_node=N tests/megatron_parity_worker.py JOBS.json RESULTS.json (N = 2, or 4 for TP2 x EP2)
JOBS.json: [{"name", "mg", "hf", "tp"[, "ep", "dist", "seq"]}]; jobs run grouped by EP and TP so each process group
starts once.
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F


def build_gpt(a, sdpa: bool = False):
    """A GPTModel from a Megatron-LM args Namespace: what --use-checkpoint-args builds (GPTModel's own arguments
    come from the training recipe's ``gpt_model_kwargs``). Stock local spec, or with ``sdpa`` the recipe's local
    spec, whose core attention runs through torch SDPA."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron.prune.training.model import _layer_spec, gpt_model_kwargs

    moe = {}
    if getattr(a, "num_experts", None):  # SequentialMLP experts behind the allgather dispatcher, as the args say
        moe = dict(num_moe_experts=a.num_experts, moe_ffn_hidden_size=a.moe_ffn_hidden_size,
                   moe_router_topk=a.moe_router_topk, moe_router_pre_softmax=a.moe_router_pre_softmax,
                   moe_token_dispatcher_type=a.moe_token_dispatcher_type, moe_grouped_gemm=a.moe_grouped_gemm,
                   moe_aux_loss_coeff=0.0, expert_model_parallel_size=a.expert_model_parallel_size)
    cfg = TransformerConfig(**moe,
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups if a.group_query_attention else None, kv_channels=a.kv_channels,
        ffn_hidden_size=a.ffn_hidden_size, normalization=a.normalization, gated_linear_unit=a.swiglu,
        activation_func=F.silu, add_bias_linear=a.add_bias_linear, add_qkv_bias=a.add_qkv_bias,
        qk_layernorm=getattr(a, "qk_layernorm", False),
        layernorm_epsilon=a.norm_epsilon, hidden_dropout=a.hidden_dropout, attention_dropout=a.attention_dropout,
        tensor_model_parallel_size=a.tensor_model_parallel_size, pipeline_model_parallel_size=1,
        params_dtype=torch.float32, use_cpu_initialization=True, apply_rope_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
    )
    spec = get_gpt_layer_local_spec(num_experts=moe.get("num_moe_experts"), moe_grouped_gemm=False,
                                    normalization=a.normalization, qk_layernorm=cfg.qk_layernorm)
    if sdpa:
        spec = _layer_spec(Namespace(transformer_impl="local", qk_layernorm=cfg.qk_layernorm,
                                     normalization=a.normalization, attention_backend="flash"), cfg)
    return GPTModel(config=cfg, transformer_layer_spec=spec, parallel_output=False, **gpt_model_kwargs(a)).eval()


def sdpa_against_unfused(a, sd, stock, ids, pos, mask) -> dict:
    """The recipe's SDPA attention against the stock unfused one on the same weights: logits and gradients, how
    often SDPA ran (once per layer when no mask is given), and that a given mask falls back to the stock path."""
    model = build_gpt(a, sdpa=True)
    model.load_state_dict(sd, strict=True)
    calls, sdpa = [], F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda *x, **k: calls.append(1) or sdpa(*x, **k)
    try:
        grads = []
        for m, m_mask in ((stock, mask), (model, None)):
            m.zero_grad()
            out = m(ids, pos, m_mask)
            out.float().pow(2).mean().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        n_calls = len(calls)
        with torch.no_grad():
            fallback = torch.equal(model(ids, pos, mask), stock(ids, pos, mask))
    finally:
        F.scaled_dot_product_attention = sdpa
    with torch.no_grad():
        diff = float((model(ids, pos, None) - stock(ids, pos, mask)).abs().max())
    grad_diff = max(float((grads[0][n] - grads[1][n]).abs().max() / grads[0][n].abs().max().clamp_min(1e-12))
                    for n in grads[0])
    return {"sdpa_calls": n_calls, "layers": a.num_layers, "sdpa_logit_diff": diff, "sdpa_grad_rel_diff": grad_diff,
            "masked_falls_back": fallback and len(calls) == n_calls}


def main(jobs_path: str, out_path: str) -> None:
    from megatron.core import parallel_state

    from megatron.prune.cpu import init_parallel
    from megatron.prune.formats.folder import open_megatron
    from megatron.prune.formats.mcore.read import load_shard

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tiny import logits, sample_ids

    jobs = sorted(json.loads(Path(jobs_path).read_text()), key=lambda j: (j.get("ep", 1), j["tp"]))
    results = {}
    for job in jobs:
        init_parallel(job["tp"], 1, ep=job.get("ep", 1))
        rank = parallel_state.get_tensor_model_parallel_rank()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        ckpt = open_megatron(job["mg"])
        assert ckpt.tp == job["tp"], (ckpt.tp, job["tp"])
        model = build_gpt(ckpt.args)
        if job.get("dist"):  # torch_dist: megatron-core's own loader, then a strict load as Megatron-LM does
            from megatron.core import dist_checkpointing

            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt.iter_dir))
            assert loaded["args"].ckpt_format == "torch_dist" and loaded["iteration"] == 0  # the common state
            sd = loaded["model"]
        else:
            sd = load_shard(ckpt.files[(rank, 0) if job.get("ep", 1) == 1 else (rank, 0, ep_rank)])["model"]
        model.load_state_dict(sd, strict=True)  # raises on any missing or unexpected key
        ids = sample_ids(ckpt.shape.vocab_size, seq=job.get("seq", 12))
        b, s = ids.shape
        pos = torch.arange(s)[None].expand(b, s)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
        with torch.no_grad():
            mg = model(ids, pos, mask)[..., : ckpt.shape.vocab_size]
        ref = logits(job["hf"], ids)
        results[job["name"]] = {
            "rank": torch.distributed.get_rank(), "tp": job["tp"], "tp_rank": rank, "ep_rank": ep_rank,
            "max_abs_diff": float((mg - ref).abs().max()),
            "ref_scale": float(ref.abs().max()), "shape": list(mg.shape), "strict_load": True,
        }
        if job["name"].startswith("convert-"):
            results[job["name"]].update(sdpa_against_unfused(ckpt.args, sd, model, ids, pos, mask))
        try:
            torch.testing.assert_close(mg, ref, rtol=1e-4, atol=1e-4)
            results[job["name"]]["close"] = True
        except AssertionError as e:  # reported, not raised: the other ranks must still reach the gather
            results[job["name"]].update(close=False, error=str(e)[:500])
        if job.get("save_dist"):  # the same weights written by megatron-core as torch_dist, to test reading it
            from megatron.core import dist_checkpointing

            iter_dir = Path(job["save_dist"]) / "iter_0000005"
            iter_dir.mkdir(parents=True, exist_ok=True)
            state = {"model": model.sharded_state_dict(), "args": ckpt.args, "iteration": 5,
                     "checkpoint_version": 3.0}
            dist_checkpointing.save(state, str(iter_dir))
            if torch.distributed.get_rank() == 0:
                (Path(job["save_dist"]) / "latest_checkpointed_iteration.txt").write_text("5")
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps(gathered, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
