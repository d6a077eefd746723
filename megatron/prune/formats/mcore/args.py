"""The ``args`` Namespace of a Megatron checkpoint: written for a shape (what ``--use-checkpoint-args`` reads) and read
back into a :class:`ModelShape` and an HF config."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

import torch

from megatron.prune.core.shape import (ModelShape, check_config_numbers, config_size, family_for_shape, family_of,
                                       hf_config_for_shape, read_hf_config)
from megatron.prune.errors import PruneError
from megatron.prune.formats.mcore.schema import META_DIR


def rope_scaling_args(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """Megatron's RoPE scaling flags for an HF config; only LLaMA-3 scaling with megatron-core's fixed factors.

    The stock ``--use-checkpoint-args`` loader does not read these; ``pretrain_llama.py`` adopts them itself.
    """
    rs = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return {"use_rope_scaling": False}
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind != "llama3" or any(float(rs.get(k, v)) != v for k, v in fixed.items()):
        raise PruneError(f"RoPE scaling {dict(rs)} is not supported by megatron-core (only llama3 scaling with "
                         f"{fixed})")
    return {"use_rope_scaling": True, "rope_scaling_factor": float(rs["factor"])}


def args_for_shape(base: argparse.Namespace | None, shape: ModelShape, tp: int, pp: int, padded: int,
                   divisible_by: int, dtype: torch.dtype, spec: str, hf_config: Mapping[str, Any],
                   tokenizer_dir: Path | None, ep: int = 1, grouped: bool = False) -> argparse.Namespace:
    """The ``args`` Namespace of an output checkpoint: ``base`` (if any) with every shape field set (``grouped``: the
    experts in TEGroupedMLP's layout)."""
    a = argparse.Namespace(**vars(base)) if base is not None else argparse.Namespace()
    # hf_config's numbers were checked where it was read (check_config_numbers: an HF folder's or hf_meta/'s)
    max_pos = int(hf_config.get("max_position_embeddings") or getattr(a, "max_position_embeddings", None) or 4096)
    rope = hf_config.get("rope_theta") or (hf_config.get("rope_parameters") or {}).get("rope_theta")
    fields = dict(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
        group_query_attention=shape.num_query_groups != shape.num_attention_heads, kv_channels=shape.head_dim,
        max_position_embeddings=max_pos, position_embedding_type="rope", add_position_embedding=False,
        use_rotary_position_embeddings=True,
        rotary_base=float(rope or getattr(a, "rotary_base", 10000)),
        rotary_percent=1.0, rotary_interleaved=False, add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm, qk_l2_norm=False,
        squared_relu=False, swiglu=True, untie_embeddings_and_output_weights=not shape.tied_embeddings,
        apply_layernorm_1p=False, normalization="RMSNorm",
        norm_epsilon=float(hf_config.get("rms_norm_eps") or getattr(a, "norm_epsilon", 1e-5)),
        apply_query_key_layer_scaling=False, attention_dropout=0.0, hidden_dropout=0.0,
        vocab_size=shape.vocab_size, padded_vocab_size=padded, make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
        expert_model_parallel_size=ep, ckpt_format="torch", transformer_impl=spec,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        iteration=0, consumed_train_samples=0, consumed_valid_samples=0,
    )
    fields.update(rope_scaling_args(hf_config))
    fields.update(moe_args(shape, hf_config, grouped))
    fields.setdefault("seq_length", getattr(a, "seq_length", None) or min(max_pos, 4096))
    a.__dict__.update(fields)
    if tokenizer_dir is not None:
        a.tokenizer_type, a.tokenizer_model = "HuggingFaceTokenizer", str(tokenizer_dir)
    return a


def moe_args(shape: ModelShape, hf_config: Mapping[str, Any], grouped: bool = False) -> dict[str, Any]:
    """megatron-core's mixture-of-experts args (none for a dense model). Its router takes the top-k of the logits and
    softmaxes them (= softmax, top-k, renormalised: Mixtral, Qwen3-MoE with norm_topk_prob), or with pre-softmax takes
    the top-k of the softmax as it is (Qwen3-MoE without norm_topk_prob). ``moe_grouped_gemm`` records the expert
    layout (what ``--use-checkpoint-args`` and our reader read back); fc1 stays [gate; up], not interleaved."""
    if not shape.is_moe:
        return dict(num_experts=None)
    return dict(num_experts=shape.num_experts, moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
                ffn_hidden_size=shape.moe_ffn_hidden_size, moe_router_topk=shape.num_experts_per_tok,
                moe_router_pre_softmax=not hf_config.get("norm_topk_prob", True), moe_router_score_function="softmax",
                moe_grouped_gemm=grouped, moe_mlp_glu_interleave_size=None, moe_token_dispatcher_type="allgather",
                moe_layer_freq=1,
                moe_shared_expert_intermediate_size=None, expert_tensor_parallel_size=None)


def hf_config_from_args(args: argparse.Namespace, shape: ModelShape, dtype: torch.dtype) -> dict[str, Any]:
    """An HF config for a Megatron checkpoint that came without ``hf_meta/config.json``."""
    family = family_for_shape(shape)
    cfg = {"architectures": [family.architecture], "model_type": family.model_type, "hidden_act": "silu",
           "rms_norm_eps": float(getattr(args, "norm_epsilon", 1e-5)),
           "rope_theta": float(getattr(args, "rotary_base", 10000)),
           "max_position_embeddings": int(getattr(args, "max_position_embeddings", 4096) or 4096),
           "attention_bias": shape.qkv_bias, "torch_dtype": str(dtype).removeprefix("torch.")}
    if shape.is_moe:
        cfg["norm_topk_prob"] = not getattr(args, "moe_router_pre_softmax", False)
    if getattr(args, "use_rope_scaling", False):
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(args.rope_scaling_factor), "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return hf_config_for_shape(cfg, shape)


def meta_config_and_shape(folder: Path, args: argparse.Namespace) -> tuple[dict[str, Any], ModelShape]:
    """The HF config a Megatron checkpoint keeps in ``hf_meta/`` (empty when it has none) and its shape from
    ``args``: the config's numbers and family are checked against the args, since conversion back to HF copies them."""
    meta = folder / META_DIR / "config.json"
    hf_config = read_hf_config(meta) if meta.is_file() else {}
    try:
        check_config_numbers(hf_config)
        vocab = config_size(hf_config, "vocab_size") if hf_config.get("vocab_size") is not None else None
    except PruneError as e:  # "config.json 'key': ..." -> "FOLDER/hf_meta/config.json 'key': ..."
        raise PruneError(f"{folder / META_DIR}/{e}") from None
    shape = shape_from_args(args, vocab)
    check_meta_family(hf_config, shape, folder)
    return hf_config, shape


def check_meta_family(hf_config: Mapping[str, Any], shape: ModelShape, where: Path) -> None:
    """The HF config kept beside a Megatron checkpoint must have the layers its args describe: a Qwen3 config over
    args without ``qk_layernorm`` would export a model whose QK-norms transformers initialises at random."""
    if not hf_config:
        return
    family = family_of(hf_config)
    if (family.qk_norm != shape.qk_norm or (family.qkv_bias and not shape.qkv_bias)
            or (family.moe is not None) != shape.is_moe):
        raise PruneError(f"{where}: its HF config is {family.architecture}, but its args say "
                         f"qk_layernorm={shape.qk_norm}, add_qkv_bias={shape.qkv_bias}, "
                         f"num_experts={shape.num_experts or None}: the two describe different "
                         "models")


def shape_from_args(args: argparse.Namespace, vocab_size: int | None) -> ModelShape:
    """Read a :class:`ModelShape` from a checkpoint's args; refuse what LLaMA-family layers are not."""
    wrong = {k: getattr(args, k, None) for k, want in (("normalization", "RMSNorm"), ("swiglu", True),
                                                        ("position_embedding_type", "rope"),
                                                        ("add_bias_linear", False))
             if getattr(args, k, want) != want}
    if getattr(args, "qk_l2_norm", None):
        wrong["qk_l2_norm"] = args.qk_l2_norm
    experts = int(getattr(args, "num_experts", None) or 0)
    if experts:  # what the MoE schema knows: every layer sparse, [gate; up] experts, no shared expert, softmax router
        for k, want in (("moe_mlp_glu_interleave_size", None), ("moe_shared_expert_intermediate_size", None),
                        ("moe_router_score_function", "softmax")):
            if getattr(args, k, want) != want:
                wrong[k] = getattr(args, k)
        if getattr(args, "moe_layer_freq", 1) not in (1, [1] * int(args.num_layers)):
            wrong["moe_layer_freq"] = args.moe_layer_freq
    if wrong:
        raise PruneError(f"not a LLaMA-family Megatron checkpoint we read: {wrong} (need RMSNorm, swiglu, rope, "
                         "no linear biases, QK-norm if any an RMSNorm; experts in every layer, SequentialMLP or "
                         "TEGroupedMLP with fc1 [gate; up], no shared expert, a softmax router)")
    try:
        heads = int(args.num_attention_heads)
        groups = int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
        return ModelShape(
            num_layers=int(args.num_layers), hidden_size=int(args.hidden_size), num_attention_heads=heads,
            num_query_groups=groups, head_dim=int(getattr(args, "kv_channels", None) or args.hidden_size // heads),
            ffn_hidden_size=0 if experts else int(args.ffn_hidden_size),
            vocab_size=int(vocab_size or getattr(args, "vocab_size", None) or args.padded_vocab_size),
            tied_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
            qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
            qk_norm=bool(getattr(args, "qk_layernorm", False)),
            num_experts=experts,
            moe_ffn_hidden_size=(int(getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size)
                                 if experts else 0),
            num_experts_per_tok=int(getattr(args, "moe_router_topk", 2)) if experts else 0,
        )
    except (AttributeError, TypeError) as e:
        raise PruneError(f"checkpoint args lack a shape field ({e})") from e


def config_with_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``config`` naming the dtype the weights are written in: after bf16 training the weights are bf16 even where
    the source's config says float32, and transformers loads a checkpoint in its config's dtype."""
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    return {**config, **{k: name for k in keys}}
