"""Shared fixtures: tiny random checkpoints (one per family, built once per session) and the real model."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, make_tiny_hf  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """``tiny_hf(family)`` -> folder of a tiny random HF checkpoint. Treat it as read-only."""
    cache: dict[str, Path] = {}

    def get(family: str = "llama-gqa") -> Path:
        if family not in cache:
            cache[family] = make_tiny_hf(tmp_path_factory.mktemp(family) / "model", family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted from its GGUF once, then cached)."""
    from megatron.prune.models import embedded_model_dir

    return embedded_model_dir()


def tree_hash(folder: Path) -> str:
    """Hash of every file's name and bytes under ``folder``: proves an input was left untouched."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


__all__ = ["FAMILIES", "tree_hash"]
