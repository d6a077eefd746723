"""The refit on a GPU (``--device cuda``; ``auto``, the default, picks it where one is present) gives what the CPU
gives, up to float32 rounding: the same plan, every tensor close. Skipped where there is no GPU (the development
machine and CI): run ``pytest tests/refit/test_gpu.py`` on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from compare import hf_tensors, prune_cli
from megatron.prune.core.plan import PrunePlan
from tiny import with_real_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CALIB = ["--samples", "4", "--seq-len", "32", "--batch-size", "2"]
SHAPES = {  # every axis and depth (untied: lm_head refit; tied: final-norm gain), and per-layer only (fused selection)
    "all axes": ["--hidden-size", "36", "--ffn-hidden-size", "48", "--num-layers", "2"],
    "ffn only": ["--ffn-hidden-size", "48"],
}


@pytest.fixture(scope="module")
def tied_tok_model(tmp_path_factory, real_model):
    return with_real_tokenizer(tmp_path_factory.mktemp("tied") / "model", "llama-tied", real_model)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("model", ["tok_model", "tied_tok_model"])
def test_refit_on_cuda_matches_the_cpu(model, shape, request, tmp_path):
    src = request.getfixturevalue(model)
    heads = {"tok_model": "4", "tied_tok_model": "3"}[model]  # one KV group less: 8 / 4 and 6 / 2 heads / groups
    flags = [*SHAPES[shape], *CALIB, *(["--num-attention-heads", heads] if shape == "all axes" else [])]
    assert prune_cli(src, tmp_path / "cpu", *flags, "--device", "cpu") == 0
    assert prune_cli(src, tmp_path / "cuda", *flags, "--device", "cuda") == 0
    plans = [PrunePlan.load(tmp_path / d / "prune_plan.json") for d in ("cpu", "cuda")]
    assert plans[0].hidden == plans[1].hidden and plans[0].layers == plans[1].layers
    cpu, cuda = hf_tensors(tmp_path / "cpu"), hf_tensors(tmp_path / "cuda")
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=2e-3, atol=2e-4, msg=name)


def test_moe_refit_on_cuda_matches_the_cpu(moe_tok, tmp_path):
    """A mixture-of-experts model (router and experts refit on the tokens routed to each) gives on the GPU what it
    gives on the CPU."""
    flags = ["--hidden-size", "40", "--num-attention-heads", "4", "--num-query-groups", "2", "--num-experts", "2",
             "--moe-ffn-hidden-size", "12", *CALIB]
    for device in ("cpu", "cuda"):
        assert prune_cli(moe_tok("qwen3-moe"), tmp_path / device, *flags, "--device", device) == 0
    plans = [PrunePlan.load(tmp_path / d / "prune_plan.json") for d in ("cpu", "cuda")]
    assert plans[0].hidden == plans[1].hidden and plans[0].layers == plans[1].layers
    cpu, cuda = hf_tensors(tmp_path / "cpu"), hf_tensors(tmp_path / "cuda")
    assert cpu.keys() == cuda.keys() and any(k.startswith("expert_down") for k in cpu)
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=2e-3, atol=2e-4, msg=name)
