"""The real embedded model (SmolLM2-135M, GQA 9/3, tied, vocab 49152) through the Megatron adapter at TP=3."""

from __future__ import annotations

import pytest
from test_megatron_ckpt import assert_same_tensors, hf_tensors

from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.mcore import ops
from megatron.prune.formats.hf import HFCheckpoint
from megatron.prune.formats.hf import apply_plan as apply_hf_plan
from megatron.prune.core.select import make_plan
from megatron.prune.scoring.methods import magnitude_scores

pytestmark = pytest.mark.slow


def test_real_model_tp3_round_trip_and_balanced_prune(real_model, tmp_path):
    mg = ops.hf_to_megatron(real_model, tmp_path / "mg", tp=3, progress=False)
    ck = open_megatron(mg)
    assert (ck.tp, ck.padded_vocab, ck.shape) == (3, 49152, HFCheckpoint.open(real_model).shape)
    assert (mg / "hf_meta" / "tokenizer.json").is_file() and ck.args.tokenizer_type == "HuggingFaceTokenizer"
    back = ops.megatron_to_hf(mg, tmp_path / "back", progress=False)
    assert_same_tensors(hf_tensors(real_model), hf_tensors(back))
    assert (back / "tokenizer.json").is_file()

    s = ck.shape
    target = s.replace(hidden_size=480, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=1152,
                       num_layers=s.num_layers - 3)
    plan = make_plan(s, target, magnitude_scores(ck), tp=3, balance=True)
    pruned = ops.apply_plan(open_megatron(mg), plan, tmp_path / "pruned", progress=False)
    ref = apply_hf_plan(real_model, tmp_path / "ref", plan, progress=False)
    assert_same_tensors(hf_tensors(ref), hf_tensors(ops.megatron_to_hf(pruned, tmp_path / "pruned_hf", progress=False)))
