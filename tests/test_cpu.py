"""The CPU shims keep megatron-core training on CPU: fails loudly when a new megatron-core breaks them.

The shims are process-global (a TorchFunctionMode, patched ``torch.cuda``), so the check runs in a
child process: this file is both the test and the child's script.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def _tiny_gpt():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.1, attention_dropout=0.1, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        use_cpu_initialization=True,
    )
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=128, max_sequence_length=32,
                     position_embedding_type="rope", share_embeddings_and_output_weights=True)
    return config, model


def _sdpa_dropout_draws_from_the_tracker(config) -> dict[str, bool]:
    """The recipe's SDPA attention in training with attention dropout: it drops (outputs differ from eval and
    between calls) and, as the stock module does, draws from the TP RNG tracker, leaving the default stream alone."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron.prune.training.attention import SDPAttention

    attn = SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    q, k, v = torch.randn(16, 2, 4, 16), torch.randn(16, 2, 2, 16), torch.randn(16, 2, 2, 16)
    plain = attn.eval()(q, k, v, None)
    attn.train()
    default_stream = torch.get_rng_state()
    first, second = attn(q, k, v, None), attn(q, k, v, None)
    return {"drops": not torch.equal(first, plain) and not torch.equal(first, second),
            "default_stream_untouched": torch.equal(torch.get_rng_state(), default_stream)}


def _child() -> None:
    """Train a tiny GPTModel for 8 steps through DDP + Megatron optimizer + schedules on CPU."""
    from megatron.prune.cpu import apply_cpu_shims, init_parallel, skip_compile_helpers

    assert apply_cpu_shims() is True and apply_cpu_shims() is True  # idempotent
    init_parallel(tp=1, pp=1)
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # RNG tracker: forking the TP state twice from the same saved states gives the same mask.
    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = {k: v.clone() for k, v in tracker.get_states().items()}
    with tracker.fork():
        m1 = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    with tracker.fork():
        m2 = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    tracker.set_states(saved)
    with tracker.fork():
        m3 = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    assert not torch.equal(m1, m2) and torch.equal(m1, m3), "RNG tracker fork is not CPU-faithful"

    # The redirect: 'cuda' allocations land on CPU, type() reports CUDA names.
    t = torch.zeros(3, device="cuda")
    assert t.device.type == "cpu" and t.type() == "torch.cuda.FloatTensor"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to(torch.cuda.current_device()).device.type == "cpu"

    config, model = _tiny_gpt()
    sdpa_dropout = _sdpa_dropout_draws_from_the_tracker(config)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=1.0, weight_decay=0.0), [ddp]
    )
    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (4, 17))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def forward_step(data_iterator, m):
        x, y = tokens[:, :-1], tokens[:, 1:]
        pos = torch.arange(16).unsqueeze(0).expand(4, -1)
        out = m(x, pos, None, labels=y)  # [b, s] per-token losses

        def loss_func(o):
            loss = o.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return out, loss_func

    losses, norms = [], []
    fb = get_forward_backward_func()
    for _ in range(8):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        r = fb(forward_step_func=forward_step, data_iterator=None, model=[ddp], num_microbatches=1,
               seq_length=16, micro_batch_size=4, forward_only=False)
        ok, grad_norm, _ = opt.step()
        assert ok, "optimizer step was skipped"
        losses.append(float(r[0]["lm loss"]))
        norms.append(float(grad_norm))
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters())
    print(json.dumps({"losses": losses, "norms": norms, "changed": changed,
                      "n_params": len(before), "helpers": skip_compile_helpers(), "sdpa_dropout": sdpa_dropout,
                      "cuda_available": torch.cuda.is_available()}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are only applied without CUDA")
def test_tiny_gpt_trains_on_cpu_through_the_shims():
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"CPU shims broken by this megatron-core:\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cuda_available"] is False
    assert result["helpers"] is True, "prebuilt helpers_cpp .so missing: compile_helpers not skipped"
    assert result["sdpa_dropout"] == {"drops": True, "default_stream_untouched": True}
    assert result["changed"] == result["n_params"], "optimizer step left parameters untouched"
    assert all(n == n and n > 0 for n in result["norms"]), result["norms"]
    assert result["losses"][-1] < result["losses"][0] - 0.1, result["losses"]


def test_apply_cpu_shims_is_a_noop_with_cuda(monkeypatch):
    import megatron.prune.cpu as cpu

    if cpu.shims_active():
        pytest.skip("shims already applied in this process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current_device = torch.cuda.current_device
    assert cpu.apply_cpu_shims() is False
    assert torch.cuda.current_device is current_device and not cpu.shims_active()


@pytest.mark.parametrize("te", [False, True])
def test_gpu_without_transformer_engine_gets_the_local_spec_flags(monkeypatch, te):
    """On a GPU (no CPU shims) without TE, pretrain_llama.py selects megatron-core's local spec and plain ops
    before the user's flags (which still win); with TE the stock defaults are left alone. LLaMA's no-dropout
    defaults come before the user's flags in both cases."""
    import megatron.training.arguments as margs

    from megatron.prune.cpu import WITHOUT_TE_FLAGS
    from megatron.prune.training import recipe

    seen: list[str] = []

    def parse(*_a, **_k):
        seen.extend(sys.argv[1:])
        raise SystemExit(0)

    monkeypatch.setattr(recipe, "apply_cpu_shims", lambda: False)
    monkeypatch.setattr(recipe, "have_transformer_engine", lambda: te)
    monkeypatch.setattr(margs, "parse_and_validate_args", parse)
    monkeypatch.setattr(sys, "argv", ["pretrain_llama.py"])
    with pytest.raises(SystemExit):
        recipe.main(["--transformer-impl", "transformer_engine"])
    want = [] if te else list(WITHOUT_TE_FLAGS)
    assert seen == [*want, *recipe.LLAMA_DEFAULTS, "--transformer-impl", "transformer_engine"]
    assert recipe.LLAMA_DEFAULTS == ("--attention-dropout", "0.0", "--hidden-dropout", "0.0")


if __name__ == "__main__":
    _child()
