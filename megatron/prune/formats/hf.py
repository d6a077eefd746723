"""HF safetensors format adapter: maps HF parameter names to logical roles and streams tensors.

Reading goes tensor by tensor through ``safetensors.safe_open``; writing keeps at most one tensor in memory
(:mod:`.safetensors`). All slicing is delegated to :mod:`megatron.prune.core.slicing`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from tqdm import tqdm

from megatron.prune.core.plan import PrunePlan
from megatron.prune.core.roles import expected_roles, role_shape, stored_role
from megatron.prune.core.shape import ModelShape, hf_config_for_shape, nearest_multiples, shape_from_hf_config
from megatron.prune.core.slicing import layer_index, model_index, slice_role
from megatron.prune.errors import PruneError
from megatron.prune.formats.safetensors import DTYPE_CODES, DTYPE_SIZES, read_header, write_safetensors
from megatron.prune.formats.source import (DEFAULT_MAX_SHARD_BYTES, FormatAdapter, TensorOverrides, TensorSource,
                                           WriteOptions)
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
    "o": "model.layers.{}.self_attn.o_proj.weight",
    "gate": "model.layers.{}.mlp.gate_proj.weight",
    "up": "model.layers.{}.mlp.up_proj.weight",
    "down": "model.layers.{}.mlp.down_proj.weight",
}


_PATTERNS = [(re.compile("^" + re.escape(t).replace(r"\{\}", r"(\d+)") + "$"), r) for r, t in HF_NAMES.items()]


IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # buffers some old exports carry; recomputed by the model


WEIGHTS_INDEX = "model.safetensors.index.json"


SINGLE_WEIGHTS = "model.safetensors"


def hf_name(role: str, layer: int | None = None) -> str:
    return HF_NAMES[role].format(layer) if layer is not None else HF_NAMES[role]


def parse_hf_name(name: str) -> tuple[str, int | None]:
    """Inverse of :func:`hf_name`; raises KeyError for names outside the table."""
    for pat, role in _PATTERNS:
        m = pat.match(name)
        if m:
            return role, (int(m.group(1)) if m.groups() else None)
    raise KeyError(name)


@dataclass
class HFCheckpoint:
    """An HF LLaMA-family checkpoint folder, opened lazily: a TensorSource."""

    folder: Path
    config: dict[str, Any]
    shape: ModelShape
    files: dict[str, Path]  # tensor name -> file
    dtypes: dict[str, str]  # tensor name -> safetensors dtype code ("F32", "BF16", ...)

    @classmethod
    def open(cls, folder: Path | str) -> "HFCheckpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise PruneError(f"input {folder} is not a folder")
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise PruneError(f"input {folder} has no config.json; is it an HF checkpoint folder?")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise PruneError(f"{cfg_path} is not valid JSON ({e})") from e
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
        unknown = []
        for name in self.files:
            try:
                parse_hf_name(name)
            except KeyError:
                if not IGNORED.match(name):
                    unknown.append(name)
        if unknown:
            raise PruneError(f"{self.folder}: unknown tensor name(s) {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''} for {self.config.get('architectures')}")
        missing = [hf_name(r, l) for r, l in expected_roles(self.shape) if hf_name(r, l) not in self.files]
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
    def dtype(self) -> torch.dtype:
        """The dtype of the final norm weight (read from the header): what a Megatron conversion's args record."""
        return {code: dtype for dtype, code in DTYPE_CODES.items()}[self.dtype_code("final_norm")]

    def release(self) -> None:
        """Nothing is held open between reads."""

    def _name(self, role: str, layer: int | None) -> str:
        name = hf_name(role, layer)
        if name not in self.files and stored_role(role, self.shape) != role:
            return hf_name(stored_role(role, self.shape), layer)
        return name

    def dtype_code(self, role: str, layer: int | None = None) -> str:
        """safetensors dtype code ("F32", "BF16", ...) of a tensor, read from the header, not the data."""
        return self.dtypes[self._name(role, layer)]

    # TensorSource
    def has(self, role: str, layer: int | None = None) -> bool:
        return hf_name(role, layer) in self.files

    def get(self, role: str, layer: int | None = None) -> torch.Tensor:
        name = self._name(role, layer)
        with safe_open(self.files[name], framework="pt") as f:
            t = f.get_tensor(name)
        want = role_shape(role, self.shape)
        if tuple(t.shape) != want:
            raise PruneError(f"{name} has shape {tuple(t.shape)}, config implies {want}")
        return t


