"""The vocab-parallel KL: never negative, equal to plain torch at TP=2."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron.prune.training import kd
from tests.training.recovery_harness import ok


def test_kl_of_near_equal_logits_is_never_negative():
    """Rounding makes KL(p || q) of near-equal logits come out slightly negative for some tokens, and Megatron's
    log leaves out a negative loss average; the KL is clamped at 0."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 4096, generator=g) * 3
    kl = kd.vocab_parallel_kl(teacher + 1e-6 * torch.randn(64, 4096, generator=g), teacher)
    assert kl.min() >= 0 and kl.max() < 1e-6


def test_vocab_parallel_kl_at_tp2_equals_plain_torch(runs, inputs):
    ok(runs["kl"])
    out = inputs["dir"] / "kl"
    a, b = (json.loads(Path(f"{out}.{i}").read_text()) for i in (0, 1))
    assert a["ok"] and b["ok"] and a["kl"] == b["kl"]
