"""Model shapes: the handful of numbers that define a LLaMA-family transformer.

A :class:`ModelShape` is read from an HF ``config.json`` through one registry keyed on
``architectures`` and written back into one; pruning only ever changes its numbers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from megatron.prune.errors import PruneError, json_type


@dataclass(frozen=True)
class MoeKeys:
    """Where an HF config of a mixture-of-experts family keeps its expert sizes (every layer sparse, no shared
    expert)."""

    experts: tuple[str, ...]  # expert count; the first present is read, every present one written (aliases)
    expert_ffn: str  # width of one expert's FFN
    top_k: str = "num_experts_per_tok"
    # keys that mix dense layers in (Qwen3-MoE): refused unless they say "every layer sparse"
    dense_layers: str | None = None  # a list of dense layer numbers; sparse everywhere when empty
    sparse_step: str | None = None  # every n-th layer sparse; sparse everywhere when 1


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
    moe: MoeKeys | None = None  # a mixture of experts in every layer instead of the dense FFN (Qwen3-MoE, Mixtral)

    def fits(self, shape: "ModelShape") -> bool:
        """Whether a model of ``shape`` has this family's layers (what a checkpoint without an HF config shows)."""
        return ((self.qkv_bias, self.qk_norm, self.moe is not None)
                == (shape.qkv_bias, shape.qk_norm, shape.num_experts > 0))


FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family("LlamaForCausalLM", "llama", qkv_bias=False, hidden_multiple_of_heads=True),
        Family("MistralForCausalLM", "mistral", qkv_bias=False),
        Family("Qwen2ForCausalLM", "qwen2", qkv_bias=True),
        Family("Qwen3ForCausalLM", "qwen3", qkv_bias=False, qk_norm=True),
        # transformers 5 saves Qwen3-MoE's expert count as num_local_experts; hub configs say num_experts
        Family("Qwen3MoeForCausalLM", "qwen3_moe", qkv_bias=False, qk_norm=True,
               moe=MoeKeys(("num_experts", "num_local_experts"), "moe_intermediate_size",
                           dense_layers="mlp_only_layers", sparse_step="decoder_sparse_step")),
        Family("MixtralForCausalLM", "mixtral", qkv_bias=False,
               moe=MoeKeys(("num_local_experts",), "intermediate_size")),
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
    # mixture of experts in every layer (0 experts: a dense model, whose FFN is ffn_hidden_size wide; a MoE model
    # has no dense FFN, ffn_hidden_size 0)
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0  # FFN width of each expert
    num_experts_per_tok: int = 0  # top-k of the router

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

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
        # the router [E, h] and each expert's gate, up [F, h] and down [h, F]
        mlp = 3 * h * self.ffn_hidden_size + self.num_experts * (h + 3 * h * self.moe_ffn_hidden_size)
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return emb + h + self.num_layers * per_layer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelShape":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# The sizes tensor parallelism splits (KV groups, query heads, FFN channels, each expert's FFN channels), in the order
# errors name them.
TP_SPLIT_SIZES = ("num_query_groups", "num_attention_heads", "ffn_hidden_size", "moe_ffn_hidden_size")


def not_divisible(shape: ModelShape, n: int, sizes: tuple[str, ...] = TP_SPLIT_SIZES) -> list[tuple[str, int]]:
    """(name, size) of each of ``sizes`` of ``shape`` that ``n`` does not divide, in order."""
    return [(name, getattr(shape, name)) for name in sizes if getattr(shape, name) % n]


def family_of(config: Mapping[str, Any]) -> Family:
    """The registered family of an HF config, or a PruneError naming what is supported."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise PruneError(f"config.json 'architectures': {json.dumps(archs)} is not a list; write it as "
                         f"[{json.dumps(archs)}]")
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
    raise PruneError(f"no supported architecture has q/k/v bias={shape.qkv_bias}, QK-norm={shape.qk_norm} and "
                     f"{shape.num_experts} experts; "
                     f"supported: {', '.join(sorted(FAMILIES))}")


def config_size(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """The whole number >= 1 at ``key`` of an HF config (``default`` where it is absent or null and one is given);
    anything else refused by name (a JSON string, null, a fraction, 0)."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if key not in config:
        raise PruneError(f"config.json has no {key!r}: is it a LLaMA-family model's config?")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PruneError(f"config.json {key!r}: {json.dumps(value)} is not a whole number >= 1")
    return value


