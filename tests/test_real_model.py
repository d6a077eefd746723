"""The real embedded model (SmolLM2-135M-Instruct, GQA 9/3, tied): few tests, each meaningful."""

from __future__ import annotations

import math

import pytest

from megatron.prune.cli import main
from megatron.prune.perplexity import perplexity
from megatron.prune.runtime import load_hf, tokenize
from megatron.prune.text import builtin_text

pytestmark = pytest.mark.slow


def ppl(folder, tokens: int = 1024) -> float:
    model, tok = load_hf(folder)
    return perplexity(model, tokenize(tok, builtin_text("eval"), tokens), seq_len=256, progress=False).perplexity


def test_keep_all_keeps_perplexity_and_prune_gives_finite(real_model, tmp_path):
    assert main(["prune", "--input", str(real_model), "--output", str(tmp_path / "same"), "--no-progress"]) == 0
    base = ppl(real_model)
    assert 5 < base < 40  # a trained model on English prose, not a random one
    assert ppl(tmp_path / "same") == base
    assert main(["prune", "--input", str(real_model), "--output", str(tmp_path / "small"), "--no-progress",
                 "--hidden-size", "504", "--num-attention-heads", "6", "--ffn-hidden-size", "1024",
                 "--num-layers", "26", "--method", "magnitude"]) == 0
    assert math.isfinite(ppl(tmp_path / "small", 512))


def test_demo_runs(tmp_path, capsys, real_model):
    assert main(["demo", "--methods", "random", "--max-tokens", "512", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "original" in out and "pruned (random)" in out and "perplexity" in out
    assert (tmp_path / "smollm2-random" / "prune_plan.json").is_file()
