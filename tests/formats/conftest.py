"""Fixtures of the format tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def tp2(tiny_hf, tmp_path) -> Path:
    """The tiny GQA model converted to a TP=2 Megatron checkpoint."""
    from megatron.prune.formats.mcore import ops

    return ops.hf_to_megatron(tiny_hf("llama-gqa"), tmp_path / "mg", tp=2, progress=False)
