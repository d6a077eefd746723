"""The prune plan: target shape plus the kept indices on every axis, serialisable as JSON.

A plan is format-free: the same plan applies to an HF checkpoint and to a Megatron checkpoint
of the same model, and re-applying a saved plan gives a bit-identical result.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from megatron.prune.core.shape import ModelShape
from megatron.prune.errors import PruneError, json_type

PLAN_FILE = "prune_plan.json"
PLAN_VERSION = 1


@dataclass(frozen=True)
class LayerPlan:
    """What one kept layer keeps, in source numbering.

    ``heads`` lie inside ``query_groups`` with the same count in each kept group, so GQA stays valid. In a
    mixture-of-experts layer ``experts`` are the kept experts and ``expert_ffn[j]`` the kept FFN channels of
    ``experts[j]`` (as many in each, so the layer stays homogeneous); both are empty for a dense layer.
    """

    source_layer: int
    query_groups: tuple[int, ...]
    heads: tuple[int, ...]
    ffn: tuple[int, ...]
    experts: tuple[int, ...] = ()
    expert_ffn: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class PrunePlan:
    """Source shape, target shape, and which indices survive on each axis."""

    source: ModelShape
    target: ModelShape
    hidden: tuple[int, ...]
    layers: tuple[LayerPlan, ...]
    vocab: tuple[int, ...] | None = None  # kept token ids; None keeps the vocabulary as is
    norm_scale: float = 1.0  # multiplies every RMSNorm weight (rescaling for a smaller hidden size)
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)  # how it was chosen

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def keep_all(cls, shape: ModelShape) -> "PrunePlan":
        """The identity plan: applying it reproduces the source bit for bit."""
        hpg = shape.heads_per_group
        layers = tuple(
            LayerPlan(
                i,
                tuple(range(shape.num_query_groups)),
                tuple(range(shape.num_query_groups * hpg)),
                tuple(range(shape.ffn_hidden_size)),
                tuple(range(shape.num_experts)),
                (tuple(range(shape.moe_ffn_hidden_size)),) * shape.num_experts,
            )
            for i in range(shape.num_layers)
        )
        return cls(shape, shape, tuple(range(shape.hidden_size)), layers, info={"method": "keep-all"})

    # ---- checks -------------------------------------------------------------------------
    def validate(self) -> "PrunePlan":
        """Raise PruneError unless the indices agree with both shapes; return self."""
        s, t = self.source, self.target
        if t.head_dim != s.head_dim:
            raise PruneError(f"head_dim cannot change ({s.head_dim} -> {t.head_dim}): RoPE depends on it")
        _check_indices("hidden", self.hidden, s.hidden_size, t.hidden_size)
        if len(self.layers) != t.num_layers:
            raise PruneError(f"plan keeps {len(self.layers)} layers but target has {t.num_layers}")
        _check_indices("layers", [lp.source_layer for lp in self.layers], s.num_layers, t.num_layers)
        for lp in self.layers:
            where = f"layer {lp.source_layer}"
            _check_indices(f"{where} query_groups", lp.query_groups, s.num_query_groups, t.num_query_groups)
            _check_indices(f"{where} heads", lp.heads, s.num_attention_heads, t.num_attention_heads)
            _check_indices(f"{where} ffn", lp.ffn, s.ffn_hidden_size, t.ffn_hidden_size)
            per_group: dict[int, int] = {}
            for h in lp.heads:
                g = h // s.heads_per_group
                if g not in lp.query_groups:
                    raise PruneError(f"{where}: head {h} belongs to dropped query group {g}")
                per_group[g] = per_group.get(g, 0) + 1
            if set(per_group.values()) != {t.heads_per_group} or len(per_group) != len(lp.query_groups):
                raise PruneError(f"{where}: every kept query group must keep {t.heads_per_group} heads")
            _check_experts(where, lp, s, t)
        if self.vocab is not None:
            _check_indices("vocab", self.vocab, s.vocab_size, t.vocab_size)
        elif t.vocab_size != s.vocab_size:
            raise PruneError("target vocab_size differs from source but the plan has no kept vocab ids")
        return self

    def is_identity(self) -> bool:
        return self == PrunePlan.keep_all(self.source) and self.norm_scale == 1.0

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "hidden": list(self.hidden),
            "norm_scale": self.norm_scale,
            "vocab": None if self.vocab is None else list(self.vocab),
            "layers": [
                {
                    "source_layer": lp.source_layer,
                    "query_groups": list(lp.query_groups),
                    "heads": list(lp.heads),
                    "ffn": list(lp.ffn),
                    **({"experts": list(lp.experts), "expert_ffn": [list(f) for f in lp.expert_ffn]}
                       if lp.experts else {}),
                }
                for lp in self.layers
            ],
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, d: Any) -> "PrunePlan":
        """A plan read back from its JSON, refused (naming the field) unless every field has its type: a JSON object,
        whole-number indices (0.5 is not one), a positive ``norm_scale``."""
        if not isinstance(d, Mapping):
            raise PruneError(f"a plan is a JSON object with 'source', 'target', 'hidden' and 'layers'; this one is a "
                             f"JSON {json_type(d)}")
        if "version" not in d and "source" not in d:
            keys = ", ".join(map(repr, list(d)[:8])) or "none"
            raise PruneError(f"not a prune plan: a prune_plan.json has 'version', 'source', 'target', 'hidden' and "
                             f"'layers' (this object's keys: {keys})")
        if d.get("version") != PLAN_VERSION:
            raise PruneError(f"unsupported plan version {d.get('version')!r}; expected {PLAN_VERSION}")
        if d.get("info") is not None and not isinstance(d["info"], Mapping):
            raise PruneError(f"plan info: a JSON {json_type(d['info'])}, expected an object (how the plan was made)")
        layers = d["layers"]
        if not isinstance(layers, list) or not all(isinstance(lp, Mapping) for lp in layers):
            raise PruneError("plan layers: expected a list of objects (source_layer, query_groups, heads, ffn)")
        return cls(
            source=_shape("source", d["source"]),
            target=_shape("target", d["target"]),
            hidden=_indices("hidden", d["hidden"]),
            layers=tuple(
                LayerPlan(_index("source_layer", l["source_layer"]), _indices("query_groups", l["query_groups"]),
                          _indices("heads", l["heads"]), _indices("ffn", l["ffn"]),
                          _indices("experts", l.get("experts", [])), _expert_ffn(l.get("expert_ffn", [])))
                for l in layers
            ),
            vocab=None if d.get("vocab") is None else _indices("vocab", d["vocab"]),
            norm_scale=_norm_scale(d.get("norm_scale", 1.0)),
            info=dict(d.get("info") or {}),
        ).validate()

    def to_json(self) -> str:
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        return cls.from_dict(json.loads(text))

    def save(self, folder: Path) -> Path:
        path = Path(folder) / PLAN_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: Path) -> "PrunePlan":
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        try:
            return cls.from_json(path.read_text())
        except PruneError as e:
            raise PruneError(f"{path}: {e}") from None
        except KeyError as e:
            raise PruneError(f"plan {path}: no {e} field; is it a prune_plan.json?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise PruneError(f"cannot read plan {path}: {e}") from None


def _dumps(obj: Any, indent: str = "") -> str:
    """JSON with one key per line and every list of numbers on one line: readable and diffable, and written by
    json's C encoder (``indent=`` would put each of a 7B plan's 250k indices on a line of its own, in Python)."""
    if isinstance(obj, dict) and obj:
        inner = indent + " "
        items = (f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in obj.items())
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        inner = indent + " "
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in obj) + f"\n{indent}]"
    return json.dumps(obj)


def _index(name: str, value: Any) -> int:
    """A whole-number index of a plan read from JSON (``3.0`` and ``true`` are not)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PruneError(f"plan {name}: {value!r} is not a whole-number index")
    return value


