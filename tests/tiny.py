"""Tiny random HF checkpoints of each supported family, built in the tests (no hub)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

FAMILIES: dict[str, dict] = {
    "llama-mha": dict(arch="llama", num_attention_heads=4, num_key_value_heads=4),
    "llama-gqa": dict(arch="llama", num_attention_heads=8, num_key_value_heads=4),
    "mistral": dict(arch="mistral", num_attention_heads=8, num_key_value_heads=2),
    "qwen2-bias": dict(arch="qwen2", num_attention_heads=8, num_key_value_heads=4),
    "llama-tied": dict(arch="llama", num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    # QK-norm; head_dim 16 with hidden 48 and 8 heads: the attention width (128) is not the hidden size
    "qwen3": dict(arch="qwen3", num_attention_heads=8, num_key_value_heads=4, head_dim=16),
}

# Mixture-of-experts families, apart from FAMILIES (the Megatron format does not take them yet): 4 experts of
# width 16, top-2; Qwen3-MoE renormalises its top-k weights (norm_topk_prob), as Mixtral always does.
MOE_FAMILIES: dict[str, dict] = {
    "qwen3-moe": dict(arch="qwen3_moe", num_attention_heads=8, num_key_value_heads=4, head_dim=16, num_experts=4,
                      moe_intermediate_size=16, num_experts_per_tok=2, norm_topk_prob=True),
    "mixtral": dict(arch="mixtral", num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                    intermediate_size=16, num_experts_per_tok=2),
}


def llama3_rope(factor: float) -> dict:
    """Config overrides for LLaMA-3.x RoPE scaling (megatron-core's fixed low/high factors and original length)."""
    return dict(rope_theta=500000.0, max_position_embeddings=131072,
                rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


LLAMA3_ROPE = llama3_rope(32.0)  # as Llama-3.2


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    spec = dict({**FAMILIES, **MOE_FAMILIES}[family])
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "qwen3_moe": Qwen3MoeConfig, "mixtral": MixtralConfig}[spec.pop("arch")]
    kw = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=4, vocab_size=96, head_dim=8,
              max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0)
    kw.update(spec)
    kw.update(overrides)
    cfg = cls(**kw)
    cfg.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
    return cfg


def make_tiny_model(family: str, seed: int = 0, **overrides):
    """A float32 model with weights large enough that every unit visibly matters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if "embed" in name or "lm_head" in name else 0.15))
    return model


def silence_expert(model, expert: int, channel: int = 0):
    """Make ``expert`` of every MoE layer one the router never picks: hidden ``channel`` holds 0.3 for every token
    in every layer (the embedding writes it; no attention or expert output touches it), and the expert's router row
    is -1e5 on that channel alone, so its logit is about -3e4 / rms and its routing probability exactly 0 (the other
    experts' rows ignore the channel, so it does not skew their routing)."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channel] = 0.3
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channel] = 0
            layer.mlp.experts.down_proj[:, channel] = 0  # [E, h, F] in memory
            layer.post_attention_layernorm.weight[channel] = 1.0
            layer.mlp.gate.weight[:, channel] = 0
            layer.mlp.gate.weight[expert] = 0
            layer.mlp.gate.weight[expert, channel] = -1e5
    return model


def make_tiny_hf(folder: Path | str, family: str = "llama-gqa", seed: int = 0, **overrides) -> Path:
    """Save a tiny random checkpoint of ``family`` to ``folder`` (safetensors + config) and return it."""
    folder = Path(folder)
    model = make_tiny_model(family, seed, **overrides)
    model.save_pretrained(folder)
    return folder


def logits(folder_or_model, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = folder_or_model
    if not hasattr(model, "forward"):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(vocab: int = 96, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def copy_tokenizer(real_model: Path, folder: Path) -> Path:
    """The real model's tokenizer files copied into ``folder``."""
    from compare import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (real_model / name).is_file():
            shutil.copy(real_model / name, folder / name)
    return folder


def with_real_tokenizer(folder: Path, family: str, real_model: Path) -> Path:
    """A tiny random ``family`` model with the real model's tokenizer (vocab 49152); layer 2 is a no-op."""
    model = make_tiny_model(family, vocab_size=49152)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    return copy_tokenizer(real_model, folder)


DEAD_EXPERT = 1  # the expert of every MoE layer the router of :func:`moe_with_real_tokenizer` never picks


def moe_with_real_tokenizer(folder: Path, family: str, real_model: Path) -> Path:
    """A tiny random MoE ``family`` model with the real model's tokenizer, whose expert DEAD_EXPERT is never routed
    to (:func:`silence_expert`)."""
    silence_expert(make_tiny_model(family, vocab_size=49152), DEAD_EXPERT).save_pretrained(folder)
    return copy_tokenizer(real_model, folder)
