"""The Megatron schema and args: fusions and their inverses, TP split axes, RoPE scaling and the args
`--use-checkpoint-args` reads."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron.prune.core.roles import ROLE_AXES
from megatron.prune.errors import PruneError
from megatron.prune.formats.folder import open_megatron
from megatron.prune.formats.mcore import args as mcore_args
from megatron.prune.formats.mcore import schema


def test_fuse_qkv_layout_is_per_group_and_inverts():
    ng, np_, hn, h = 2, 6, 2, 3
    q = torch.arange(np_ * hn * h, dtype=torch.float32).reshape(np_ * hn, h)
    k = -torch.arange(1, ng * hn * h + 1, dtype=torch.float32).reshape(ng * hn, h)
    v = 1000 + torch.arange(ng * hn * h, dtype=torch.float32).reshape(ng * hn, h)
    qkv = schema.fuse_qkv(q, k, v, ng)
    per = (np_ // ng + 2) * hn
    for g in range(ng):  # group g's rows: its 3 q heads, then k_g, then v_g
        block = qkv[g * per : (g + 1) * per]
        qh = np_ // ng * hn
        assert torch.equal(block[:qh], q[g * qh : (g + 1) * qh])
        assert torch.equal(block[qh : qh + hn], k[g * hn : (g + 1) * hn])
        assert torch.equal(block[qh + hn :], v[g * hn : (g + 1) * hn])
    for a, b in zip(schema.unfuse_qkv(qkv, ng, np_, hn), (q, k, v)):
        assert torch.equal(a, b)
    bias = schema.fuse_qkv(q[:, 0], k[:, 0], v[:, 0], ng)
    assert all(torch.equal(a, b) for a, b in zip(schema.unfuse_qkv(bias, ng, np_, hn), (q[:, 0], k[:, 0], v[:, 0])))


def test_fuse_fc1_inverts():
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    g2, u2 = schema.unfuse_fc1(schema.fuse_fc1(gate, up))
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_tp_axis_declared_once_and_consistent_with_role_axes():
    for p in schema.PARAMS:
        assert {schema.role_tp_axis(r) for r in p.roles} == {p.tp_axis}, p.key
    assert set(schema.PARAM_OF_ROLE) == set(ROLE_AXES)


def test_rope_scaling_llama3_is_carried_and_others_refused():
    assert mcore_args.rope_scaling_args({"rope_theta": 1e4}) == {"use_rope_scaling": False}
    cfg = {"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    assert mcore_args.rope_scaling_args(cfg) == {"use_rope_scaling": True, "rope_scaling_factor": 32.0}
    with pytest.raises(PruneError, match="not supported"):
        mcore_args.rope_scaling_args({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_args_carry_use_checkpoint_args_fields(tp2):
    a = open_megatron(tp2).args
    assert isinstance(a, argparse.Namespace)
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads",
                 "num_query_groups", "group_query_attention", "kv_channels", "max_position_embeddings",
                 "position_embedding_type", "add_position_embedding", "use_rotary_position_embeddings",
                 "rotary_base", "rotary_percent", "rotary_interleaved", "add_bias_linear", "add_qkv_bias",
                 "squared_relu", "swiglu", "untie_embeddings_and_output_weights", "apply_layernorm_1p",
                 "normalization", "apply_query_key_layer_scaling", "attention_dropout", "hidden_dropout",
                 "padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "make_vocab_size_divisible_by", "norm_epsilon", "ckpt_format", "qk_layernorm"):
        assert getattr(a, name, None) is not None, name
    assert a.padded_vocab_size == 256 and a.vocab_size == 96 and a.tensor_model_parallel_size == 2


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias", "qwen3"])
def test_checkpoint_without_hf_meta_exports_its_family(tiny_hf, tmp_path, family):
    """A checkpoint converted elsewhere (no hf_meta/) gets its HF architecture from the registry, by the layers its
    args describe (q/k/v bias: Qwen2, QK-norm: Qwen3), and exports to the same tensors."""
    import shutil

    from compare import assert_same_tensors, hf_tensors
    from megatron.prune.formats.hf import HFCheckpoint
    from megatron.prune.formats.mcore import ops

    hf = tiny_hf(family)
    mg = ops.hf_to_megatron(hf, tmp_path / "mg", progress=False)
    shutil.rmtree(mg / schema.META_DIR)
    back = ops.megatron_to_hf(mg, tmp_path / "hf", progress=False)
    assert HFCheckpoint.open(back).config["architectures"] == HFCheckpoint.open(hf).config["architectures"]
    assert_same_tensors(hf_tensors(hf), hf_tensors(back))


def test_export_without_hf_meta_says_the_tokenizer_and_token_ids_are_missing(tiny_hf, tmp_path, capsys):
    """megatron-to-hf of a checkpoint without hf_meta/ writes a config without bos/eos ids and no tokenizer: the
    command says so (and what to copy), where it used to say only that it wrote the checkpoint."""
    import json
    import shutil

    from megatron.prune.cli import main
    from megatron.prune.formats.mcore import ops

    mg = ops.hf_to_megatron(tiny_hf(), tmp_path / "mg", progress=False)
    shutil.rmtree(mg / schema.META_DIR)
    assert main(["convert", "megatron-to-hf", "--input", str(mg), "--output", str(tmp_path / "hf"),
                 "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"note: {mg} has no hf_meta/" in said and "no bos/eos token ids" in said
    assert "bos_token_id" not in json.loads((tmp_path / "hf" / "config.json").read_text())


def test_qk_l2_norm_checkpoint_refused(tiny_hf, tmp_path):
    """megatron-core's parameter-free L2 QK-norm is not Qwen3's RMSNorm: refused, not read as either."""
    a = argparse.Namespace(normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                           add_bias_linear=False, qk_l2_norm=True)
    with pytest.raises(PruneError, match="qk_l2_norm"):
        mcore_args.shape_from_args(a, 96)


def test_hf_meta_of_another_family_refused(tp2, tmp_path):
    """An hf_meta/config.json that names QK-norm layers (Qwen3) over args without qk_layernorm is refused on open:
    exported, transformers would initialise the missing QK-norms at random."""
    import json
    import shutil

    mg = shutil.copytree(tp2, tmp_path / "copy")
    meta = mg / schema.META_DIR / "config.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "architectures": ["Qwen3ForCausalLM"],
                                "model_type": "qwen3"}))
    with pytest.raises(PruneError, match="its HF config is Qwen3ForCausalLM, but its args say qk_layernorm=False"):
        open_megatron(mg)


def test_auto_spec_is_the_one_training_builds_here(monkeypatch):
    """convert/reshard --transformer-impl auto: Transformer Engine's spec only where TE is installed and a GPU is
    present (pretrain_llama.py runs on CPU with the local spec otherwise)."""
    import importlib.util

    import torch

    from megatron.prune.formats.mcore.schema import resolve_spec

    real = importlib.util.find_spec
    for te, gpu, want in ((True, True, "transformer_engine"), (True, False, "local"), (False, True, "local")):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, te=te: object() if name == "transformer_engine" and te else
                            (None if name == "transformer_engine" else real(name, *a)))
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert resolve_spec("auto") == want
        assert resolve_spec("local") == "local"
