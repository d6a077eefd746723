"""HF safetensors format adapter: maps HF parameter names to logical roles and streams tensors.

Reading goes tensor by tensor through ``safetensors.safe_open``; writing keeps at most one output
shard in memory. All slicing is delegated to :mod:`megatron.prune.slicing`.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from .direct_io import SequentialFile
from .io import atomic_output, check_output_path, copy_side_files
from .plan import PrunePlan
from .shape import ModelShape, PruneError, hf_config_for_shape, nearest_multiples, shape_from_hf_config
from .slicing import ROLE_AXES, layer_index, model_index, slice_role

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
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8"}
_DTYPE_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def hf_name(role: str, layer: int | None = None) -> str:
    return HF_NAMES[role].format(layer) if layer is not None else HF_NAMES[role]


def parse_hf_name(name: str) -> tuple[str, int | None]:
    """Inverse of :func:`hf_name`; raises KeyError for names outside the table."""
    for pat, role in _PATTERNS:
        m = pat.match(name)
        if m:
            return role, (int(m.group(1)) if m.groups() else None)
    raise KeyError(name)


def expected_roles(shape: ModelShape) -> Iterator[tuple[str, int | None]]:
    """Every (role, layer) a checkpoint of ``shape`` holds, in write order."""
    yield "embed", None
    layer_roles = ["input_norm", "q", "k", "v"]
    layer_roles += ["q_bias", "k_bias", "v_bias"] if shape.qkv_bias else []
    layer_roles += ["o", "post_norm", "gate", "up", "down"]
    for i in range(shape.num_layers):
        for r in layer_roles:
            yield r, i
    yield "final_norm", None
    if not shape.tied_embeddings:
        yield "lm_head", None


def role_shape(role: str, shape: ModelShape) -> tuple[int, ...]:
    """The tensor shape of ``role`` in a model of ``shape``."""
    size = {
        "hidden": shape.hidden_size,
        "heads": shape.num_attention_heads * shape.head_dim,
        "groups": shape.num_query_groups * shape.head_dim,
        "ffn": shape.ffn_hidden_size,
        "vocab": shape.vocab_size,
    }
    return tuple(size[a] for a in ROLE_AXES[role])


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Read and sanity-check a safetensors header; detects truncated or corrupt files without loading data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise PruneError(f"{path} is not a readable safetensors file ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise PruneError(f"{path} is truncated or corrupt: header promises {8 + n + end} bytes, file has {size}")
    return header


@dataclass
class HFCheckpoint:
    """An HF LLaMA-family checkpoint folder, opened lazily: implements the selectors' TensorSource."""

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
            headers = {s: _safetensors_header(folder / s) for s in shards}
            for name, s in weight_map.items():
                if name not in headers[s]:
                    raise PruneError(f"{folder / s} lacks tensor {name} that {WEIGHTS_INDEX} places there")
            return ({n: folder / s for n, s in weight_map.items()},
                    {n: headers[s][n]["dtype"] for n, s in weight_map.items()})
        single = folder / SINGLE_WEIGHTS
        if single.is_file():
            header = _safetensors_header(single)
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

    def _name(self, role: str, layer: int | None) -> str:
        name = hf_name(role, layer)
        if role == "lm_head" and name not in self.files and self.shape.tied_embeddings:
            return hf_name("embed")
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


def write_safetensors(path: Path, specs: list[tuple[str, str, tuple[int, ...]]],
                      tensors: Iterator[torch.Tensor]) -> None:
    """Write a safetensors file whose header (name, dtype code, shape) is known before the data.

    Tensors are streamed one at a time, so memory holds a single tensor, never a whole shard.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, code, shape in specs:
        n = _DTYPE_SIZES[code] * math.prod(shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
    with SequentialFile(path) as f:  # O_DIRECT where the filesystem allows: no page-cache copy
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, code, shape), t in zip(specs, tensors, strict=True):
            if tuple(t.shape) != tuple(shape) or _DTYPE_CODES.get(t.dtype) != code:
                raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, header promised {shape} {code}")
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


def write_pruned(ckpt: HFCheckpoint, plan: PrunePlan, out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 progress: bool = True) -> None:
    """Apply ``plan`` to ``ckpt`` and write an HF checkpoint into the (existing, empty) folder ``out``.

    ``ckpt`` may be any source with ``folder`` (side files), ``config``, ``shape``, ``get`` and ``dtype_code``:
    the Megatron adapter exports to HF through this same writer.
    """
    items = list(_out_tensors(plan))
    specs = [(name, ckpt.dtype_code(r, l), role_shape(r, plan.target)) for name, r, l, _ in items]
    sizes = [_DTYPE_SIZES[code] * math.prod(shape) for _, code, shape in specs]
    groups = _shard_groups(sizes, max_shard_bytes)
    names = ([SINGLE_WEIGHTS] if len(groups) == 1
             else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    bar = tqdm(total=len(items), desc="writing tensors", unit="tensor", disable=not progress)

    def produce(group: list[int]) -> Iterator[torch.Tensor]:
        for i in group:
            _, role, src_layer, new_layer = items[i]
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
    config = hf_config_for_shape(ckpt.config, plan.target)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_side_files(ckpt.folder, out, skip={"config.json", WEIGHTS_INDEX, "prune_plan.json"},
                    skip_suffixes=(".safetensors", ".bin", ".pt", ".pth", ".gguf"))
    plan.save(out)


def prune_hf(input_dir: Path, output_dir: Path, plan: PrunePlan, overwrite: bool = False,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Validate, then write the pruned checkpoint atomically (temp folder renamed into place)."""
    ckpt = HFCheckpoint.open(input_dir)
    if plan.source != ckpt.shape:
        raise PruneError(f"plan was made for {plan.source} but {input_dir} has {ckpt.shape}")
    plan.validate()
    check_hf_target(plan.target)
    check_output_path(input_dir, output_dir, overwrite)
    with atomic_output(output_dir, overwrite) as tmp:
        write_pruned(ckpt, plan, tmp, max_shard_bytes, progress)
    return Path(output_dir)
