#!/usr/bin/env python3
"""Throughput and memory of pruning a TP-sharded Megatron checkpoint, against a plain `cp -r` of it.

Writes a synthetic LLaMA-2-7B-shaped TP=2 checkpoint (bf16 random weights; --layers for fewer layers),
then times `cp -r` of it and `megatron-prune prune` of it to a 3.4B-like shape (hidden 3072, heads 24,
FFN 8192, 28 of 32 layers, scaled with --layers), each in a fresh process. Prints prune/cp time and the
prune process's peak RSS against (largest input shard + largest output shard).
Targets: ratio <= 1.3; peak RSS <= 1.1 x (largest input shard + largest output shard).

    python bench/prune_throughput.py --layers 4 --workdir /tmp/bench
    python bench/prune_throughput.py --layers 8 --repeat 5 --baseline-rev HEAD~3   # before/after, interleaved
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def synthetic_checkpoint(folder: Path, layers: int, tp: int) -> None:
    """A LLaMA-2-7B-shaped Megatron checkpoint with random bf16 weights, written one shard at a time."""
    from megatron.prune.core.roles import ROLE_AXES
    from megatron.prune.formats.mcore import args as mcore_args
    from megatron.prune.formats.mcore import schema
    from megatron.prune.formats.mcore import write
    from megatron.prune.core.shape import ModelShape

    shape = ModelShape(num_layers=layers, hidden_size=4096, num_attention_heads=32, num_query_groups=32, head_dim=128,
                       ffn_hidden_size=11008, vocab_size=32000, tied_embeddings=False)
    layout = write.Layout(shape, tp, 1, "local", schema.padded_vocab_size(shape.vocab_size, 128, tp))
    units = schema.tp_units(shape, layout.padded_vocab)
    gen = torch.Generator().manual_seed(0)

    def role_shape(role: str) -> tuple[int, ...]:
        size = {"hidden": shape.hidden_size, "vocab": layout.padded_vocab,
                "heads": shape.num_attention_heads * shape.head_dim, "groups": shape.num_query_groups * shape.head_dim,
                "ffn": shape.ffn_hidden_size}
        return tuple(size[a] // (tp if a in schema.TP_AXES else 1) for a in ROLE_AXES[role])

    def roles(role: str, layer: int | None, r: int) -> torch.Tensor:
        return (torch.randn(role_shape(role), generator=gen) * 0.02).to(torch.bfloat16)

    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
                 "rope_theta": 10000.0, "max_position_embeddings": 4096}
    args = mcore_args.args_for_shape(None, shape, tp, 1, layout.padded_vocab, 128, torch.bfloat16, "local",
                                     hf_config, None)
    folder.mkdir(parents=True)
    write.write_checkpoint(folder, layout, write.fused_params(roles, layout), args)
    write.write_meta(folder, None, hf_config, shape)
    del units


@dataclass(frozen=True)
class Run:
    """One child process: wall seconds, CPU seconds (user + sys), peak RSS bytes."""

    wall: float
    cpu: float
    rss: int


def run_child(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Run:
    """Run ``cmd`` to completion and measure it (wait4 gives the child's own rusage)."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            if cwd is not None:
                os.chdir(cwd)
            os.execvpe(cmd[0], cmd, env if env is not None else os.environ)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed ({status}): {' '.join(cmd)}")
    return Run(elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def shard_sizes(folder: Path) -> list[int]:
    """Sizes of the shard files (torch format) or of the .distcp files (torch_dist: one per writer)."""
    return [p.stat().st_size for p in folder.rglob("*") if p.name == "model_optim_rng.pt" or p.suffix == ".distcp"]


def baseline_tree(rev: str, into: Path) -> Path:
    """``megatron/prune`` as of git revision ``rev``, unpacked under ``into`` (imported via PYTHONPATH)."""
    repo = Path(__file__).resolve().parents[1]
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "megatron/prune"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="layers of the synthetic 7B checkpoint (default 32)")
    p.add_argument("--tp", type=int, default=2, help="TP size of the synthetic checkpoint (default 2)")
    p.add_argument("--workdir", type=Path, help="where to write (default: a temp folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    p.add_argument("--repeat", type=int, default=1, help="rounds of (cp, prune[, baseline prune]); medians reported")
    p.add_argument("--baseline-rev", help="also time megatron.prune as of this git revision, interleaved")
    p.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch", help="prune output format")
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
        prune_args = ["-m", "megatron.prune", "prune", "--input", str(src), "--output", str(out), "--hidden-size",
                      "3072", "--num-attention-heads", "24", "--ffn-hidden-size", "8192", "--num-layers",
                      str(keep_layers), "--no-progress"]
        if a.ckpt_format != "torch":  # (older revisions have no --ckpt-format)
            prune_args += ["--ckpt-format", a.ckpt_format]
        repo = Path(__file__).resolve().parents[1]
        variants: dict[str, tuple[list[str], dict[str, str] | None, Path | None]] = {
            "cp": (["cp", "-r", str(src), str(copy)], None, None),
            "prune": ([sys.executable, *prune_args], None, repo)}
        if a.baseline_rev:
            ref = baseline_tree(a.baseline_rev, work / "baseline_src")
            env = dict(os.environ, PYTHONPATH=str(ref))  # ahead of the editable install; cwd outside the repo
            variants[f"prune@{a.baseline_rev}"] = ([sys.executable, *prune_args], env, work)
        load0 = os.getloadavg()
        base = run_child([sys.executable, "-c", "import megatron.prune.formats.mcore.ops, torch"])
        runs: dict[str, list[Run]] = {k: [] for k in variants}
        names = list(variants)
        for i in range(a.repeat):
            for name in names[i % len(names):] + names[: i % len(names)]:  # rotate the order every round
                cmd, env, cwd = variants[name]
                os.sync()  # the previous run's write-back must not throttle this one (untimed)
                runs[name].append(run_child(cmd, env, cwd))
                if name == "cp":
                    shutil.rmtree(copy)
                else:
                    outs = shard_sizes(out)
                    shutil.rmtree(out)
        load1 = os.getloadavg()
        ins = shard_sizes(src)
        bound = max(ins) + max(outs)
        gib = 2**30
        med = {k: Run(*(statistics.median(getattr(r, f) for r in v) for f in ("wall", "cpu", "rss")))
               for k, v in runs.items()}
        print(f"input: {len(ins)} shards, {sum(ins) / gib:.2f} GiB; output: {len(outs)} shards, "
              f"{sum(outs) / gib:.2f} GiB ({a.layers} -> {keep_layers} layers); {a.repeat} round(s), medians; "
              f"load average {load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"  (python + torch start-up alone: {base.wall:.2f}s, peak RSS {base.rss / gib:.2f} GiB)")
        cp = med["cp"]
        print(f"cp -r: {cp.wall:.2f}s (cpu {cp.cpu:.2f}s)  rounds: {' '.join(f'{r.wall:.1f}' for r in runs['cp'])}")
        for name in names[1:]:
            m = med[name]
            per_round = [r.wall / c.wall for r, c in zip(runs[name], runs["cp"])]
            print(f"{name}: {m.wall:.2f}s (cpu {m.cpu:.2f}s)  ratio prune/cp: {m.wall / cp.wall:.2f} (target <= 1.3)"
                  f"  per-round ratios: {' '.join(f'{x:.2f}' for x in per_round)}")
            print(f"  peak RSS: {m.rss / gib:.2f} GiB; largest input + output shard: {bound / gib:.2f} GiB; "
                  f"ratio {m.rss / bound:.2f} (target <= 1.1); minus start-up RSS: {(m.rss - base.rss) / bound:.2f}")
    finally:
        if not a.keep:
            for d in (copy, out) + (() if a.workdir else (src,)):
                shutil.rmtree(d, ignore_errors=True)
            if not a.workdir:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
