"""The model a recovery run trains: megatron-core's ``GPTModel`` with LLaMA-family layers (RMSNorm, SwiGLU, RoPE,
GQA), the Transformer Engine spec where it is installed and chosen, else the local spec with torch SDPA attention."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from megatron.prune.errors import PruneError
from megatron.prune.training import attention
from megatron.prune.training.checkpoints import load_misfit


def start_memory_history(args: Any) -> None:
    """--record-memory-history: start the allocator's history before the model is built, as the stock loop does
    (``start_memory_history_recording``, honouring --profile-ranks) for models it builds from a config, but not for a
    ``model_provider``'s."""
    from types import SimpleNamespace

    from megatron.training.utils import start_memory_history_recording

    start_memory_history_recording(SimpleNamespace(
        record_memory_history=bool(getattr(args, "record_memory_history", False)),
        profile_ranks=list(getattr(args, "profile_ranks", None) or []),
        memory_snapshot_path=getattr(args, "memory_snapshot_path", "snapshot.pickle")))


def have_transformer_engine() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def follows_local_checkpoint(user_flags: Sequence[str], saved_spec: str | None, builds_te: bool) -> bool:
    """One rule for converting and training: without ``--transformer-impl`` among the user's flags, a run that would
    build Transformer Engine's spec builds the local spec of a checkpoint saved with it (converted on a machine
    without TE, say) instead of refusing it. A TE-spec checkpoint where the run builds local is still refused (the
    refusal names the reshard command)."""
    chosen = any(f == "--transformer-impl" or f.startswith("--transformer-impl=") for f in user_flags)
    return saved_spec == "local" and builds_te and not chosen


def layer_spec_name(args: Any) -> str:
    """The layer spec this run builds: Transformer Engine's only when selected and installed."""
    te = args.transformer_impl == "transformer_engine" and have_transformer_engine()
    return "transformer_engine" if te else "local"


def refuse_partial_loads(model: torch.nn.Module) -> None:
    """Make a checkpoint that does not fit ``model`` an error. The stock loader retries a failed strict load with
    ``strict=False`` and goes on with whatever fitted (megatron-core 0.19.2); TE's ``_extra_state`` may differ."""

    def check(module: torch.nn.Module, incompatible: Any) -> None:
        misfit = load_misfit(incompatible)
        if misfit:
            raise PruneError(misfit)

    model.register_load_state_dict_post_hook(check)


def _layer_spec(args: Any, config: Any):
    """Transformer Engine spec when TE is importable and selected; megatron-core's local spec else, its core
    attention through torch SDPA where :func:`.attention.uses_sdpa` says so (by default on a GPU)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if layer_spec_name(args) == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=args.qk_layernorm,
            use_te_activation_func=bool(getattr(args, "use_te_activation_func", False)),
            use_te_op_fuser=bool(getattr(args, "use_transformer_engine_op_fuser", False)))
    spec = get_gpt_layer_local_spec(num_experts=getattr(args, "num_experts", None), moe_grouped_gemm=False,
                                    qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    if attention.uses_sdpa(args):
        spec.submodules.self_attention.submodules.core_attention = attention.SDPAttention
    return spec


def spec_description(args: Any) -> str:
    """The layer spec and attention kernel this run builds (and its experts), for the start-up line."""
    name = layer_spec_name(args)
    if name == "local":
        text = f"local spec, {'torch SDPA' if attention.uses_sdpa(args) else 'unfused'} attention"
    else:
        text = f"{name} spec"
    return text + moe_description(args)


def moe_description(args: Any) -> str:
    """The experts of a MoE run, for the start-up line ('' for a dense model)."""
    if not getattr(args, "num_experts", None):
        return ""
    return (f", {args.num_experts} experts (SequentialMLP, top-{args.moe_router_topk}, EP="
            f"{args.expert_model_parallel_size}, {args.moe_token_dispatcher_type} dispatcher), load balancing "
            f"{args.moe_router_load_balancing_type} x {args.moe_aux_loss_coeff}")


def gpt_model_kwargs(args: Any) -> dict[str, Any]:
    """``GPTModel`` arguments besides config and layer spec, from Megatron args or a checkpoint's saved args."""
    kwargs = dict(
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=bool(getattr(args, "use_rope_scaling", False)),
        seq_len_interpolation_factor=getattr(args, "rotary_seq_len_interpolation_factor", None),
    )
    if kwargs["rope_scaling"]:  # the stock builder leaves the factor at its default 8 (megatron-core 0.19.2)
        kwargs["rope_scaling_factor"] = args.rope_scaling_factor
    return kwargs


def build_gpt(args: Any, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
              config: Any = None, pg_collection: Any = None):
    """A LLaMA-family ``GPTModel`` (RMSNorm, SwiGLU, RoPE, GQA: all from Megatron flags)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training.arguments import core_transformer_config_from_args

    config = config or core_transformer_config_from_args(args)
    return GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(args, config),
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        **gpt_model_kwargs(args),
    )