def _indices(name: str, values: Any) -> tuple[int, ...]:
    """A list of whole-number indices of a plan read from JSON."""
    if not isinstance(values, list):
        raise PruneError(f"plan {name}: expected a list of indices, got {type(values).__name__}")
    return tuple(_index(name, v) for v in values)


def _expert_ffn(values: Any) -> tuple[tuple[int, ...], ...]:
    """The kept FFN channels of each kept expert of a plan read from JSON: a list of index lists."""
    if not isinstance(values, list):
        raise PruneError(f"plan expert_ffn: expected a list of index lists, got {type(values).__name__}")
    return tuple(_indices("expert_ffn", v) for v in values)


def _check_experts(where: str, lp: LayerPlan, s: ModelShape, t: ModelShape) -> None:
    """A layer's kept experts and their FFN channels against both shapes (none for a dense model), and the top-k."""
    _check_indices(f"{where} experts", lp.experts, s.num_experts, t.num_experts)
    if len(lp.expert_ffn) != len(lp.experts):
        raise PruneError(f"{where}: {len(lp.expert_ffn)} expert_ffn lists for {len(lp.experts)} kept experts")
    for e, ffn in zip(lp.experts, lp.expert_ffn):
        _check_indices(f"{where} expert {e} ffn", ffn, s.moe_ffn_hidden_size, t.moe_ffn_hidden_size)
    if t.is_moe and not 1 <= t.num_experts_per_tok <= t.num_experts:
        raise PruneError(f"plan target num_experts_per_tok {t.num_experts_per_tok}: must be 1..{t.num_experts} "
                         "(the kept experts)")


