r"""Training throughput from the stock loop's log: tokens/s and model FLOPs utilisation (MFU).

``scripts/gpu_smoke.sh`` runs this after its training run::

    python -m megatron.prune.training.throughput --log train.log --config config.json \
        --seq-len 2048 --global-batch 16

FLOPs follow the usual dense-transformer count (PaLM appendix B; Megatron's own ``--log-throughput``):
2 per multiply-add, backward = 2 x forward, causal attention computes half of the ``s x s`` scores.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron.prune.core.shape import ModelShape, shape_from_hf_config

ITERATION_MS = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")
MEGATRON_TFLOPS = re.compile(r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+)")  # with --log-throughput
# Dense (no sparsity) bf16 tensor-core peak of the SXM parts, by a substring of the CUDA device name;
# the first match wins, so the PCIe variants come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("B200", 2250e12),
)


def iteration_times_ms(log: str) -> list[float]:
    """Per-iteration wall times (ms) the stock loop printed, in order."""
    return [float(x) for x in ITERATION_MS.findall(log)]


def megatron_tflops(log: str) -> list[float]:
    """Megatron's own per-GPU TFLOP/s for each logged iteration (``--log-throughput``), in order."""
    return [float(x) for x in MEGATRON_TFLOPS.findall(log)]


def matmul_params(shape: ModelShape) -> int:
    """Weights that take part in a matrix product for each token: every linear layer plus the LM head.

    The embedding lookup is no product, but a tied LM head is one, so tying does not change the count.
    """
    h, d = shape.hidden_size, shape.head_dim
    attn = h * d * (shape.num_attention_heads + 2 * shape.num_query_groups) + shape.num_attention_heads * d * h
    mlp = 3 * h * shape.ffn_hidden_size  # gate, up, down (SwiGLU)
    return shape.num_layers * (attn + mlp) + shape.vocab_size * h


def flops_per_token(shape: ModelShape, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

    Linear layers: 6 per weight. Attention scores and the weighted sum of values: ``4 s d`` per head
    forward, x3 with backward, halved under a causal mask.
    """
    attention = 12 * shape.num_layers * seq_len * shape.num_attention_heads * shape.head_dim
    return 6 * matmul_params(shape) + (attention / 2 if causal else attention)


def peak_bf16_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when it is not in :data:`PEAK_BF16_FLOPS`."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


@dataclass(frozen=True)
class Throughput:
    step_s: float  # mean steady-state time of one global batch
    iterations: int  # iterations averaged
    tokens_per_s: float
    model_flops_per_s: float
    mfu: float | None  # fraction of the peak; None for an unknown device
    with_startup: bool = False  # too few iterations to leave out the start-up ones

    def lines(self, device: str) -> list[str]:
        out = [f"device: {device}",
               f"steady step time: {self.step_s * 1000:.1f} ms over {self.iterations} iterations"
               + (" (too few iterations: start-up included)" if self.with_startup else ""),
               f"tokens/s: {self.tokens_per_s:,.0f}",
               f"model TFLOP/s: {self.model_flops_per_s / 1e12:.1f}"]
        if self.mfu is not None:
            out.append(f"MFU: {100 * self.mfu:.1f}% (bf16 dense peak {peak_bf16_flops(device) / 1e12:.0f} TFLOP/s)")
        return out


def measure(times_ms: list[float], shape: ModelShape, seq_len: int, global_batch: int, device: str,
            warmup: int = 5) -> Throughput:
    """Throughput over the iterations after the first ``warmup`` (at least 2: Megatron does not restart its interval
    timer after logging iteration 1, so iteration 2's time also holds iteration 1's start-up); the last iteration
    alone when there are no more."""
    if not times_ms:
        raise ValueError("no iteration timings in the training log (was --log-interval set?)")
    skip = max(warmup, 2)
    steady = times_ms[skip:] or times_ms[-1:]
    step_s = sum(steady) / len(steady) / 1000.0
    tokens_per_s = global_batch * seq_len / step_s
    flops = tokens_per_s * flops_per_token(shape, seq_len)
    peak = peak_bf16_flops(device)
    return Throughput(step_s, len(steady), tokens_per_s, flops, flops / peak if peak else None,
                      with_startup=len(times_ms) <= 2)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU: not a GPU figure)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron.prune.training.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", type=Path, required=True, help="the training log (stdout of the stock loop)")
    p.add_argument("--config", type=Path, required=True, help="the model's HF config.json (or its folder)")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--warmup", type=int, default=5,
                   help="iterations left out of the mean (default 5; the first 2 always are)")
    p.add_argument("--device", help="device name for the peak (default: this machine's GPU 0)")
    a = p.parse_args(argv)
    config = a.config / "config.json" if a.config.is_dir() else a.config
    for path, what in ((a.log, "--log"), (config, "--config")):
        if not path.is_file():
            p.error(f"{what}: no file {str(path)!r}")
    shape = shape_from_hf_config(json.loads(config.read_text()))
    device = a.device or _device_name()
    log = a.log.read_text()
    try:
        t = measure(iteration_times_ms(log), shape, a.seq_len, a.global_batch, device, a.warmup)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(t.lines(device)))
    counted = megatron_tflops(log)
    theirs = counted[max(a.warmup, 2):] or counted[-1:]
    if theirs:  # an independent count of the same FLOPs: the two should agree
        print(f"Megatron's own count (--log-throughput): {sum(theirs) / len(theirs):.1f} TFLOP/s/GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
