"""Shared fixtures: tiny random checkpoints (one per family, built once per session) and the real model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, make_tiny_hf, moe_with_real_tokenizer, with_real_tokenizer  # noqa: E402


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
def tok_model(tmp_path_factory, real_model):
    """A tiny random LLaMA with the real model's tokenizer (vocab 49152); layer 2 is a no-op. Read-only."""
    return with_real_tokenizer(tmp_path_factory.mktemp("tok") / "model", "llama-gqa", real_model)


@pytest.fixture(scope="session")
def moe_tok(tmp_path_factory, real_model):
    """``moe_tok(family)`` -> a tiny MoE with the real tokenizer whose expert tiny.DEAD_EXPERT the router never picks.
    Read-only."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = moe_with_real_tokenizer(tmp_path_factory.mktemp(f"tok_{family}") / "model", family,
                                                    real_model)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def qwen3_tok_model(tmp_path_factory, real_model):
    """:func:`tok_model`, a tiny random Qwen3 (QK-norm). Read-only."""
    return with_real_tokenizer(tmp_path_factory.mktemp("tok_qwen3") / "model", "qwen3", real_model)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """Ten JSON lines of the built-in calibration text."""
    from megatron.prune.text import builtin_text

    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    text = builtin_text("calib")
    path.write_text("\n".join(json.dumps({"text": text[i : i + 4000]}) for i in range(0, 40000, 4000)))
    return path


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted from its GGUF once, then cached)."""
    from megatron.prune.models import embedded_model_dir

    return embedded_model_dir()


__all__ = ["FAMILIES"]
