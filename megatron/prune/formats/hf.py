"""HF safetensors format adapter: maps HF parameter names to logical roles and streams tensors.

Reading goes tensor by tensor through ``safetensors.safe_open``; writing keeps at most one tensor in memory
(:mod:`.safetensors`). All slicing is delegated to :mod:`megatron.prune.core.slicing`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from tqdm import tqdm

from megatron.prune.core.plan import PrunePlan, shape_differences
from megatron.prune.core.roles import expected_tensors, role_shape, stored_role
from megatron.prune.core.shape import (ModelShape, family_of, hf_config_for_shape, nearest_multiples,
                                      read_hf_config, shape_from_hf_config)
from megatron.prune.core.slicing import layer_index, model_index, slice_role
from megatron.prune.errors import PruneError
from megatron.prune.formats.safetensors import DTYPE_CODES, DTYPE_SIZES, read_header, write_safetensors
from megatron.prune.formats.source import (DEFAULT_MAX_SHARD_BYTES, FormatAdapter, TensorOverrides, TensorSource,
                                           WriteOptions, check_finite)
from megatron.prune.io.atomic import atomic_output, check_output_path, copy_side_files

# One name table, used in both directions: logical role -> HF name ("{}" is the layer number).
HF_NAMES: dict[str, str] = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "input_norm": "model.layers.{}.input_layernorm.weight",
    "post_norm": "model.layers.{}.post_attention_layernorm.weight",
    "q": "model.layers.{}.self_attn.q_proj.weight",
    "k": "model.layers.{}.self_attn.k_proj.weight",
    "v": "model.layers.{}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{}.self_attn.k_norm.weight",
    "o": "model.layers.{}.self_attn.o_proj.weight",
    "gate": "model.layers.{}.mlp.gate_proj.weight",
    "up": "model.layers.{}.mlp.up_proj.weight",
    "down": "model.layers.{}.mlp.down_proj.weight",
}


# The mixture-of-experts roles of each MoE family, as transformers saves them (one tensor per expert: "{}" the layer,
# then the expert; transformers 5 fuses them into [E, 2F, h] and [E, h, F] only in memory).
HF_MOE_NAMES: dict[str, dict[str, str]] = {
    "Qwen3MoeForCausalLM": {
        "router": "model.layers.{}.mlp.gate.weight",
        "expert_gate": "model.layers.{}.mlp.experts.{}.gate_proj.weight",
        "expert_up": "model.layers.{}.mlp.experts.{}.up_proj.weight",
        "expert_down": "model.layers.{}.mlp.experts.{}.down_proj.weight",
    },
    "MixtralForCausalLM": {
        "router": "model.layers.{}.block_sparse_moe.gate.weight",
        "expert_gate": "model.layers.{}.block_sparse_moe.experts.{}.w1.weight",
        "expert_up": "model.layers.{}.block_sparse_moe.experts.{}.w3.weight",
        "expert_down": "model.layers.{}.block_sparse_moe.experts.{}.w2.weight",
    },
}


def hf_names(config: Mapping[str, Any]) -> dict[str, str]:
    """The name table of the family of ``config``: the shared names plus its expert names (if it has experts)."""
    return {**HF_NAMES, **HF_MOE_NAMES.get(family_of(config).architecture, {})}


def _patterns(names: Mapping[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(t).replace(r"\{\}", r"(\d+)") + "$"), r) for r, t in names.items()]


_PATTERNS = _patterns(HF_NAMES)


# transformers 5 holds a MoE layer in memory as mlp.gate (Mixtral's block_sparse_moe renamed) and fused experts:
# gate_up_proj [E, 2F, h] (each expert's gate rows, then its up rows) and down_proj [E, h, F]
MEMORY_MOE: dict[str, tuple[str, ...]] = {
    "model.layers.{}.mlp.gate.weight": ("router",),
    "model.layers.{}.mlp.experts.gate_up_proj": ("expert_gate", "expert_up"),
    "model.layers.{}.mlp.experts.down_proj": ("expert_down",),
}


_MEMORY_MOE = [(pat, MEMORY_MOE[template]) for (pat, template) in _patterns({t: t for t in MEMORY_MOE})]


IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # buffers some old exports carry; recomputed by the model


WEIGHTS_INDEX = "model.safetensors.index.json"


DTYPE_OF_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)  # float16 with bfloat16: float32


SINGLE_WEIGHTS = "model.safetensors"


def hf_name(role: str, layer: int | None = None, expert: int | None = None, names: Mapping[str, str] = HF_NAMES) -> str:
    """The HF name of a role (of a layer, of an expert) in the name table ``names``."""
    return names[role].format(*(i for i in (layer, expert) if i is not None))


def parse_hf_name(name: str) -> tuple[str, int | None]:
    """Inverse of :func:`hf_name` for the shared names; raises KeyError for names outside the table."""
    role, layer, _ = parse_hf_key(name)
    return role, layer


def parse_hf_key(name: str, patterns: list[tuple[re.Pattern, str]] = _PATTERNS) -> tuple[str, int | None, int | None]:
    """(role, layer, expert) of an HF name; raises KeyError for names outside the table of ``patterns``."""
    for pat, role in patterns:
        m = pat.match(name)
        if m:
            ids = [int(g) for g in m.groups()] + [None, None]
            return role, ids[0], ids[1]
    raise KeyError(name)


def memory_tensor(src: TensorSource, name: str) -> torch.Tensor:
    """The value of the parameter ``name`` of a transformers model, read from ``src`` (experts fused as transformers 5
    holds them in memory)."""
    for pat, roles in _MEMORY_MOE:
        m = pat.match(name)
        if m and roles == ("router",):
            return src.get("router", int(m.group(1)))
        if m:
            layer = int(m.group(1))
            return torch.stack([torch.cat([src.get(r, layer, e) for r in roles]) for e in range(src.shape.num_experts)])
    return src.get(*parse_hf_name(name))


@dataclass
class HFCheckpoint:
    """An HF LLaMA-family checkpoint folder, opened lazily: a TensorSource."""

    folder: Path
    config: dict[str, Any]
    shape: ModelShape
    files: dict[str, Path]  # tensor name -> file
    dtypes: dict[str, str]  # tensor name -> safetensors dtype code ("F32", "BF16", ...)
    cast: torch.dtype | None = None  # every tensor read in this dtype (see :meth:`in_one_dtype`)

    @property
    def names(self) -> dict[str, str]:
        """This family's name table."""
        return hf_names(self.config)

    @classmethod
    def open(cls, folder: Path | str) -> "HFCheckpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise PruneError(f"input {folder} is not a folder")
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise PruneError(f"input {folder} has no config.json; is it an HF checkpoint folder?")
        config = read_hf_config(cfg_path)
        shape = shape_from_hf_config(config)
        files, dtypes = cls._tensor_files(folder)
        ckpt = cls(folder, config, shape, files, dtypes)
        ckpt._check_names()
        return ckpt

    @staticmethod
    def _tensor_files(folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
        index = folder / WEIGHTS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise PruneError(f"{folder}: shard(s) listed in {WEIGHTS_INDEX} are missing: {', '.join(missing)}")
            headers = {s: read_header(folder / s) for s in shards}
            for name, s in weight_map.items():
                if name not in headers[s]:
                    raise PruneError(f"{folder / s} lacks tensor {name} that {WEIGHTS_INDEX} places there")
            return ({n: folder / s for n, s in weight_map.items()},
                    {n: headers[s][n]["dtype"] for n, s in weight_map.items()})
        single = folder / SINGLE_WEIGHTS
        if single.is_file():
            header = read_header(single)
            header.pop("__metadata__", None)
            return {n: single for n in header}, {n: v["dtype"] for n, v in header.items()}
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(others)}: convert them to safetensors first)" if others else ""
        raise PruneError(f"input {folder} has no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}{hint}")

    def _check_names(self) -> None:
        names = self.names
        patterns = _patterns(names)
        unknown, beyond = [], []
        for name in self.files:
            try:
                _, layer, expert = parse_hf_key(name, patterns)
            except KeyError:
                if not IGNORED.match(name):
                    unknown.append(name)
                continue
            if (layer is not None and layer >= self.shape.num_layers) or (
                    expert is not None and expert >= self.shape.num_experts):
                beyond.append(name)  # weights the config does not count: they would be dropped without a word
        if unknown:
            raise PruneError(f"{self.folder}: unknown tensor name(s) {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''} for {self.config.get('architectures')}")
        if beyond:
            raise PruneError(f"{self.folder}: tensor(s) beyond config.json's {self.shape.num_layers} layers"
                             f"{f' and {self.shape.num_experts} experts' if self.shape.is_moe else ''}: "
                             f"{sorted(beyond)[:3]}{' ...' if len(beyond) > 3 else ''}; fix the config "
                             "(num_hidden_layers, the expert count) to the weights")
        missing = [n for n in (hf_name(r, l, e, names) for r, l, e in expected_tensors(self.shape))
                   if n not in self.files]
        if missing:
            raise PruneError(f"{self.folder}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    @property
    def hf_config(self) -> dict[str, Any]:
        return self.config

    @property
    def tp(self) -> int:
        """HF checkpoints are not tensor-parallel."""
        return 1

    @property
    def ep(self) -> int:
        """Nor expert-parallel."""
        return 1

    @property
    def dtype(self) -> torch.dtype:
        """The dtype a Megatron conversion holds every tensor in (its args record one): the float dtype of the weights,
        or one that holds each of them exactly where they mix (float32 for float32/float16/bfloat16)."""
        if self.cast is not None:
            return self.cast
        floats = {DTYPE_OF_CODE.get(c) for n, c in self.dtypes.items() if not IGNORED.match(n)} & set(FLOAT_DTYPES)
        if len(floats) == 1:
            return floats.pop()
        if torch.float64 in floats:
            return torch.float64
        return torch.float32 if floats else DTYPE_OF_CODE[self.dtypes[self._name("final_norm", None)]]

    def in_one_dtype(self) -> "HFCheckpoint":
        """This checkpoint read in one dtype (:attr:`dtype`), as a Megatron checkpoint holds it (saying so where the
        tensors mix dtypes)."""
        codes = sorted({c for n, c in self.dtypes.items() if not IGNORED.match(n)})
        if len(codes) > 1:
            print(f"note: {self.folder} mixes {', '.join(codes)} tensors; a Megatron checkpoint holds one dtype: "
                  f"writing all in {str(self.dtype).removeprefix('torch.')}")
        return dataclasses.replace(self, cast=self.dtype)

    def release(self) -> None:
        """Nothing is held open between reads."""

    def _name(self, role: str, layer: int | None, expert: int | None = None) -> str:
        name = hf_name(role, layer, expert, self.names)
        if name not in self.files and stored_role(role, self.shape) != role:
            return hf_name(stored_role(role, self.shape), layer)
        return name

    def dtype_code(self, role: str, layer: int | None = None, expert: int | None = None) -> str:
        """safetensors dtype code ("F32", "BF16", ...) of a tensor, read from the header, not the data."""
        return DTYPE_CODES[self.cast] if self.cast is not None else self.dtypes[self._name(role, layer, expert)]

    # TensorSource
    def has(self, role: str, layer: int | None = None, expert: int | None = None) -> bool:
        return role in self.names and hf_name(role, layer, expert, self.names) in self.files

    def get(self, role: str, layer: int | None = None, expert: int | None = None) -> torch.Tensor:
        name = self._name(role, layer, expert)
        with safe_open(self.files[name], framework="pt") as f:
            t = f.get_tensor(name)
        want = role_shape(role, self.shape)
        if tuple(t.shape) != want:
            raise PruneError(f"{name} has shape {tuple(t.shape)}, config implies {want}")
        check_finite(t, f"{self.files[name]}: {name}")
        return t if self.cast is None else t.to(self.cast)


def check_hf_target(target: ModelShape, config: Mapping[str, Any]) -> None:
    """Refuse what transformers cannot build for the family of ``config``: some families' configs (LLaMA) refuse
    a hidden_size not divisible by num_attention_heads, even with an explicit head_dim."""
    family = family_of(config)
    h, heads = target.hidden_size, target.num_attention_heads
    if family.hidden_multiple_of_heads and h % heads:
        raise PruneError(
            f"--hidden-size {h} is not a multiple of {heads} attention heads, which transformers requires of an HF "
            f"{family.architecture} checkpoint; nearest valid hidden sizes: {nearest_multiples(h, heads, h + heads)}"
            f" (Megatron outputs have no such limit)"
        )


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the pruned model: its output name and role, where it comes from and where it goes."""

    name: str
    role: str
    src_layer: int | None
    new_layer: int | None
    src_expert: int | None = None
    new_expert: int | None = None  # position among the layer's kept experts


def _out_tensors(plan: PrunePlan, names: Mapping[str, str] = HF_NAMES) -> Iterator[OutTensor]:
    """Every tensor of the pruned model, in order."""
    for role, new_layer, new_expert in expected_tensors(plan.target):
        lp = None if new_layer is None else plan.layers[new_layer]
        src_expert = None if new_expert is None else lp.experts[new_expert]
        yield OutTensor(hf_name(role, new_layer, new_expert, names), role, None if lp is None else lp.source_layer,
                        new_layer, src_expert, new_expert)


def _expert(expert: int | None) -> tuple[int, ...]:
    """The expert argument of a TensorSource read: none for tensors that are not per expert (sources without experts
    take no such argument)."""
    return () if expert is None else (expert,)


def _shard_groups(sizes: list[int], max_bytes: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(sizes):
        if groups[-1] and total + n > max_bytes:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def write_pruned(ckpt: TensorSource, plan: PrunePlan, out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 progress: bool = True, hf_config: Mapping[str, Any] | None = None,
                 side_files: Path | None = None, overrides: TensorOverrides | None = None) -> None:
    """Apply ``plan`` to ``ckpt`` and write an HF checkpoint into the (existing, empty) folder ``out``.

    ``ckpt`` may be any TensorSource: the Megatron adapter exports to HF through this same writer, giving the HF
    config (``hf_config``, default the source's) and the folder of tokenizer and other side files (``side_files``,
    default the source's folder). ``overrides`` replace the plan's slices of some tensors (refitted weights).
    """
    items = list(_out_tensors(plan, hf_names(ckpt.hf_config if hf_config is None else hf_config)))
    specs = [(o.name, ckpt.dtype_code(o.role, o.src_layer, *_expert(o.src_expert)), role_shape(o.role, plan.target))
             for o in items]
    sizes = [DTYPE_SIZES[code] * math.prod(shape) for _, code, shape in specs]
    groups = _shard_groups(sizes, max_shard_bytes)
    names = ([SINGLE_WEIGHTS] if len(groups) == 1
             else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    bar = tqdm(total=len(items), desc="writing tensors", unit="tensor", disable=not progress)

    def produce(group: list[int]) -> Iterator[torch.Tensor]:
        for i in group:
            o = items[i]
            if overrides is not None and overrides.has(o.role, o.new_layer, o.new_expert):
                yield overrides.get(o.role, o.new_layer, o.new_expert)
            else:
                index = (model_index(plan) if o.new_layer is None
                         else layer_index(plan, plan.layers[o.new_layer], o.new_expert))
                t = ckpt.get(o.role, o.src_layer, *_expert(o.src_expert))
                yield slice_role(o.role, t, index, ckpt.shape.head_dim, plan.norm_scale)
            bar.update()

    for fname, group in zip(names, groups):
        write_safetensors(out / fname, [specs[i] for i in group], produce(group))
    bar.close()
    weight_map = {items[i].name: fname for fname, group in zip(names, groups) for i in group}
    if len(groups) > 1:
        total = sum(sizes)
        (out / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
    config = hf_config_for_shape(ckpt.hf_config if hf_config is None else hf_config, plan.target)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_side_files(ckpt.folder if side_files is None else side_files, out,
                    skip={"config.json", WEIGHTS_INDEX, "prune_plan.json"},
                    skip_suffixes=(".safetensors", ".bin", ".pt", ".pth", ".gguf"))
    plan.save(out)


def apply_plan(input_dir: Path, output_dir: Path, plan: PrunePlan, overwrite: bool = False,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
               overrides: TensorOverrides | None = None) -> Path:
    """Validate, then write ``plan`` applied to the HF checkpoint ``input_dir`` atomically (temp folder renamed
    into place)."""
    ckpt = HFCheckpoint.open(input_dir)
    if plan.source != ckpt.shape:
        raise PruneError(f"plan was made for another model than {input_dir}: "
                         f"{shape_differences(plan.source, ckpt.shape)} (the plan's source vs the input)")
    plan.validate()
    check_hf_target(plan.target, ckpt.config)
    check_output_path(input_dir, output_dir, overwrite)
    with atomic_output(output_dir, overwrite) as tmp:
        write_pruned(ckpt, plan, tmp, max_shard_bytes, progress, overrides=overrides)
    return Path(output_dir)


def format_adapter() -> FormatAdapter:
    """The ``hf`` entry of :data:`megatron.prune.formats.ADAPTERS`."""

    def write(src: HFCheckpoint, plan: PrunePlan, output: Path, options: WriteOptions,
              overrides: TensorOverrides | None = None) -> Path:
        return apply_plan(src.folder, output, plan, options.overwrite, options.max_shard_bytes, options.progress,
                          overrides)

    def check_target(src: HFCheckpoint, target: ModelShape, options: WriteOptions) -> None:
        check_hf_target(target, src.config)

    return FormatAdapter("hf", HFCheckpoint.open, check_target, write)