def read_hf_config(path: Path) -> dict[str, Any]:
    """An HF ``config.json`` (an HF folder's or a Megatron checkpoint's ``hf_meta/``) as a dict; a file that is not a
    JSON object is refused by name."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PruneError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PruneError(f"{path} holds a JSON {json_type(config)}, not an HF config object")
    return config


def check_config_numbers(config: Mapping[str, Any]) -> None:
    """The numbers of an HF config that are not sizes but reach the model (RoPE base, norm epsilon, positions): each
    refused by name unless it is a positive number, so no conversion copies a damaged one into its output."""
    rope = config.get("rope_theta")
    if rope is None and isinstance(config.get("rope_parameters"), Mapping):
        rope = config["rope_parameters"].get("rope_theta")
    for key, value in (("rope_theta", rope), ("rms_norm_eps", config.get("rms_norm_eps"))):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or value == float("inf")):
            raise PruneError(f"config.json {key!r}: {json.dumps(value)} is not a positive number")
    if config.get("max_position_embeddings") is not None:
        config_size(config, "max_position_embeddings")


def shape_from_hf_config(config: Mapping[str, Any]) -> ModelShape:
    """Read a :class:`ModelShape` from an HF config dict (each size checked: :func:`config_size`, the other numbers:
    :func:`check_config_numbers`)."""
    family = family_of(config)
    check_config_numbers(config)
    moe = moe_sizes(family, config)
    heads = config_size(config, "num_attention_heads")
    hidden = config_size(config, "hidden_size")
    head_dim = config_size(config, "head_dim", hidden // heads or 1)
    return ModelShape(
        num_layers=config_size(config, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=config_size(config, "num_key_value_heads", heads),
        head_dim=head_dim,
        ffn_hidden_size=0 if moe else config_size(config, "intermediate_size"),
        vocab_size=config_size(config, "vocab_size"),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias or bool(config.get("attention_bias", False)),
        qk_norm=family.qk_norm,
        **moe,
    )


def moe_sizes(family: Family, config: Mapping[str, Any]) -> dict[str, int]:
    """The expert sizes of a MoE family's config (empty for a dense family); configs that mix dense layers in are
    refused, since a plan treats every layer alike."""
    keys = family.moe
    if keys is None:
        return {}
    arch = family.architecture
    dense = config.get(keys.dense_layers) if keys.dense_layers else None
    step = config.get(keys.sparse_step, 1) if keys.sparse_step else 1
    if dense or step != 1:
        raise PruneError(f"{arch} with dense layers mixed in ({keys.dense_layers} {dense or []}, {keys.sparse_step} "
                         f"{step}) is not supported: every layer must be a mixture of experts ({keys.dense_layers} "
                         f"[], {keys.sparse_step} 1)")
    count = next((config[k] for k in keys.experts if config.get(k) is not None), None)
    if not count or count < 1:
        raise PruneError(f"{arch} config has no expert count ({' or '.join(keys.experts)} = {count!r}); "
                         "a model without experts is not a mixture of experts")
    return dict(num_experts=int(count), moe_ffn_hidden_size=config_size(config, keys.expert_ffn),
                num_experts_per_tok=config_size(config, keys.top_k))


# transformers 5 runs experts with torch's grouped_mm by default, which refuses expert weights whose rows are not a
# multiple of 16 bytes ("strides should be multiple of 16 bytes"): 8 channels in bf16/fp16, 4 in float32. A config
# with this key set to "eager" runs them one by one instead (transformers reads it from config.json).
EXPERTS_IMPLEMENTATION = "experts_implementation"
GROUPED_MM_MULTIPLE = 8


def grouped_mm_aligned(shape: ModelShape) -> bool:
    """Whether transformers' grouped_mm experts take a MoE model of ``shape`` in any 16- or 32-bit dtype."""
    return not (shape.moe_ffn_hidden_size % GROUPED_MM_MULTIPLE or shape.hidden_size % GROUPED_MM_MULTIPLE)


def hf_config_for_shape(config: Mapping[str, Any], shape: ModelShape) -> dict[str, Any]:
    """A copy of ``config`` rewritten for ``shape`` (explicit ``head_dim`` included)."""
    out = dict(config)
    out.update(
        num_hidden_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_query_groups,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tied_embeddings,
    )
    keys = family_of(config).moe
    if keys is None:
        out["intermediate_size"] = shape.ffn_hidden_size
    else:  # a MoE config's dense intermediate_size (Qwen3-MoE) describes no layer: left as it is
        for k in [k for k in keys.experts if k in out] or [keys.experts[0]]:
            out[k] = shape.num_experts
        out[keys.expert_ffn] = shape.moe_ffn_hidden_size
        out[keys.top_k] = shape.num_experts_per_tok
        if not grouped_mm_aligned(shape):
            out[EXPERTS_IMPLEMENTATION] = "eager"
    if "layer_types" in out and isinstance(out["layer_types"], list):
        out["layer_types"] = out["layer_types"][: shape.num_layers]
    return out


def nearest_multiples(value: int, base: int, upper: int | None = None) -> list[int]:
    """The multiples of ``base`` just below and above ``value`` (capped at ``upper``)."""
    lo = (value // base) * base
    cands = [c for c in (lo, lo + base) if c > 0 and (upper is None or c <= upper)]
    return sorted(set(cands))
