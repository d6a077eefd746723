"""Model shapes: the handful of numbers that define a LLaMA-family transformer.

A :class:`ModelShape` is read from an HF ``config.json`` through one registry keyed on
``architectures`` and written back into one; pruning only ever changes its numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from megatron.prune.errors import PruneError


@dataclass(frozen=True)
class Family:
    """What distinguishes one HF architecture of the LLaMA family from another."""

    architecture: str
    model_type: str
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys, one [head_dim] weight each per layer (Qwen3)
    # transformers' config refuses a hidden size that is not a multiple of the heads, even with an explicit head_dim
    # (LlamaConfig in transformers 5; Mistral, Qwen2 and Qwen3 take any)
    hidden_multiple_of_heads: bool = False

    def fits(self, shape: "ModelShape") -> bool:
        """Whether a model of ``shape`` has this family's layers (what a checkpoint without an HF config shows)."""
        return (self.qkv_bias, self.qk_norm) == (shape.qkv_bias, shape.qk_norm)


FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family("LlamaForCausalLM", "llama", qkv_bias=False, hidden_multiple_of_heads=True),
        Family("MistralForCausalLM", "mistral", qkv_bias=False),
        Family("Qwen2ForCausalLM", "qwen2", qkv_bias=True),
        Family("Qwen3ForCausalLM", "qwen3", qkv_bias=False, qk_norm=True),
    )
}


@dataclass(frozen=True)
class ModelShape:
    """Every dimension pruning can change, plus the fixed ones it must respect.

    ``head_dim`` is never pruned: RoPE frequencies are tied to it (and QK-norm weights are ``[head_dim]``).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # KV heads
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def replace(self, **changes: Any) -> "ModelShape":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count implied by the shape (what ``sum(p.numel())`` of the HF model gives)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (2 * d if self.qk_norm else 0)
        mlp = 3 * h * self.ffn_hidden_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return emb + h + self.num_layers * per_layer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelShape":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# The sizes tensor parallelism splits (KV groups, query heads, FFN channels), in the order errors name them.
TP_SPLIT_SIZES = ("num_query_groups", "num_attention_heads", "ffn_hidden_size")


def not_divisible(shape: ModelShape, n: int, sizes: tuple[str, ...] = TP_SPLIT_SIZES) -> list[tuple[str, int]]:
    """(name, size) of each of ``sizes`` of ``shape`` that ``n`` does not divide, in order."""
    return [(name, getattr(shape, name)) for name in sizes if getattr(shape, name) % n]


def family_of(config: Mapping[str, Any]) -> Family:
    """The registered family of an HF config, or a PruneError naming what is supported."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise PruneError(
        f"unsupported architecture {archs or config.get('model_type')!r}; "
        f"supported: {', '.join(sorted(FAMILIES))}"
    )


def family_for_shape(shape: ModelShape) -> Family:
    """The first registered family whose layers ``shape`` has: the HF architecture of a Megatron checkpoint that
    came without its HF config."""
    for family in FAMILIES.values():
        if family.fits(shape):
            return family
    raise PruneError(f"no supported architecture has q/k/v bias={shape.qkv_bias} and QK-norm={shape.qk_norm}; "
                     f"supported: {', '.join(sorted(FAMILIES))}")


def shape_from_hf_config(config: Mapping[str, Any]) -> ModelShape:
    """Read a :class:`ModelShape` from an HF config dict."""
    family = family_of(config)
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = config.get("head_dim") or hidden // heads
    return ModelShape(
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        ffn_hidden_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias or bool(config.get("attention_bias", False)),
        qk_norm=family.qk_norm,
    )


def hf_config_for_shape(config: Mapping[str, Any], shape: ModelShape) -> dict[str, Any]:
    """A copy of ``config`` rewritten for ``shape`` (explicit ``head_dim`` included)."""
    out = dict(config)
    out.update(
        num_hidden_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_query_groups,
        head_dim=shape.head_dim,
        intermediate_size=shape.ffn_hidden_size,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tied_embeddings,
    )
    if "layer_types" in out and isinstance(out["layer_types"], list):
        out["layer_types"] = out["layer_types"][: shape.num_layers]
    return out


def nearest_multiples(value: int, base: int, upper: int | None = None) -> list[int]:
    """The multiples of ``base`` just below and above ``value`` (capped at ``upper``)."""
    lo = (value // base) * base
    cands = [c for c in (lo, lo + base) if c > 0 and (upper is None or c <= upper)]
    return sorted(set(cands))