def check_hf_target(target: ModelShape) -> None:
    """transformers refuses hidden_size not divisible by num_attention_heads, even with explicit head_dim."""
    if target.hidden_size % target.num_attention_heads:
        raise PruneError(
            f"--hidden-size {target.hidden_size} is not a multiple of {target.num_attention_heads} attention heads, "
            f"which transformers requires of an HF checkpoint; nearest valid hidden sizes: "
            f"{nearest_multiples(target.hidden_size, target.num_attention_heads, target.hidden_size + target.num_attention_heads)}"
            f" (Megatron outputs have no such limit)"
        )


def _out_tensors(plan: PrunePlan) -> Iterator[tuple[str, str, int | None, int | None]]:
    """(output name, role, source layer, output shape) for every tensor of the pruned model, in order."""
    for role, new_layer in expected_roles(plan.target):
        src_layer = None if new_layer is None else plan.layers[new_layer].source_layer
        yield hf_name(role, new_layer), role, src_layer, new_layer


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
    items = list(_out_tensors(plan))
    specs = [(name, ckpt.dtype_code(r, l), role_shape(r, plan.target)) for name, r, l, _ in items]
    sizes = [DTYPE_SIZES[code] * math.prod(shape) for _, code, shape in specs]
    groups = _shard_groups(sizes, max_shard_bytes)
    names = ([SINGLE_WEIGHTS] if len(groups) == 1
             else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    bar = tqdm(total=len(items), desc="writing tensors", unit="tensor", disable=not progress)

    def produce(group: list[int]) -> Iterator[torch.Tensor]:
        for i in group:
            _, role, src_layer, new_layer = items[i]
            if overrides is not None and overrides.has(role, new_layer):
                yield overrides.get(role, new_layer)
            else:
                index = model_index(plan) if new_layer is None else layer_index(plan, plan.layers[new_layer])
                yield slice_role(role, ckpt.get(role, src_layer), index, ckpt.shape.head_dim, plan.norm_scale)
            bar.update()

    for fname, group in zip(names, groups):
        write_safetensors(out / fname, [specs[i] for i in group], produce(group))
    bar.close()
    weight_map = {items[i][0]: fname for fname, group in zip(names, groups) for i in group}
    if len(groups) > 1:
        total = sum(sizes)
        (out / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
    config = hf_config_for_shape(ckpt.hf_config if hf_config is None else hf_config, plan.target)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_side_files(ckpt.folder if side_files is None else side_files, out, skip={"config.json", WEIGHTS_INDEX, "prune_plan.json"},
                    skip_suffixes=(".safetensors", ".bin", ".pt", ".pth", ".gguf"))
    plan.save(out)


def apply_plan(input_dir: Path, output_dir: Path, plan: PrunePlan, overwrite: bool = False,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
               overrides: TensorOverrides | None = None) -> Path:
    """Validate, then write ``plan`` applied to the HF checkpoint ``input_dir`` atomically (temp folder renamed
    into place)."""
    ckpt = HFCheckpoint.open(input_dir)
    if plan.source != ckpt.shape:
        raise PruneError(f"plan was made for {plan.source} but {input_dir} has {ckpt.shape}")
    plan.validate()
    check_hf_target(plan.target)
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
        check_hf_target(target)

    return FormatAdapter("hf", HFCheckpoint.open, check_target, write)
