"""The model a recovery run builds: layer spec and attention kernel per flag, refused partial loads."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from megatron.prune.errors import PruneError


def test_gpu_diagnostic_and_te_flags_reach_megatron_core(monkeypatch):
    """Flags the stock GPT script honours on a GPU: --use-te-activation-func and --use-transformer-engine-op-fuser
    reach Transformer Engine's layer spec; --record-memory-history starts the allocator history before the model is
    built (and is refused on CPU, where there is no CUDA allocator)."""
    import megatron.core.models.gpt.gpt_layer_specs as specs
    import megatron.training
    import megatron.training.utils

    from megatron.prune.training import checks, recipe
    from megatron.prune.training import model as model_mod

    seen: dict[str, object] = {}
    monkeypatch.setattr(model_mod, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(specs, "get_gpt_layer_with_transformer_engine_spec", lambda **kw: seen.update(kw))
    model_mod._layer_spec(Namespace(transformer_impl="transformer_engine", qk_layernorm=False,
                                 use_te_activation_func=True, use_transformer_engine_op_fuser=True), None)
    assert seen == {"qk_layernorm": False, "use_te_activation_func": True, "use_te_op_fuser": True}

    args = Namespace(record_memory_history=True, profile_ranks=[1], memory_snapshot_path="snap.pickle",
                     kd_teacher_load=None, transformer_impl="local")
    monkeypatch.setattr(megatron.training, "get_args", lambda: args)
    monkeypatch.setattr(megatron.training.utils, "start_memory_history_recording", lambda p: seen.update(vars(p)))

    def build(*_: object) -> torch.nn.Module:
        seen["history_first"] = "record_memory_history" in seen
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(recipe, "build_gpt", build)
    recipe.Recovery().model_provider()
    assert seen["history_first"] and (seen["record_memory_history"], seen["profile_ranks"],
                                    seen["memory_snapshot_path"]) == (True, [1], "snap.pickle")
    monkeypatch.setattr(checks, "shims_active", lambda: True)
    with pytest.raises(PruneError, match="--record-memory-history: records CUDA allocations, and this run has no "
                                         "GPU; drop the flag"):
        checks.check_memory_history(args)
    checks.check_memory_history(Namespace(record_memory_history=False))


def test_attention_kernel_of_the_local_spec(monkeypatch):
    """Which core attention the local spec gets: torch SDPA by default on a GPU (not under --deterministic-mode),
    megatron-core's unfused module by default on CPU; --attention-backend names either one explicitly."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnBackend

    from megatron.prune.training import attention
    from megatron.prune.training import model as model_mod

    def core(**kw: object) -> type:
        args = Namespace(transformer_impl="local", qk_layernorm=False, normalization="RMSNorm", **kw)
        return model_mod._layer_spec(args, None).submodules.self_attention.submodules.core_attention

    monkeypatch.setattr(attention, "on_gpu", lambda: False)
    assert core(attention_backend=AttnBackend.auto) is DotProductAttention
    assert core(attention_backend=AttnBackend.flash) is core(attention_backend=AttnBackend.fused) \
        is attention.SDPAttention
    monkeypatch.setattr(attention, "on_gpu", lambda: True)
    assert core(attention_backend=AttnBackend.auto, deterministic_mode=False) is attention.SDPAttention
    assert core(attention_backend=AttnBackend.auto, deterministic_mode=True) is DotProductAttention
    assert core(attention_backend=AttnBackend.unfused) is DotProductAttention
    assert model_mod.spec_description(Namespace(transformer_impl="local", attention_backend=AttnBackend.auto)) \
        == "local spec, torch SDPA attention"


def test_partial_loads_are_refused():
    from megatron.prune.training.model import refuse_partial_loads

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    refuse_partial_loads(model)
    full = model.state_dict()
    model.load_state_dict(full)
    model.load_state_dict({**full, "1._extra_state": torch.zeros(1)}, strict=False)  # TE metadata may differ
    renamed = {("1.w" if k == "1.weight" else k): v for k, v in full.items()}
    with pytest.raises(PruneError, match=r"1 missing \['1.weight'\], 1 unexpected \['1.w'\]"):
        model.load_state_dict(renamed, strict=False)  # what the stock loader's fallback does


def test_training_follows_a_local_spec_checkpoint_where_it_would_build_te():
    """Converted on a CPU laptop (local spec), trained in a container with Transformer Engine: the run builds the
    checkpoint's spec unless --transformer-impl says otherwise; the other way round stays a refusal."""
    from megatron.prune.training.model import follows_local_checkpoint

    assert follows_local_checkpoint(["--load", "x"], "local", builds_te=True)
    assert not follows_local_checkpoint(["--transformer-impl", "transformer_engine"], "local", builds_te=True)
    assert not follows_local_checkpoint(["--transformer-impl=transformer_engine"], "local", builds_te=True)
    assert not follows_local_checkpoint([], "transformer_engine", builds_te=True)
    assert not follows_local_checkpoint([], "local", builds_te=False)
    assert not follows_local_checkpoint([], None, builds_te=True)


def test_saved_layer_spec_reads_the_checkpoint_args(tiny_hf, tmp_path):
    from megatron.prune.formats.mcore.ops import hf_to_megatron
    from megatron.prune.training.checkpoints import saved_layer_spec

    for spec in ("local", "transformer_engine"):
        out = hf_to_megatron(tiny_hf("llama-gqa"), tmp_path / spec, spec=spec, progress=False)
        assert saved_layer_spec(out) == spec
    assert saved_layer_spec(tmp_path) is None