def _shape(name: str, d: Any) -> ModelShape:
    """A plan's source or target shape, every size a whole number, none negative."""
    if not isinstance(d, Mapping):
        raise PruneError(f"plan {name}: expected an object of model sizes")
    for f in dataclasses.fields(ModelShape):
        if f.name in d and f.type == "int" and _index(f"{name} {f.name}", d[f.name]) < 0:
            raise PruneError(f"plan {name} {f.name} {d[f.name]}: a size cannot be negative")
    return ModelShape.from_dict(d)


def shape_differences(a: ModelShape, b: ModelShape) -> str:
    """The fields where ``a`` and ``b`` differ, as ``name a vs b``: what a plan for another model gets wrong."""
    return ", ".join(f"{f.name} {getattr(a, f.name)} vs {getattr(b, f.name)}" for f in dataclasses.fields(ModelShape)
                     if getattr(a, f.name) != getattr(b, f.name))


def _norm_scale(value: Any) -> float:
    """The RMSNorm factor of a plan read from JSON: a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PruneError(f"plan norm_scale: {value!r} is not a positive number (1.0 leaves the norms as they are)")
    return float(value)


def _check_indices(name: str, idx: Sequence[int], source_n: int, target_n: int) -> None:
    if len(idx) != target_n:
        raise PruneError(f"plan {name}: keeps {len(idx)} indices but target size is {target_n}")
    if list(idx) != sorted(set(idx)):
        raise PruneError(f"plan {name}: indices must be strictly increasing")
    if idx and (idx[0] < 0 or idx[-1] >= source_n):
        raise PruneError(f"plan {name}: index out of range [0, {source_n})")


NORM_RESCALES = ("sqrt", "none")


def norm_rescale(plan: PrunePlan, mode: str = "sqrt") -> PrunePlan:
    """Rescale every RMSNorm weight by ``sqrt(h / h')`` when the hidden size shrinks (``mode='sqrt'``).

    RMSNorm divides by the RMS over the kept channels; the dropped ones carried little energy, so that RMS
    grows by about ``sqrt(h / h')`` and every normalised activation shrinks by the same factor. Scaling the
    norm weights back keeps the activations at their trained magnitude (measured in ``bench/quality.py``).
    """
    if mode not in NORM_RESCALES:
        raise PruneError(f"--norm-rescale {mode!r}; choose one of {', '.join(NORM_RESCALES)}")
    h, h2 = plan.source.hidden_size, plan.target.hidden_size
    scale = math.sqrt(h / h2) if mode == "sqrt" and h2 != h else 1.0
    info = {**plan.info, "norm_rescale": mode if h2 != h else "none (hidden kept)", "norm_scale": scale}
    return dataclasses.replace(plan, norm_scale=scale, info=info)
