"""Memory the distillation loss keeps for backward, against plain torch, in one process.

    python bench/kd_memory.py                      # SmolLM2's vocabulary (49152), 2048 tokens
    python bench/kd_memory.py --vocab 128256       # Llama-3's

For ``alpha`` 1 and 0.5 it runs the loss of ``pretrain_llama.py`` (``kd.distill_losses``: Megatron's
vocab-parallel cross-entropy + our vocab-parallel KL) and the same loss written with plain torch
(``F.cross_entropy`` + ``F.kl_div`` on ``log_softmax``), checks that both give the same values and gradients, and
prints the bytes each keeps for backward (saved tensors, each storage counted once) and the time of forward +
backward (median of ``--repeat``), with the ratios ours / plain torch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from megatron.prune.cpu import init_parallel
from megatron.prune.training import kd

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def ours(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, alpha: float, temp: float) -> torch.Tensor:
    lm, kl = kd.distill_losses(x, t, labels, alpha, temp, None)
    return (1 - alpha) * lm.sum() + alpha * temp**2 * kl.sum()


def plain_torch(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, alpha: float, temp: float) -> torch.Tensor:
    lm = F.cross_entropy(x.reshape(-1, x.shape[-1]), labels.reshape(-1), reduction="none")
    kl = F.kl_div(F.log_softmax(x / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                  reduction="none").sum(-1)
    return (1 - alpha) * lm.sum() + alpha * temp**2 * kl.sum()


def kept_bytes(loss: Loss, *args) -> tuple[torch.Tensor, int]:
    """The loss and the bytes of the distinct storages autograd keeps for its backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = loss(*args)
    return out, sum(storages.values())


def step_seconds(loss: Loss, x: torch.Tensor, *rest, repeat: int) -> tuple[float, torch.Tensor]:
    times, grad = [], None
    for _ in range(repeat):
        leaf = x.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss(leaf, *rest).backward()
        times.append(time.perf_counter() - t0)
        grad = leaf.grad
    return statistics.median(times), grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    init_parallel(tp=1)  # Megatron's cross-entropy reads the TP group
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, a.tokens, a.vocab, generator=g) * 3
    t = x + torch.randn(1, a.tokens, a.vocab, generator=g)  # a teacher near the student
    labels = torch.randint(0, a.vocab, (1, a.tokens), generator=g)
    one = x.numel() * x.element_size()
    print(f"vocab {a.vocab}, {a.tokens} tokens: one fp32 logits tensor = {one / 2**20:.0f} MiB")
    print("| alpha | kept, ours | kept, plain torch | ratio | fwd+bwd, ours | plain torch | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for alpha in (1.0, 0.5):
        args = (labels, alpha, a.temperature)
        v_ours, k_ours = kept_bytes(ours, x.clone().requires_grad_(True), t, *args)
        v_ref, k_ref = kept_bytes(plain_torch, x.clone().requires_grad_(True), t, *args)
        torch.testing.assert_close(v_ours, v_ref, rtol=1e-4, atol=1e-2)
        s_ours, g_ours = step_seconds(ours, x, t, *args, repeat=a.repeat)
        s_ref, g_ref = step_seconds(plain_torch, x, t, *args, repeat=a.repeat)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)
        print(f"| {alpha} | {k_ours / one:.2f} x | {k_ref / one:.2f} x | {k_ours / k_ref:.2f} | "
              f"{s_ours:.2f} s | {s_ref:.2f} s | {s_ours / s_ref:.2f} |")


if __name__ == "__main__":
    main()
