"""Throughput and MFU of the GPU smoke (``megatron.prune.training.throughput``), and the smoke script itself.

The FLOP count is checked exactly against two counts nobody here wrote: torch's ``FlopCounterMode`` on the HF
model (forward, full attention) and megatron's own ``num_floating_point_operations`` (training, causal).
The script runs end to end on CPU as the device tool runs it, so it does not rot between GPU sessions.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.prune.core.shape import shape_from_hf_config
from megatron.prune.training.throughput import (
    flops_per_token,
    iteration_times_ms,
    matmul_params,
    measure,
    megatron_tflops,
    peak_bf16_flops,
)
from tests.procs import free_port
from tests.tiny import FAMILIES, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
# a line as megatron-core 0.19.2's training_log prints it
LOG_LINE = (" [2026-11-27 19:55:03.210780] iteration        {i}/       3 | consumed samples:            2 | "
            "elapsed time per iteration (ms): {ms} | throughput per GPU (TFLOP/s/GPU): {tf} | learning rate: "
            "7.750000E-05 | global batch size:     2 | lm loss: 1.094636E+01 | loss scale: 1.0 |")


def _shape(model):
    return shape_from_hf_config(model.config.to_dict())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matmul_params_are_the_linear_weights(family):
    model = make_tiny_model(family)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(_shape(model)) == linear


@pytest.mark.parametrize("family", ["llama-gqa", "llama-tied", "qwen3"])
def test_forward_flops_match_torch_flop_counter(family):
    from torch.utils.flop_counter import FlopCounterMode

    model = make_tiny_model(family, attn_implementation="eager")  # eager: scores over the full s x s
    batch, seq = 2, 17
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (batch, seq)))
    forward = flops_per_token(_shape(model), seq, causal=False) / 3 * batch * seq
    assert counter.get_total_flops() == forward
    full, causal = (flops_per_token(_shape(model), seq, causal=c) for c in (False, True))
    c = model.config
    assert full - causal == 6 * c.num_hidden_layers * seq * c.num_attention_heads * c.head_dim


def test_training_flops_match_megatron_own_count(monkeypatch):
    from megatron.training.arguments import parse_args
    from megatron.training.training import num_floating_point_operations

    model = make_tiny_model("llama-gqa", vocab_size=384)
    s, seq, batch = _shape(model), 32, 5
    monkeypatch.setattr(sys, "argv", [
        "x", "--num-layers", str(s.num_layers), "--hidden-size", str(s.hidden_size),
        "--num-attention-heads", str(s.num_attention_heads), "--group-query-attention",
        "--num-query-groups", str(s.num_query_groups), "--kv-channels", str(s.head_dim),
        "--ffn-hidden-size", str(s.ffn_hidden_size), "--swiglu", "--seq-length", str(seq)])
    args = parse_args()
    args.padded_vocab_size = s.vocab_size
    assert num_floating_point_operations(args, batch) == flops_per_token(s, seq) * batch * seq


def test_peaks_and_log_parsing():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("CPU (no GPU: not a GPU figure)") is None
    log = "\n".join(LOG_LINE.format(i=i, ms=ms, tf=tf) for i, ms, tf in ((1, "3046.0", "1.5"), (2, "2400.5", "2.0")))
    assert iteration_times_ms(log) == [3046.0, 2400.5]
    assert megatron_tflops(log) == [1.5, 2.0]


def test_measure_skips_warmup_and_refuses_an_empty_log():
    shape = _shape(make_tiny_model("llama-gqa"))
    t = measure([9000.0, 4600.0, 100.0, 300.0], shape, seq_len=64, global_batch=4, device="NVIDIA H100 80GB HBM3",
                warmup=1)  # Megatron's time for iteration 2 holds iteration 1's too: left out whatever the warmup
    assert (t.iterations, t.step_s, t.tokens_per_s) == (2, 0.2, 4 * 64 / 0.2)
    assert t.mfu == pytest.approx(t.tokens_per_s * flops_per_token(shape, 64) / 989e12)
    short = measure([900.0, 100.0], shape, 64, 4, "CPU", warmup=5)  # too short: the last one, start-up in it
    assert short.step_s == 0.1 and short.with_startup and "start-up included" in short.lines("CPU")[1]
    assert not measure([900.0, 800.0, 100.0], shape, 64, 4, "CPU", warmup=5).with_startup
    assert measure([100.0], shape, 64, 4, "CPU").mfu is None
    with pytest.raises(ValueError, match="no iteration timings"):
        measure([], shape, 64, 4, "CPU")


@pytest.mark.slow
def test_gpu_smoke_script_runs_on_cpu(real_model, tmp_path):
    """Stage 1 without weights (as prepared for the device tool), then stage 2 from random weights, then the
    distillation leg with the weights stage 2 saved as teacher and student."""
    from megatron.prune.cli import main
    from megatron.prune.commands.demo import DEMO_SHAPE

    work = tmp_path / "smoke"
    shape = [x for k, v in DEMO_SHAPE.items() for x in (f"--{k}", str(v))]
    # random selection instead of the default activation scoring: the same files, a few seconds sooner
    assert main(["prune", "--input", str(real_model), "--output", str(work / "pruned_hf"), "--method", "random",
                 "--no-progress", *shape]) == 0
    env = {**os.environ, "PYTHON": sys.executable, "WORK": str(work), "SMOKE_WEIGHTS": "0", "ITERS": "3",
           "SEQ_LEN": "64", "MICRO_BATCH": "1", "GLOBAL_BATCH": "2", "KD_ITERS": "2", "MASTER_PORT": str(free_port()),
           "SMOKE_FLAGS": "--seed 7 --attention-backend flash"}
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_smoke.sh")], env=env, capture_output=True, text=True,
                       cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (work / "pruned_hf").exists() and (work / "ready").exists()  # no weights kept
    flags = (work / "model_flags.txt").read_text().split()
    assert flags[flags.index("--num-layers") + 1] == str(DEMO_SHAPE["num-layers"])
    assert flags[flags.index("--hidden-size") + 1] == str(DEMO_SHAPE["hidden-size"])
    assert "random weights of the pruned shape" in r.stdout
    train_log, kd_log = (work / "train.log").read_text(), (work / "kd.log").read_text()
    assert len(iteration_times_ms(train_log)) == 3
    assert re.search(r"\n  no_save_optim \.+ True\n", train_log)  # weights only: the KD leg needs no optimizer
    for log in (train_log, kd_log):  # SMOKE_FLAGS reach both legs (SDPA attention, the GPU default, on CPU too)
        assert re.search(r"\n  seed \.+ 7\n", log), log[-2000:]
        assert "building LLaMA-family GPTModel (local spec, torch SDPA attention)" in log
    out = r.stdout[r.stdout.index("device: "):]
    assert out.startswith("device: CPU (no GPU") and "tokens/s: " in out and "model TFLOP/s: " in out
    assert "MFU" not in out and "Megatron's own count" in out and "layer spec: local" in out
    assert len(iteration_times_ms(kd_log)) == 2 and "kd loss: " in kd_log
    assert "distillation (teacher == student" in out and "first KD loss: 0 (teacher == student)" in out
    shutil.rmtree(work)


def test_gpu_smoke_prepares_a_shape_of_its_own(real_model, tmp_path):
    """SMOKE_SHAPE: stage 1 writes that shape's config (larger than the embedded model: nothing pruned) with the
    embedded tokenizer, and the Megatron flags for it; a shape Megatron cannot build is one line, nothing prepared."""
    import json

    env = {**os.environ, "PYTHON": sys.executable, "SMOKE_WEIGHTS": "0", "PREPARE_ONLY": "1"}
    shape = "--num-layers 16 --hidden-size 2048 --num-attention-heads 32 --num-query-groups 8 --ffn-hidden-size 8192"
    work = tmp_path / "big"
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_smoke.sh")], capture_output=True, text=True, cwd=ROOT,
                       env={**env, "WORK": str(work), "SMOKE_SHAPE": shape}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (work / "model_flags.txt").read_text().split() == [
        "--num-layers", "16", "--hidden-size", "2048", "--ffn-hidden-size", "8192", "--num-attention-heads", "32",
        "--group-query-attention", "--num-query-groups", "8", "--kv-channels", "64"]
    s = shape_from_hf_config(json.loads((work / "tokenizer" / "config.json").read_text()))
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.num_query_groups, s.ffn_hidden_size,
            s.vocab_size, s.tied_embeddings) == (16, 2048, 32, 8, 8192, 49152, True)
    assert (work / "tokenizer" / "tokenizer.json").is_file() and (work / "ready").is_file()
    assert not (work / "pruned_hf").exists() and not (work / "pruned_mg").exists()
    bad = tmp_path / "bad"
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_smoke.sh")],
                       env={**env, "WORK": str(bad), "SMOKE_SHAPE": "--num-attention-heads 32 --num-query-groups 5"},
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "SMOKE_SHAPE: 32 heads do not divide into 5 groups" in r.stderr
    assert "Traceback" not in r.stderr and not (bad / "ready").exists()


def test_cli_refuses_missing_files_and_empty_logs(tmp_path, capsys):
    from megatron.prune.training.throughput import main

    model = make_tiny_model("llama-gqa")
    model.config.to_json_file(tmp_path / "config.json")
    (tmp_path / "empty.log").write_text("no timings here\n")
    common = ["--seq-len", "64", "--global-batch", "4"]
    with pytest.raises(SystemExit) as e:
        main(["--log", str(tmp_path / "missing.log"), "--config", str(tmp_path), *common])
    assert e.value.code == 2 and "--log: no file" in capsys.readouterr().err
    assert main(["--log", str(tmp_path / "empty.log"), "--config", str(tmp_path), *common]) == 2
    assert "no iteration timings" in capsys.readouterr().err
    (tmp_path / "ok.log").write_text(LOG_LINE.format(i=1, ms="200.0", tf="1.0") + "\n")
    assert main(["--log", str(tmp_path / "ok.log"), "--config", str(tmp_path), *common, "--device", "H200"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s: 1,280" in out and "MFU: " in out and "Megatron's own count (--log-throughput): 1.0" in out
