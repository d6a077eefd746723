"""Helpers shared by the tests: compare checkpoints tensor by tensor, hash folders, run the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tree_hash(folder: Path) -> str:
    """Hash of every file's name and bytes under ``folder``: proves an input was left untouched."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Per-tensor torch.equal over identical key sets; refuses to compare an object with itself."""
    assert a is not b, "comparing a state dict with itself proves nothing"
    assert sorted(a) == sorted(b)
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
            continue
        assert a[k] is not b[k], k
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder``, by stored name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The logical tensors of an HF checkpoint, keyed ``role.layer`` (``role.layer.expert`` for an expert's)."""
    from megatron.prune.core.roles import expected_tensors
    from megatron.prune.formats.hf import HFCheckpoint

    ckpt = HFCheckpoint.open(folder)
    return {f"{r}.{l}" if e is None else f"{r}.{l}.{e}": ckpt.get(r, l, *(() if e is None else (e,)))
            for r, l, e in expected_tensors(ckpt.shape)}


def calib_loss(folder: Path) -> float:
    """Next-token loss of the HF model in ``folder`` on the refit's calibration windows in the tests (the built-in
    text, 4 x 32, batches of 2)."""
    from transformers import AutoModelForCausalLM

    from megatron.prune.runtime import load_tokenizer, tokenize
    from megatron.prune.scoring.methods import calibration_windows
    from megatron.prune.text import builtin_text

    windows = calibration_windows(tokenize(load_tokenizer(folder), builtin_text("calib"), None), 4, 32)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return sum(float(model(input_ids=windows[i:i + 2], labels=windows[i:i + 2]).loss) for i in (0, 2)) / 2


def mg_shards(folder: Path) -> dict[str, object]:
    """Every entry of every shard of a torch-format Megatron checkpoint, keyed ``(tp, pp):name``."""
    from megatron.prune.formats.mcore import ops

    return {f"{k}:{name}": v for k, sd in ops.iter_state_dicts(folder) for name, v in sd["model"].items()}


def prune_cli(src: Path, out: Path, *flags: str) -> int:
    """``megatron-prune prune --input src --output out --no-progress FLAGS``."""
    from megatron.prune.cli import main

    return main(["prune", "--input", str(src), "--output", str(out), "--no-progress", *flags])


def refuse(argv: list[str], out: Path, capsys, *needles: str) -> None:
    """The CLI refuses ``argv`` (exit 2) naming every needle, and leaves neither ``out`` nor a partial of it."""
    from megatron.prune.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def shape_of(model) -> "ModelShape":  # noqa: F821
    """The :class:`ModelShape` of a loaded HF model."""
    from megatron.prune.core.shape import shape_from_hf_config

    cfg = model.config.to_dict()
    cfg["architectures"] = model.config.architectures
    return shape_from_hf_config(cfg)
