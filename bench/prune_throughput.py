#!/usr/bin/env python3
"""Throughput and memory of pruning a TP-sharded Megatron checkpoint, against a plain `cp -r` of it.

Writes a synthetic LLaMA-2-7B-shaped TP=2 checkpoint (bf16 random weights; --layers for fewer layers),
then times `cp -r` of it and `megatron-prune prune` of it to a 3.4B-like shape (hidden 3072, heads 24,
FFN 8192, 28 of 32 layers, scaled with --layers), each in a fresh process. Prints prune/cp time and the
prune process's peak RSS against (largest input shard + largest output shard).
Targets: ratio <= 1.3; peak RSS <= 1.1 x (largest input shard + largest output shard).

    python bench/prune_throughput.py --layers 4 --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def synthetic_checkpoint(folder: Path, layers: int, tp: int) -> None:
    """A LLaMA-2-7B-shaped Megatron checkpoint with random bf16 weights, written one shard at a time."""
    from megatron.prune import megatron_ckpt as mc
    from megatron.prune.shape import ModelShape

    shape = ModelShape(num_layers=layers, hidden_size=4096, num_attention_heads=32, num_query_groups=32, head_dim=128,
                       ffn_hidden_size=11008, vocab_size=32000, tied_embeddings=False)
    layout = mc.Layout(shape, tp, 1, "local", mc.padded_vocab_size(shape.vocab_size, 128, tp))
    units = mc.tp_units(shape, layout.padded_vocab)
    gen = torch.Generator().manual_seed(0)

    def role_shape(role: str) -> tuple[int, ...]:
        size = {"hidden": shape.hidden_size, "vocab": layout.padded_vocab,
                "heads": shape.num_attention_heads * shape.head_dim, "groups": shape.num_query_groups * shape.head_dim,
                "ffn": shape.ffn_hidden_size}
        return tuple(size[a] // (tp if a in mc.TP_AXES else 1) for a in mc.ROLE_AXES[role])

    def roles(role: str, layer: int | None, r: int) -> torch.Tensor:
        return (torch.randn(role_shape(role), generator=gen) * 0.02).to(torch.bfloat16)

    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
                 "rope_theta": 10000.0, "max_position_embeddings": 4096}
    args = mc.args_for_shape(None, shape, tp, 1, layout.padded_vocab, 128, torch.bfloat16, "local", hf_config, None)
    folder.mkdir(parents=True)
    mc.write_checkpoint(folder, layout, mc.fused_params(roles, layout), args)
    mc.write_meta(folder, None, hf_config, shape)
    del units


def run_child(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of a child process."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed ({status}): {' '.join(cmd)}")
    return elapsed, usage.ru_maxrss * 1024


def shard_sizes(folder: Path) -> list[int]:
    return [p.stat().st_size for p in folder.rglob("model_optim_rng.pt")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="layers of the synthetic 7B checkpoint (default 32)")
    p.add_argument("--tp", type=int, default=2, help="TP size of the synthetic checkpoint (default 2)")
    p.add_argument("--workdir", type=Path, help="where to write (default: a temp folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    a = p.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="prune-bench-"))
    src, copy, out = work / "llama7b_tp2", work / "copy", work / "pruned"
    for d in (copy, out):
        shutil.rmtree(d, ignore_errors=True)
    try:
        if not src.exists():
            t0 = time.perf_counter()
            synthetic_checkpoint(src, a.layers, a.tp)
            print(f"wrote synthetic checkpoint ({a.layers} layers, TP={a.tp}) in {time.perf_counter() - t0:.1f}s")
        keep_layers = max(1, a.layers * 28 // 32)
        base_t, base_rss = run_child([sys.executable, "-c", "import megatron.prune.megatron_ckpt, torch"])
        cp_t, _ = run_child(["cp", "-r", str(src), str(copy)])
        prune_t, prune_rss = run_child([
            sys.executable, "-m", "megatron.prune", "prune", "--input", str(src), "--output", str(out),
            "--hidden-size", "3072", "--num-attention-heads", "24", "--ffn-hidden-size", "8192",
            "--num-layers", str(keep_layers), "--no-progress"])
        ins, outs = shard_sizes(src), shard_sizes(out)
        bound = max(ins) + max(outs)
        gib = 2**30
        print(f"input: {len(ins)} shards, {sum(ins) / gib:.2f} GiB; output: {len(outs)} shards, "
              f"{sum(outs) / gib:.2f} GiB ({a.layers} -> {keep_layers} layers)")
        print(f"cp -r: {cp_t:.2f}s   prune: {prune_t:.2f}s   ratio prune/cp: {prune_t / cp_t:.2f} (target <= 1.3)")
        print(f"  (python + torch start-up alone: {base_t:.2f}s, peak RSS {base_rss / gib:.2f} GiB)")
        print(f"peak RSS of prune: {prune_rss / gib:.2f} GiB; largest input + output shard: {bound / gib:.2f} GiB; "
              f"ratio {prune_rss / bound:.2f} (target <= 1.1); minus start-up RSS: {(prune_rss - base_rss) / bound:.2f}")
    finally:
        if not a.keep:
            for d in (copy, out) + (() if a.workdir else (src,)):
                shutil.rmtree(d, ignore_errors=True)
            if not a.workdir:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
